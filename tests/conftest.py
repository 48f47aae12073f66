"""Shared pytest fixtures. Keep each block small and owned by the module it serves."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.s3server import SeaweedS3


# ---- S3 (SeaweedFS) ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    """One real S3 server (SeaweedFS on loopback) for the whole test session."""
    server = SeaweedS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[str]:
    """Point boto3 at the test server through the standard AWS_* variables; yield a fresh key prefix.

    Settings that could redirect boto3 elsewhere (a profile, a service-specific endpoint, the
    developer's ~/.aws files) are removed, so the tests see only the server.
    """
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_S3_ADDRESSING_STYLE",
                 "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.path.join(tmp_path, "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.path.join(tmp_path, "no-aws-credentials"))
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    yield f"test-{uuid.uuid4().hex}"
