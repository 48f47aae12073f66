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


# ---- the environment's CPU kernel under pytest-xdist -------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def kernel_compiled_once(tmp_path_factory) -> None:
    """Under `pytest -n N` (as .ci/run runs): the serial kernel of the environment's step, in float64 (what
    every training run steps), is compiled by the first worker while the others wait, so that it lands in
    numba's disk cache once; the other workers, and the pipeline workers that tests start as processes, load
    it from there. Without this, workers and their children start on a cold cache at the same moment and each
    compiles it anew. A plain session compiles it where it is first used, as before.

    This is numba's own cache, used as a product run uses it: a kernel that does not compile fails here, and
    with it every test of the worker, with numba's error."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return
    from tests.pipeline_support import once_per_session

    with once_per_session(tmp_path_factory, "kernel") as (_, done):
        if done.exists():
            return
        import torch

        from nexlify.config import EnvConfig, RiskConfig
        from nexlify.data.candles import load_market
        from nexlify.env.batched import BatchedTradingEnv
        from nexlify.env.market import MarketTensors, market_features
        from nexlify.features import WARMUP_BARS, Normalizer

        market = load_market("binance", ["BTC/USDT"]).slice(0, 400)
        raw = market_features(market)
        tensors = MarketTensors.build(market, Normalizer.fit(raw, WARMUP_BARS, 300), "cpu", raw)
        env = BatchedTradingEnv(tensors, torch.zeros((1, 1), dtype=torch.int64), torch.tensor([WARMUP_BARS]), 2,
                                EnvConfig(strategies=["spot"]), RiskConfig())
        assert env._fused is not None and not env._fused.parallel
        env.reset()
        env.step(torch.zeros((1, 1), dtype=torch.int64))
        done.write_text("compiled\n")
