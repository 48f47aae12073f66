"""The baselines of nexlify.baselines stepped through the same environment as the agent
(nexlify.evaluation.evaluate_with_baselines), checked against numbers computed by hand from the bundled
candles, the Aave rate formulas and the environment's documented fill rules."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from nexlify import baselines as bl
from nexlify.agent.dqn import DuelingQNet
from nexlify.config import EnvConfig, RiskConfig, TrainConfig
from nexlify.data.candles import load_market
from nexlify.env.batched import N_ACTIONS, observation_size
from nexlify.env.market import MarketTensors, market_features
from nexlify.env.layout import HOLD
from nexlify.evaluation import (NEG_INF, evaluate_policy, evaluate_with_baselines, hold_unless_margin,
                                riskless_total_return)
from nexlify.features import WARMUP_BARS, Normalizer
from nexlify.strategies import aave
from nexlify.strategies.params import StrategyParams
from tests.helpers_market import one_torch_thread  # noqa: F401 (fixture)

WINDOW = (1000, 1300)  # 300 bars of early 2025, after the feature warm-up
E0 = EnvConfig().initial_equity


@pytest.fixture(scope="module")
def market() -> MarketTensors:
    data = load_market("binance", ["BTC/USDT", "ETH/USDT"], start="2025-01-01", end="2025-03-01")
    raw = market_features(data)
    return MarketTensors.build(data, Normalizer.fit(raw, WARMUP_BARS, 800), "cpu", raw)


@pytest.fixture(scope="module")
def report(market) -> dict:
    """Every baseline (and an untrained agent) with the default config: all five strategies."""
    torch.manual_seed(0)
    model = DuelingQNet(observation_size(market.n_features), N_ACTIONS, TrainConfig().agent.hidden)
    return evaluate_with_baselines(model, market, WINDOW, EnvConfig(), RiskConfig(), StrategyParams(), margin=0.02,
                                   record=True, seeds=(0, 1))


def test_every_baseline_is_reported_with_the_agent_and_its_numbers_alone(market, report):
    assert set(report["baselines"]) == set(bl.BASELINES)
    for name, m in [("agent", report["agent"])] + list(report["baselines"].items()):
        for key in ("avg_return", "avg_sharpe", "avg_drawdown", "exposure", "exposure_any", "turnover", "fees_paid",
                    "return_moments", "per_pair"):
            assert key in m, (name, key)
        for pair, p in m["per_pair"].items():
            assert p["fees_paid"] == pytest.approx(-p["pnl_breakdown"]["fees_and_gas"], abs=1e-9), (name, pair)
            assert 0.0 <= p["exposure"] <= p["exposure_any"] <= 1.0
    # the agent stepped beside the baselines gets exactly what it gets alone
    torch.manual_seed(0)
    model = DuelingQNet(observation_size(market.n_features), N_ACTIONS, TrainConfig().agent.hidden)
    alone = evaluate_policy(model, market, WINDOW, EnvConfig(), RiskConfig(), StrategyParams(), margin=0.02)
    assert alone["per_pair"] == report["agent"]["per_pair"]
    assert alone["score"] == report["agent"]["score"]


def test_flat_keeps_exactly_the_initial_equity(report):
    flat = report["baselines"][bl.FLAT]
    assert flat["avg_return"] == 0.0 and flat["avg_sharpe"] == 0.0 and flat["avg_drawdown"] == 0.0
    assert flat["exposure_any"] == 0.0 and flat["turnover"] == 0.0 and flat["fees_paid"] == 0.0
    for curve in report["curves"][bl.FLAT]["equity"].values():
        assert curve == [E0] * (WINDOW[1] - WINDOW[0] + 1)
    assert flat["return_moments"]["n"] == WINDOW[1] - WINDOW[0] and flat["return_moments"]["sharpe"] is None


def _hourly_supply_rate() -> float:
    p = StrategyParams().aave
    return float(aave.supply_rate(p.utilization, p.base_variable_borrow_rate, p.variable_rate_slope1,
                                  p.variable_rate_slope2, p.optimal_usage_ratio, p.reserve_factor)) / 8760.0


HOURLY_RATE, SHARE = _hourly_supply_rate(), StrategyParams().aave.max_idle_share


def _lending_by_hand(n_steps: int, share: float) -> float:
    """Cash plus lending, by hand: each bar the sweep sets the Aave supply to `share` of the idle USDT (cash
    plus supply), and the supply grows by 1 + supply_rate(U) / 8760 per hourly bar, with Aave's V2 rate
    strategy at the default constant utilization."""
    growth = 1.0 + HOURLY_RATE
    cash, lent = E0, 0.0
    for _ in range(n_steps):
        idle = cash + lent
        cash, lent = idle - share * idle, share * idle * growth
    return cash + lent


def test_cash_plus_lending_earns_the_aave_supply_rate_compounded_over_the_window(market, report):
    n = WINDOW[1] - WINDOW[0]
    expected = _lending_by_hand(n, StrategyParams().aave.max_idle_share)
    lending = report["baselines"][bl.CASH_PLUS_LENDING]
    for pair, m in lending["per_pair"].items():
        assert m["total_return"] == pytest.approx((expected / E0 - 1.0) * 100.0, rel=1e-9, abs=1e-12), pair
        assert m["pnl_breakdown"]["lending_interest"] == pytest.approx(expected - E0, rel=1e-9)
    assert lending["fees_paid"] == 0.0  # moving cash to Aave is not a trade: no turnover (but float rounding)
    assert lending["turnover"] == pytest.approx(0.0, abs=1e-12)
    assert lending["exposure"] == 0.0 and lending["exposure_by_strategy"]["lending"] == 1.0
    # it never beats lending everything at once (the upper bound), and beats flat
    full = (1.0 + float(aave.supply_rate_for(StrategyParams().aave.utilization, StrategyParams().aave)) / 8760) ** n
    assert 0.0 < lending["avg_return"] < (full - 1.0) * 100.0
    # the riskless return compounded over the window is that return (the studies' yardstick)
    assert riskless_total_return(market, WINDOW, StrategyParams()) == pytest.approx(
        (expected / E0 - 1.0) * 100.0, rel=1e-9)


def test_cash_plus_lending_switches_lending_on_when_the_model_has_it_off(market):
    got = evaluate_with_baselines(None, market, (1000, 1100), EnvConfig(strategies=["spot"]), RiskConfig(), margin=0.0,
                                  seeds=())
    assert got["agent"] is None
    lending = got["baselines"][bl.CASH_PLUS_LENDING]
    assert lending["avg_return"] == pytest.approx((_lending_by_hand(100, StrategyParams().aave.max_idle_share) / E0 - 1) * 100,
                                                  rel=1e-9)
    assert "switched on" in got["baseline_notes"][bl.CASH_PLUS_LENDING]
    assert "switched on" not in got["baseline_notes"][bl.FLAT]


def test_buy_and_hold_at_full_size_is_the_price_ratio_less_fee_and_slippage(market, report):
    env = EnvConfig()
    slip = env.slippage_bps / 10_000
    i0, i1 = WINDOW
    full = report["baselines"][bl.BUY_AND_HOLD_FULL]
    for j, pair in enumerate(market.pairs):
        o = float(market.prices[i0, j, 0])
        c = float(market.prices[i1 - 1, j, 3])
        # all the cash buys coins at the open plus slippage, the fee taken from the order: E0 / (1 + fee)
        units = E0 / (1.0 + env.fee) / (o * (1.0 + slip))
        m = full["per_pair"][pair]
        assert m["total_return"] == pytest.approx((units * c / E0 - 1.0) * 100.0, rel=1e-9)
        assert m["total_return"] == pytest.approx((c / o / (1 + slip) / (1 + env.fee) - 1.0) * 100.0, rel=1e-9)
        assert m["fees_paid"] == pytest.approx(units * o * slip + E0 * env.fee / (1.0 + env.fee), rel=1e-9)
        assert m["exposure"] == 1.0 and m["trades"] == 0  # bought at the first bar, never sold
        curve = report["curves"][bl.BUY_AND_HOLD_FULL]["equity"][pair]
        closes = market.prices[i0 - 1:i1, j, 3].numpy()
        np.testing.assert_allclose(curve[1:], units * closes[1:], rtol=1e-12)
        assert m["turnover"] == pytest.approx(E0 / np.mean(curve[1:]), rel=1e-12)


def test_full_size_risk_changes_only_the_documented_fields():
    risk = RiskConfig()
    full = bl.full_size_risk(risk)
    changed = {k for k in vars(risk) if getattr(risk, k) != getattr(full, k)}
    assert changed == {"max_position", "fixed_size", "kelly", "stop_loss", "take_profit", "trailing_stop",
                       "daily_loss_limit"}
    assert (full.max_position, full.fixed_size, full.kelly, full.stop_loss, full.take_profit, full.trailing_stop,
            full.daily_loss_limit) == (1.0, 1.0, False, 0.0, 0.0, 0.0, 0.0)


def test_buy_and_hold_at_the_risk_budget_buys_the_fixed_size_at_the_first_open(market, report):
    env, risk = EnvConfig(), RiskConfig()
    slip = env.slippage_bps / 10_000
    i0 = WINDOW[0]
    sized = report["baselines"][bl.BUY_AND_HOLD_SIZED]
    for j, pair in enumerate(market.pairs):
        o, h, lo, c = (float(x) for x in market.prices[i0, j])
        entry = o * (1 + slip)
        assert lo > entry * (1 - risk.stop_loss) and h < entry * (1 + risk.take_profit)  # no exit in the first bar
        units = risk.fixed_size * E0 / entry
        curve = report["curves"][bl.BUY_AND_HOLD_SIZED]["equity"][pair]
        # the idle cash is swept into Aave: max_idle_share of it earns one hour of the supply rate
        idle = E0 - risk.fixed_size * E0 * (1 + env.fee)
        assert curve[1] == pytest.approx(idle * (1 + SHARE * HOURLY_RATE) + units * c, rel=1e-12)
        assert report["curves"][bl.BUY_AND_HOLD_SIZED]["position"][pair][0] == 1.0
        m = sized["per_pair"][pair]
        assert 0.5 < m["exposure"] <= 1.0 and m["turnover"] > 0 and m["fees_paid"] > 0


def test_moving_averages_are_means_of_past_closes_only():
    closes = torch.tensor(np.random.default_rng(3).lognormal(0, 0.01, (400, 2)).cumprod(0) * 100)
    fast, slow = bl.moving_average(closes, 50), bl.moving_average(closes, 200)
    for t in (199, 250, 399):
        assert float(fast[t, 1]) == pytest.approx(float(closes[t - 49:t + 1, 1].mean()), rel=1e-12)
        assert float(slow[t, 0]) == pytest.approx(float(closes[t - 199:t + 1, 0].mean()), rel=1e-12)
    assert torch.isnan(slow[:199]).all() and not bl.ma_long_signal(closes)[:199].any()
    signal = bl.ma_long_signal(closes)
    assert bool(signal[300, 0]) == bool(closes[251:301, 0].mean() > closes[101:301, 0].mean())
    # look-ahead: changing every close after bar 300 changes no signal up to bar 300 (and does change later ones)
    changed = closes.clone()
    changed[301:] *= torch.linspace(0.5, 1.5, 99, dtype=closes.dtype).unsqueeze(1)
    other = bl.ma_long_signal(changed)
    assert torch.equal(other[:301], signal[:301])
    assert not torch.equal(other[301:], signal[301:])


def test_crossover_decisions_do_not_change_when_future_closes_do(market):
    """The crossover stepped through the environment on the real candles, then on the same candles with
    every bar after `cut` changed: its positions and equity up to `cut` are the same."""
    window, cut = (1000, 1400), 1200
    base = evaluate_with_baselines(None, market, window, EnvConfig(), RiskConfig(), margin=0.0, seeds=(), record=True)
    moved = copy.copy(market)
    prices = market.prices.clone()
    prices[cut + 1:] *= torch.linspace(0.7, 1.3, market.n_bars - cut - 1, dtype=prices.dtype).view(-1, 1, 1)
    moved.prices, moved.cache = prices, {}
    other = evaluate_with_baselines(None, moved, window, EnvConfig(), RiskConfig(), margin=0.0, seeds=(), record=True)
    k = cut - window[0] + 1  # curves start at the close of bar window[0]-1
    a, b = base["curves"][bl.MA_CROSSOVER], other["curves"][bl.MA_CROSSOVER]
    for pair in market.pairs:
        assert a["position"][pair][:k] == b["position"][pair][:k]
        assert a["equity"][pair][:k + 1] == b["equity"][pair][:k + 1]
        assert sum(a["position"][pair]) > 0  # it did trade
    assert a["equity"] != b["equity"]  # and the later bars did change


def test_random_baseline_is_deterministic_per_seed_and_the_mean_of_its_seeds(market):
    window = (1000, 1150)
    run = lambda seeds: evaluate_with_baselines(  # noqa: E731
        None, market, window, EnvConfig(), RiskConfig(), margin=0.0, seeds=seeds)["baselines"][bl.RANDOM_VALID]
    both, again = run((0, 1)), run((0, 1))
    assert both == again
    one, two = run((0,)), run((1,))
    assert one["avg_return"] != two["avg_return"]
    assert both["avg_return"] == pytest.approx((one["avg_return"] + two["avg_return"]) / 2, rel=1e-12)
    assert both["copies_avg_return"] == pytest.approx([one["avg_return"], two["avg_return"]], rel=1e-12)
    for key in ("turnover", "fees_paid", "exposure"):
        assert both[key] == pytest.approx((one[key] + two[key]) / 2, rel=1e-12)
    assert both["seeds"] == [0, 1] and math.isfinite(both["avg_sharpe"])


def test_the_accounting_is_the_same_on_the_fused_kernel_and_the_tensor_step(market):
    """Exposure, turnover and fees read from the environment's state after each step: the fused CPU kernel
    and the tensor step (the GPU's path) must leave the same state behind."""
    window = (1000, 1120)
    fused = evaluate_with_baselines(None, market, window, EnvConfig(), RiskConfig(), margin=0.0, seeds=(0,))
    tensor = evaluate_with_baselines(None, market, window, EnvConfig(kernel="torch"), RiskConfig(), margin=0.0,
                                     seeds=(0,))
    for name in bl.BASELINES:
        a, b = fused["baselines"][name], tensor["baselines"][name]
        for key in ("avg_return", "exposure", "exposure_any", "turnover", "fees_paid"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (name, key)
        assert a["exposure_by_strategy"] == pytest.approx(b["exposure_by_strategy"]), name
    assert fused["baselines"][bl.RANDOM_VALID]["exposure_any"] > fused["baselines"][bl.RANDOM_VALID]["exposure"]


def test_sharpe_vs_lending_is_in_excess_of_what_cash_plus_lending_earns(report):
    """Each bar cash plus lending earns max_idle_share * rate / 8760 (the risk-free rate here): its own
    excess Sharpe is 0 (riskless), and buy-and-hold's is its equity curve's hourly returns less that, mean
    over std, annualised, written out."""
    rf = SHARE * HOURLY_RATE
    assert report["baselines"][bl.CASH_PLUS_LENDING]["avg_sharpe_vs_lending"] == 0.0
    for pair, m in report["baselines"][bl.BUY_AND_HOLD_FULL]["per_pair"].items():
        curve = report["curves"][bl.BUY_AND_HOLD_FULL]["equity"][pair]
        excess = [b / a - 1.0 - rf for a, b in zip(curve[:-1], curve[1:])]
        mean = sum(excess) / len(excess)
        std = math.sqrt(sum((x - mean) ** 2 for x in excess) / (len(excess) - 1))
        assert m["sharpe_vs_lending"] == pytest.approx(mean / std * math.sqrt(8760), rel=1e-9), pair
        assert m["sharpe_vs_lending"] < m["sharpe"]  # the same spread, a lower mean


X = NEG_INF  # an invalid action's masked Q


@pytest.mark.parametrize("q, margin, action", [
    # Q over (hold, a1, a2, ...) in dyadic numbers (exact gaps): the best valid action when it beats hold by at
    # least the margin, else hold
    ([0.25, 0.5, 0.125], 0.0, 1),
    ([0.25, 0.5, 0.125], 0.25, 1),  # 0.5 - 0.25 = 0.25: at the margin, taken
    ([0.25, 0.5, 0.125], 0.2501, HOLD),
    ([0.25, 0.5, 0.125], 5.0, HOLD),
    ([0.75, 0.5, 0.125], 0.0, HOLD),  # hold is the argmax: hold whatever the margin
    ([0.25, X, 0.375], 0.125, 2),  # the invalid action is never chosen; the valid one beats hold by 0.125
    ([0.25, X, 0.375], 0.25, HOLD),
    ([-0.5, -0.25, -0.75], 0.25, 1),  # negative Q-values: only the gap counts
])
def test_the_hold_margin_takes_the_best_action_only_when_it_beats_hold_by_the_margin(q, margin, action):
    assert HOLD == 0
    got = hold_unless_margin(torch.tensor([q], dtype=torch.float64), margin)
    assert got.tolist() == [action]


def test_an_agent_that_never_clears_its_margin_is_cash_plus_lending(market):
    """With a margin no Q-gap reaches, the agent holds on every bar and the sweep lends its cash: exactly the
    cash-plus-lending baseline, bar for bar; with margin 0 the same network trades."""
    torch.manual_seed(0)
    model = DuelingQNet(observation_size(market.n_features), N_ACTIONS, TrainConfig().agent.hidden)
    held = evaluate_with_baselines(model, market, WINDOW, EnvConfig(), RiskConfig(), StrategyParams(), margin=1e6,
                                   seeds=(0,))
    assert held["agent"]["per_pair"] == held["baselines"][bl.CASH_PLUS_LENDING]["per_pair"]
    assert held["agent"]["total_trades"] == 0
    plain = evaluate_policy(model, market, WINDOW, EnvConfig(), RiskConfig(), StrategyParams(), margin=0.0)
    assert plain["total_trades"] > 0 or plain["exposure_any"] > held["agent"]["exposure_any"]
