"""Shared pytest fixtures. Keep each block small and owned by the module it serves."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

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


# ---- pytest-xdist: the slowest files first ---------------------------------------------------------

# The test files that took longest in .ci/run, slowest first. Under `pytest -n N --dist loadfile
# --no-loadscope-reorder` each worker takes whole files in collection order; handing out the long ones first
# keeps a long file from starting last while the other workers sit idle. Only the order changes; every other
# file follows in its usual order.
SLOWEST_FILES_FIRST = (
    "test_backtest.py", "test_fault_injection.py", "test_kubernetes_executor.py", "test_pipeline_resume.py",
    "test_pipeline_s3.py", "test_env_fused.py", "test_pipeline_cli.py", "test_env_fused_cuda.py", "test_paper.py",
    "test_chart.py", "test_pipeline.py", "test_finite.py", "test_controller_torch_free.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


# ---- the environment's CPU kernel under pytest-xdist -------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under `pytest -n N` (as .ci/run runs): each build of the environment's CPU kernel is compiled by one
    worker, into numba's disk cache, before the worker collects its tests. Without this, the workers and the
    pipeline workers that tests start as processes begin on a cold cache at the same moment and each compiles
    the kernel anew.

    The serial build in float64 (what every training run steps) comes first: the first worker compiles it, and
    every worker waits for it. A worker that finds it taken compiles another meanwhile instead of waiting idle:
    the threaded build (the large-batch tests of tests/test_env_fused.py step it), the serial one in float32.
    A plain session compiles each where it is first used, as before.

    This runs at the session's start, not in a fixture: a cold compile takes minutes on a loaded machine, which
    must not count against the first test's timeout. It is numba's own cache, used as a product run uses it
    (same builds, same signatures): a kernel that does not compile stops the worker with numba's error."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return
    from tests.pipeline_support import locked_once

    shared = Path(session.config.option.basetemp).parent  # xdist: <session folder>/popen-<worker>
    for name, threads, precision in (("kernel-serial", 1, "float64"), ("kernel-threaded", 2, "float64"),
                                     ("kernel-serial-float32", 1, "float32")):
        with locked_once(shared, name, wait=False) as held:
            if held is not None and not held[1].exists():
                _step_the_kernel(threads, precision)
                held[1].write_text("compiled\n")
    with locked_once(shared, "kernel-serial") as (_, done):
        if not done.exists():  # the worker compiling it failed: compile here, to fail with numba's error
            _step_the_kernel(1, "float64")
            done.write_text("compiled\n")


def _step_the_kernel(threads: int, precision: str) -> None:
    """One step of an environment on real candles with kernel "auto", on `threads` torch threads (1: the serial
    build; 2, with past PARALLEL_MIN_SLOTS episode slots: the threaded build), in `precision` (a signature of
    its own)."""
    import torch

    from nexlify.config import EnvConfig, RiskConfig
    from nexlify.data.candles import load_market
    from nexlify.env import fused_portfolio
    from nexlify.env.batched import BatchedTradingEnv
    from nexlify.env.market import MarketTensors, market_features
    from nexlify.features import WARMUP_BARS, Normalizer

    market = load_market("binance", ["BTC/USDT"]).slice(0, 400)
    raw = market_features(market)
    tensors = MarketTensors.build(market, Normalizer.fit(raw, WARMUP_BARS, 300), "cpu", raw)
    episodes = 1 if threads == 1 else fused_portfolio.PARALLEL_MIN_SLOTS
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        env = BatchedTradingEnv(tensors, torch.zeros((episodes, 1), dtype=torch.int64),
                                torch.full((episodes,), WARMUP_BARS), 2, EnvConfig(strategies=["spot"], precision=precision), RiskConfig())
        assert env._fused is not None and env._fused.parallel == (threads > 1)
        env.reset()
        env.step(torch.zeros((episodes, 1), dtype=torch.int64))
    finally:
        torch.set_num_threads(before)
