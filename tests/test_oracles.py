"""The planted families' oracles (nexlify.oracles): their decisions by hand on a made market, and the rules'
stepping (nexlify.evaluation.evaluate_rules) against the baselines' on the same window."""

from __future__ import annotations

import pytest
import torch

from nexlify import baselines as bl
from nexlify.config import EnvConfig, RiskConfig
from nexlify.data.candles import load_market
from nexlify.env.layout import CLOSE, HOLD, OPEN_LONG
from nexlify.env.market import MarketTensors, market_features
from nexlify.evaluation import evaluate_rules, evaluate_with_baselines
from nexlify.features import FEATURE_NAMES, WARMUP_BARS, Normalizer
from nexlify.oracles import long_signal, oracle_policy, q_gap_by_signal
from nexlify.strategies.params import StrategyParams
from tests.helpers_market import flat, make_env, make_market, one_torch_thread, quiet_risk  # noqa: F401


def test_calendar_oracle_is_long_over_the_rising_hours():
    # bars from 2024-01-01 00:00 UTC, bar t opens at hour t % 24; decisions at bars 205..234 (hours 13..23,
    # 0..18): enter at the close of 23:00 (bar 215) for the 00:00 bar, hold, exit at the close of 11:00
    # (bar 227) before the 12:00 bar
    market = make_market([flat(100.0)] * 250)
    env = make_env(market, quiet_risk(), start=205, n_steps=30)
    policy = oracle_policy("calendar", market)
    obs, taken, done = env.reset(), [], False
    while not done:
        a = policy(obs, env.mask, env, slice(0, 1))
        taken.append(int(a[0, 0]))
        obs, _, done = env.step(a)
    assert taken == [HOLD] * 10 + [OPEN_LONG] + [HOLD] * 11 + [CLOSE] + [HOLD] * 7


def test_momentum_oracle_reads_its_own_closes():
    # flat for 6 bars, then rising: no 24-bar return before bar 24, a rise from bar 24 on (119 > 100);
    # falling back below the close 24 bars before ends the wish
    bars = [flat(100.0)] * 6 + [flat(100.0 + i) for i in range(1, 31)] + [flat(90.0)]
    wish = long_signal("momentum", make_market(bars))
    assert not wish[:24, 0].any() and wish[24:36, 0].all() and not wish[36, 0]


@pytest.fixture(scope="module")
def market() -> MarketTensors:
    data = load_market("binance", ["BTC/USDT", "ETH/USDT"], start="2025-01-01", end="2025-02-01")
    raw = market_features(data)
    return MarketTensors.build(data, Normalizer.fit(raw, WARMUP_BARS, 500), "cpu", raw)


def test_rules_step_like_the_baselines(market):
    """A rule stepped by evaluate_rules gets exactly what the same rule gets among the baselines."""
    window = (400, 700)
    rules = {"cash_plus_lending": lambda obs, mask, env, rows: bl.take_lend(mask),
             "oracle": oracle_policy("vol_regime", market)}
    got = evaluate_rules(market, window, EnvConfig(), RiskConfig(), StrategyParams(), rules)
    base = evaluate_with_baselines(None, market, window, EnvConfig(), RiskConfig(), StrategyParams(), margin=0.02,
                                   seeds=())
    assert got["cash_plus_lending"]["avg_return"] == base["baselines"]["cash_plus_lending"]["avg_return"]
    assert got["oracle"]["total_trades"] > 0  # the regime flips inside a month of real candles
    with torch.no_grad():
        assert torch.equal(long_signal("vol_regime", market), long_signal("vol_regime", market))


class _HourGap(torch.nn.Module):
    """Q-values whose gap open_long - hold is the observation's (normalised) hour_cos minus 100: never worth an
    entry, so the policy stays flat and every tradable bar may open."""

    def forward(self, obs):
        q = torch.full((*obs.shape[:-1], 11), -1e3)
        q[..., HOLD] = 0.0
        q[..., OPEN_LONG] = obs[..., FEATURE_NAMES.index("hour_cos")] - 100.0
        return q


def test_q_gap_by_signal_splits_the_gap_by_the_oracles_wish(market):
    """The gap averaged over the bars where the calendar oracle wants in (the next bar's hour in 0..11 UTC) and
    over the others, computed here from the features and the clock: the decisions of a window [i0, i1) are at
    the closes of bars i0-1 .. i1-2."""
    window = (400, 700)
    got = q_gap_by_signal(_HourGap(), "calendar", market, window, EnvConfig(), RiskConfig(), StrategyParams(),
                          margin=0.02)
    t = torch.arange(window[0] - 1, window[1] - 1)
    hour_next = (torch.as_tensor(market.timestamps[t.numpy() + 1]) // 3_600_000) % 24
    wants = hour_next < 12
    gap = market.features[t, :, FEATURE_NAMES.index("hour_cos")].to(torch.float64) - 100.0  # [bars, pairs]
    tradable = market.tradable[t]
    on, off = gap[wants.unsqueeze(-1) & tradable], gap[~wants.unsqueeze(-1) & tradable]
    assert got["bars_signal"] == on.numel() and got["bars_other"] == off.numel()
    assert got["gap_signal"] == pytest.approx(float(on.mean()), abs=1e-5)
    assert got["gap_other"] == pytest.approx(float(off.mean()), abs=1e-5)
    assert got["seen"] == pytest.approx(float(on.mean() - off.mean()), abs=1e-5)
    assert got["seen"] > 0.5  # hour_cos is highest around midnight, inside the wanted hours
