"""The report's trace of the agent recorded in the pass that gives its metrics and the baselines'
(nexlify.report.trace.trace_with_baselines), side by side with the trace of the agent stepped alone
(trace_policy) and the evaluation without an observer: the same numbers, leaf by leaf, every strategy on.
And a pipeline's baselines stored once per data, window and config, then read (evaluate_with_stored_baselines)."""

from __future__ import annotations

import pytest

from nexlify.agent.dqn import DuelingQNet
from nexlify.config import ALL_STRATEGIES, EnvConfig, RiskConfig
from nexlify.env.market import MarketTensors
from nexlify.evaluation import FolderBaselines, baselines_key, evaluate_with_baselines, evaluate_with_stored_baselines
from nexlify.report.trace import trace_policy, trace_with_baselines
from nexlify.strategies.params import StrategyParams
from tests.helpers_market import bundled_two_pairs, one_torch_thread, untrained_qnet  # noqa: F401

WINDOW = (1000, 1240)


@pytest.fixture(scope="module")
def market() -> MarketTensors:
    return bundled_two_pairs()


def _model(market: MarketTensors) -> DuelingQNet:
    return untrained_qnet(market, 1)


def test_the_trace_from_the_evaluations_pass_is_the_agents_own(market):
    cfg, risk, params = EnvConfig(strategies=list(ALL_STRATEGIES)), RiskConfig(), StrategyParams()
    evaluated, trace = trace_with_baselines(_model(market), market, WINDOW, cfg, risk, params, margin=0.0)
    alone = trace_policy(_model(market), market, WINDOW, cfg, risk, params, margin=0.0)
    plain = evaluate_with_baselines(_model(market), market, WINDOW, cfg, risk, params, margin=0.0, record=True)
    assert trace == alone  # every bar's equity, position, exposure, PnL by source and every trade
    assert evaluated == plain  # watching the pass changes none of its numbers
    assert trace["metrics"] is evaluated["agent"]
    # the comparison has something in it: the agent traded, so the trace has entries and exits
    trades = [t for p in trace["pairs"].values() for t in p["trades"]]
    assert any(t["side"] == "entry" for t in trades) and any(t["side"] == "exit" for t in trades)


class _Counted(FolderBaselines):
    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.gets = self.puts = 0

    def get(self, key: str) -> dict | None:
        self.gets += 1
        return super().get(key)

    def put(self, key: str, value: dict) -> None:
        self.puts += 1
        super().put(key, value)


def test_stored_baselines_are_computed_once_and_read_after(market, tmp_path, monkeypatch):
    """The first evaluation of a window steps the baselines and stores them (as JSON, like a pipeline's); the
    next reads them and steps only the agent, with the same numbers; another config computes its own."""
    import nexlify.evaluation as ev

    stepped = []
    real = ev.evaluate_with_baselines
    monkeypatch.setattr(ev, "evaluate_with_baselines", lambda *a, **k: stepped.append(1) or real(*a, **k))
    cfg, risk, params = EnvConfig(strategies=list(ALL_STRATEGIES)), RiskConfig(), StrategyParams()
    store = _Counted(str(tmp_path / "baselines"))
    kwargs = dict(margin=0.0)  # the random baseline's default seeds, as a pipeline's runs and report use
    first = evaluate_with_stored_baselines(_model(market), market, WINDOW, cfg, risk, params, store, **kwargs)
    assert (store.gets, store.puts, len(stepped)) == (1, 1, 1)
    second = evaluate_with_stored_baselines(_model(market), market, WINDOW, cfg, risk, params, store, **kwargs)
    assert (store.gets, store.puts, len(stepped)) == (2, 1, 1)  # read, not stepped
    plain = real(_model(market), market, WINDOW, cfg, risk, params, **kwargs)
    assert first == plain and second == plain
    # the report's call (curves and the trace) on the stored baselines: the curves are the baselines' own
    _, trace = trace_with_baselines(_model(market), market, WINDOW, cfg, risk, params, margin=0.0, baselines=store)
    assert store.puts == 1 and len(stepped) == 1
    assert trace == trace_policy(_model(market), market, WINDOW, cfg, risk, params, margin=0.0)
    recorded = evaluate_with_stored_baselines(_model(market), market, WINDOW, cfg, risk, params, store,
                                              record=True, **kwargs)
    assert recorded == real(_model(market), market, WINDOW, cfg, risk, params, record=True, **kwargs)
    # a changed config (the fee) or window is another key: computed and stored beside the first
    evaluate_with_stored_baselines(_model(market), market, WINDOW, EnvConfig(fee=0.002), risk, params, store,
                                   **kwargs)
    evaluate_with_stored_baselines(_model(market), market, (WINDOW[0], WINDOW[1] - 24), cfg, risk, params, store,
                                   **kwargs)
    assert store.puts == 3 and len(stepped) == 3
    assert len({baselines_key(market, WINDOW, c, risk, params) for c in (cfg, EnvConfig(fee=0.002))}) == 2
