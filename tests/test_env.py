"""The batched environment's behaviour: accounting to the cent, rewards that add up to the log-equity
change, no look-ahead, gap bars, and a deterministic, resumable training run.

Hand-made markets (tests/helpers_market.py) give numbers computable on paper; a slice of the bundled
sample gives the invariants on real prices. Only the public surface is used: step, reset, mask, cash,
units, equity, stats, position_size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nexlify.agent.dqn import DQNAgent
from nexlify.config import AgentConfig, EnvConfig, RiskConfig, TrainConfig
from nexlify.data.candles import MarketData, load_market, split_windows
from nexlify.env.batched import CLOSE, HOLD, N_ACTIONS, OPEN_LONG, BatchedTradingEnv, observation_size
from nexlify.env.market import MarketTensors, market_features
from nexlify.features import WARMUP_BARS, Normalizer, compute_features
from nexlify.training import epsilon_at, train_run
from tests.helpers_market import actions, flat, make_env, make_market, quiet_risk
from tests.helpers_market import one_torch_thread, step_kernel  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("step_kernel")  # every test on the fused kernel and on the tensor step

FEE, SLIP = 0.001, 0.0005  # 0.1% per side, 5 bps


# =================================================================================== hand accounting


def test_buy_then_sell_cash_units_equity_and_costs_by_hand():
    """Size 50% of 10,000, fee 0.1%, slippage 5 bps.
    Buy at bar 1's open 100: fill 100.05, notional 5000, paid 5005, units 5000/100.05, cash 4995.
    Sell at bar 2's open 108: fill 107.946, proceeds units * 107.946 * 0.999."""
    market = make_market([flat(100), (100, 110, 95, 105), (108, 112, 104, 110), flat(110)])
    env = make_env(market, quiet_risk(), EnvConfig(fee=FEE, slippage_bps=5.0, initial_equity=10_000.0))
    units = 5000 / 100.05

    env.step(actions(OPEN_LONG))
    assert env.units.item() == pytest.approx(units, abs=1e-12)
    assert env.cash.item() == pytest.approx(4995.0, abs=1e-9)
    assert env.equity.item() == pytest.approx(4995.0 + units * 105, abs=1e-9)
    buy_costs = units * 100 * SLIP + 5.0  # slippage on the fill + the fee of 0.1% of 5000
    assert env.stats.costs.item() == pytest.approx(buy_costs, abs=1e-9)

    env.step(actions(CLOSE))
    gross = units * 108 * (1 - SLIP)
    cash = 4995.0 + gross * (1 - FEE)
    assert env.units.item() == 0.0
    assert env.cash.item() == pytest.approx(cash, abs=1e-9)
    assert env.equity.item() == pytest.approx(cash, abs=1e-9)
    costs = buy_costs + units * 108 * SLIP + gross * FEE
    assert env.stats.costs.item() == pytest.approx(costs, abs=1e-9)
    # the same costs seen another way: the frictionless round trip of the same units minus what we have
    frictionless_cash = 10_000 - units * 100 + units * 108
    assert env.stats.costs.item() == pytest.approx(frictionless_cash - cash, abs=1e-9)
    assert env.stats.trades.item() == 1 and env.stats.wins.item() == 1  # 107.946*0.999*units > 5005


def test_losing_round_trip_counts_as_a_loss_after_costs():
    """Buy at 100, sell at 100.1: the price rose but fees and slippage make it a losing trade."""
    market = make_market([flat(100), flat(100), flat(100.1), flat(100.1)])
    env = make_env(market, quiet_risk(), EnvConfig(fee=FEE, slippage_bps=5.0))
    env.step(actions(OPEN_LONG))
    env.step(actions(CLOSE))
    assert env.stats.trades.item() == 1 and env.stats.wins.item() == 0
    units = 5000 / 100.05
    assert env.cash.item() == pytest.approx(4995 + units * 100.1 * (1 - SLIP) * (1 - FEE), abs=1e-9)


def test_rewards_per_slot_hand_path():
    """Two pairs, only pair 0 trades: pair 1's reward is exactly 0 and pair 0's equals log(E'/E)."""
    bars = [[flat(100), flat(50)], [(100, 110, 95, 105), flat(51)], [(108, 112, 104, 110), flat(52)],
            [flat(110), flat(53)]]
    env = make_env(make_market(bars), quiet_risk(), EnvConfig(fee=FEE, slippage_bps=5.0))
    equities = [env.equity.item()]
    for a in (OPEN_LONG, HOLD, CLOSE):
        _, reward, _ = env.step(actions(a, HOLD))
        equities.append(env.equity.item())
        assert reward[0, 1].item() == 0.0
        assert reward[0, 0].item() == pytest.approx(math.log(equities[-1] / equities[-2]), abs=1e-7)
    units = 5000 / 100.05
    assert equities[1] == pytest.approx(4995 + units * 105, abs=1e-9)
    assert equities[2] == pytest.approx(4995 + units * 110, abs=1e-9)


def test_insufficient_cash_scales_entries_down():
    """max_position 0.5, fixed 0.5, three pairs, cap 3: the third 5000-entry would need 15,000 of cash;
    the three requests are scaled to the 10,000 available (no fee): 10,000/3 each, cash 0, never below."""
    market = make_market([[flat(100)] * 3] * 3)
    env = make_env(market, quiet_risk(max_trades=3))
    env.step(actions(OPEN_LONG, OPEN_LONG, OPEN_LONG))
    assert env.cash.item() == pytest.approx(0.0, abs=1e-9)
    assert env.units[0].tolist() == [pytest.approx(10_000 / 3 / 100)] * 3
    assert env.equity.item() == pytest.approx(10_000.0)
    assert not env.mask[0, :, OPEN_LONG].any()  # holding everywhere


def test_reset_restores_the_initial_state():
    market = make_market([flat(100), (100, 110, 95, 105), flat(105)])
    env = make_env(market, quiet_risk(), EnvConfig(fee=FEE, slippage_bps=5.0))
    first = env.reset()
    env.step(actions(OPEN_LONG))
    again = env.reset()
    assert torch.equal(first, again)
    assert env.cash.item() == 10_000.0 and env.units.item() == 0.0 and env.equity.item() == 10_000.0
    assert env.stats.costs.item() == 0.0 and env.stats.n_returns == 0


# ===================================================================== invariants on real prices


@pytest.fixture(scope="module")
def real() -> tuple[MarketData, MarketTensors]:
    """3 pairs, 1500 bars of the bundled sample, normalised on bars [WARMUP_BARS, 1000)."""
    market = load_market("binance", ["BTC/USDT", "ETH/USDT", "SOL/USDT"]).slice(0, 1500)
    raw = market_features(market)
    return market, MarketTensors.build(market, Normalizer.fit(raw, WARMUP_BARS, 1000), "cpu", raw)


def random_valid(mask: torch.Tensor, gen: torch.Generator, p_hold: float = 0.6) -> torch.Tensor:
    """Uniform over the valid trading actions, or hold with probability p_hold."""
    noise = torch.rand(mask.shape, generator=gen)
    pick = torch.where(mask, noise, -1.0).argmax(-1)
    hold = torch.rand(pick.shape, generator=gen) < p_hold
    return torch.where(hold, HOLD, pick)


def test_equity_identity_and_reward_sums_on_a_random_run(real):
    """At every step of a random run with every risk rule on: equity == cash + sum(units * close),
    sum over slots of the reward == log(E_t+1 / E_t), cash and units never negative, and the stats'
    return sums and maximum drawdown are those of the equity path."""
    market, tensors = real
    starts = torch.tensor([250, 300, 400, 500, 650, 800])
    n_steps = 400
    risk_cfg = RiskConfig(max_position=0.3, fixed_size=0.3, kelly_min_trades=5, kelly_window=10,
                          stop_loss=0.01, take_profit=0.02, trailing_stop=0.015, daily_loss_limit=0.03)
    # spot only: this is the spot identity (tests/test_strategies_env.py checks the one with every strategy on)
    env = BatchedTradingEnv(tensors, torch.arange(3).expand(6, 3), starts, n_steps, EnvConfig(strategies=["spot"]),
                            risk_cfg)
    env.reset()
    gen = torch.Generator().manual_seed(3)
    closes = torch.as_tensor(market.close)
    prev_equity = env.equity.clone()
    rets = []
    for k in range(1, n_steps + 1):
        _, reward, done = env.step(random_valid(env.mask, gen))
        close = closes[starts + k]  # [B, 3]: the bar each episode now stands at
        marked = env.cash + (env.units * close).sum(-1)
        torch.testing.assert_close(env.equity, marked, rtol=1e-12, atol=1e-9)
        log_ratio = torch.log(env.equity / prev_equity)
        torch.testing.assert_close(reward.sum(-1).double(), log_ratio, rtol=1e-5, atol=1e-7)
        assert (env.cash >= -1e-9).all() and (env.units >= 0).all()
        rets.append(env.equity / prev_equity - 1.0)
        prev_equity = env.equity.clone()
        assert done == (k == n_steps)
    rets = torch.stack(rets)
    path = torch.cumprod(torch.cat([torch.ones(1, 6, dtype=rets.dtype), 1.0 + rets]), dim=0)  # E_t / E_0
    drawdown = (1.0 - path / torch.cummax(path, dim=0).values).max(0).values
    torch.testing.assert_close(env.stats.max_drawdown, drawdown, rtol=1e-9, atol=1e-12)
    assert (drawdown > 0).all()
    assert env.stats.n_returns == n_steps
    torch.testing.assert_close(env.stats.ret_sum, rets.sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(env.stats.ret_sq_sum, (rets ** 2).sum(0), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(env.stats.equity, env.equity)
    assert (env.stats.trades > 5).all(), "the random run should have traded"
    assert (env.stats.costs > 0).all()


def test_costs_are_zero_without_fee_and_slippage(real):
    _, tensors = real
    env = BatchedTradingEnv(tensors, torch.arange(3).expand(4, 3), torch.tensor([250, 300, 350, 400]), 200,
                            EnvConfig(fee=0.0, slippage_bps=0.0, strategies=["spot"]), RiskConfig())  # LP gas is a cost
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        env.step(random_valid(env.mask, gen))
    assert (env.stats.trades > 0).all()
    assert env.stats.costs.tolist() == [0.0] * 4


# ==================================================================================== no look-ahead

CHANGED_FROM = 901  # bars >= this differ between the two markets


def altered_after(market: MarketData, first: int, seed: int = 5) -> MarketData:
    """A copy of market whose bars from `first` on have other prices (each bar scaled by a random factor,
    OHLC kept consistent) and other volumes."""
    rng = np.random.default_rng(seed)
    factor = np.ones((market.n_bars, market.n_pairs))
    factor[first:] = rng.uniform(0.7, 1.4, size=(market.n_bars - first, market.n_pairs))
    volume = market.volume.copy()
    volume[first:] = rng.uniform(0.0, 5.0, size=volume[first:].shape) * volume[first:].mean()
    return MarketData(exchange=market.exchange, pairs=list(market.pairs), timeframe=market.timeframe,
                      timestamps=market.timestamps.copy(), open=market.open * factor, high=market.high * factor,
                      low=market.low * factor, close=market.close * factor, volume=volume,
                      tradable=market.tradable.copy())


def test_features_of_a_truncated_series_equal_the_full_series_first_rows(real):
    market, _ = real
    columns = (market.timestamps, market.open, market.high, market.low, market.close, market.volume,
               market.tradable)
    full = compute_features(*columns)
    for cut in (WARMUP_BARS + 1, 700, CHANGED_FROM):
        part = compute_features(*(column[:cut] for column in columns))
        np.testing.assert_array_equal(part, full[:cut])
    changed = market_features(altered_after(market, CHANGED_FROM))
    np.testing.assert_array_equal(changed[:CHANGED_FROM], full[:CHANGED_FROM])
    assert not np.array_equal(changed[CHANGED_FROM], full[CHANGED_FROM])  # the change is visible at once


def test_changing_later_bars_changes_no_observation_action_or_fill_before_them(real):
    """Two markets identical up to bar 900. The same policy (an untrained network with seeded
    exploration) runs on both: every observation, action and the state after every fill up to bar 900 are
    identical; from bar 901 on they differ."""
    market, _ = real
    normalizer = Normalizer.fit(market_features(market), WARMUP_BARS, 800)
    altered = altered_after(market, CHANGED_FROM)
    a = MarketTensors.build(market, normalizer)
    b = MarketTensors.build(altered, normalizer)
    starts = torch.tensor([600, 700, 800, 850])
    n_steps = 150
    risk_cfg = RiskConfig(max_position=0.3, fixed_size=0.3, stop_loss=0.01, take_profit=0.02)
    traces = []
    for tensors in (a, b):
        torch.manual_seed(0)
        agent = DQNAgent(observation_size(tensors.n_features), N_ACTIONS, AgentConfig(hidden=16, buffer_size=16),
                         torch.device("cpu"), 1)
        env = BatchedTradingEnv(tensors, torch.arange(3).expand(4, 3), starts, n_steps, EnvConfig(), risk_cfg)
        obs = env.reset()
        trace = []
        for _ in range(n_steps):
            act = agent.act(obs.flatten(0, 1), env.mask.flatten(0, 1), 0.3).view(4, 3)
            trace.append((obs, act, env.cash.clone(), env.units.clone(), env.equity.clone()))
            obs, _, _ = env.step(act)
        traces.append(trace)
    compared = 0
    for k in range(n_steps):
        for e in range(4):
            t = int(starts[e]) + k
            (oa, aa, ca, ua, ea), (ob, ab, cb, ub, eb) = traces[0][k], traces[1][k]
            if t < CHANGED_FROM:
                assert torch.equal(oa[e], ob[e]), f"episode {e}: observation at bar {t} saw later bars"
                assert torch.equal(aa[e], ab[e])
                assert ca[e] == cb[e] and torch.equal(ua[e], ub[e]) and ea[e] == eb[e], f"fill at bar {t} differs"
                compared += 1
            elif t == CHANGED_FROM:
                assert not torch.equal(oa[e], ob[e]), "the altered bar must show in its own observation"
    assert compared > 300


def test_normalizer_ignores_validation_bars():
    market = load_market("binance", ["BTC/USDT", "ETH/USDT"]).slice(0, 3000)
    windows = split_windows(market, val_days=30)
    i_val = windows.val[0]
    fit = Normalizer.fit(market_features(market), WARMUP_BARS, i_val)
    # prices and volumes of every validation bar changed: the fitted statistics are the same, exactly
    refit = Normalizer.fit(market_features(altered_after(market, i_val)), WARMUP_BARS, i_val)
    assert refit.mean == fit.mean and refit.std == fit.std
    # the raw features of validation bars changed directly: the same
    raw = market_features(market)
    raw[i_val:] = 1e6
    direct = Normalizer.fit(raw, WARMUP_BARS, i_val)
    assert direct.mean == fit.mean and direct.std == fit.std
    # positive control: one more (training) bar changed does move the statistics
    moved = Normalizer.fit(market_features(altered_after(market, i_val - 1)), WARMUP_BARS, i_val)
    assert moved.mean != fit.mean


def test_normalizer_fit_by_hand():
    feats = np.arange(2 * 2 * 3, dtype=np.float32).reshape(4, 1, 3)  # [T=4, P=1, F=3]
    feats[:, :, 2] = 7.0  # a constant feature: std 0 -> 1 so it normalises to 0, never NaN
    n = Normalizer.fit(feats, 1, 3)  # rows 1 and 2: values (3, 4, 7) and (6, 7, 7)
    assert n.mean == [4.5, 5.5, 7.0]
    assert n.std == [1.5, 1.5, 1.0]
    out = n.apply(feats)
    assert out[1, 0].tolist() == [-1.0, -1.0, 0.0]
    assert Normalizer.from_dict(n.to_dict()) == n


# ========================================================================================= gap bars


def test_gap_bar_cancels_the_order_and_forbids_opens():
    """Bar 1 is a forward-filled gap: the open decided at bar 0 is cancelled (nothing filled, no cost),
    and at bar 1 the mask forbids opens; at the next real bar opens are allowed again."""
    market = make_market([flat(100), flat(100), flat(101), flat(102)], tradable=[True, False, True, True])
    env = make_env(market, quiet_risk(), EnvConfig(fee=FEE, slippage_bps=5.0))
    assert env.mask[0, 0, OPEN_LONG].item()
    env.step(actions(OPEN_LONG))
    assert env.units.item() == 0.0 and env.cash.item() == 10_000.0 and env.stats.costs.item() == 0.0
    assert not env.mask[0, 0, OPEN_LONG].item(), "no opens at a gap bar"
    env.step(actions(OPEN_LONG))  # refused by the mask
    assert env.units.item() == 0.0
    assert env.mask[0, 0, OPEN_LONG].item()


@pytest.mark.parametrize("rules, gap_bar, after_bar, exit_price", [
    # stop 98: the gap bar's (artificial) low 50 must not trigger it; the real bar 3 stays above it
    ({"stop_loss": 0.02}, (100, 100, 50, 99), (99, 100, 98.5, 99.5), None),
    # trailing 10%: the gap bar's high 200 must not lift the stop to 180; bar 3's low 95 is above 90
    ({"trailing_stop": 0.10}, (100, 200, 99, 100), (100, 101, 95, 100), None),
    # target 105: the gap bar's high 300 must not take profit
    ({"take_profit": 0.05}, (100, 300, 99, 100), (100, 101, 99, 100), None),
    # positive control: the same stop on bar 3 (a real bar) fires at 98
    ({"stop_loss": 0.02}, (100, 100, 99, 99), (99, 100, 97, 97), 98.0),
])
def test_gap_bar_triggers_no_stop_and_cancels_a_close(rules, gap_bar, after_bar, exit_price):
    bars = [flat(100), flat(100), gap_bar, after_bar, flat(100)]
    market = make_market(bars, tradable=[True, True, False, True, True])
    env = make_env(market, quiet_risk(**rules))
    env.step(actions(OPEN_LONG))  # bought 50 at 100
    env.step(actions(CLOSE))  # the close would fill at the gap bar: cancelled
    assert env.units.item() == 50.0 and env.cash.item() == 5000.0
    assert env.equity.item() == pytest.approx(5000 + 50 * gap_bar[3])  # still marked at the gap bar's close
    env.step(actions(HOLD))
    if exit_price is None:
        assert env.units.item() == 50.0
    else:
        assert env.units.item() == 0.0 and env.cash.item() == pytest.approx(5000 + 50 * exit_price)


# ============================================================================ determinism and resume


def small_config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.agent.algorithm = "dqn"
    cfg.data.pairs = ["BTC/USDT"]
    cfg.data.val_days = 10
    cfg.env.episode_bars = 300
    cfg.env.num_envs = 4
    cfg.agent.hidden = 32
    cfg.agent.batch_size = 32
    cfg.agent.learning_starts = 64
    cfg.agent.buffer_size = 4096  # 4 episodes x 299 steps fit; a small buffer is cheap to allocate
    cfg.agent.target_update = 50
    cfg.device = "cpu"
    return cfg


@pytest.fixture(scope="module")
def runs():
    """Four runs of 8 episodes (2 rounds of 4): seed 7 twice (the first capturing its resume state after
    round 1), seed 8, and seed 7 resumed from the captured state."""
    cfg = small_config()
    market = load_market("binance", cfg.data.pairs, start="2024-06-01", end="2025-06-01")
    windows = split_windows(market, cfg.data.val_days)
    states, rounds = [], []
    first = train_run(cfg, market, windows, seed=7, episodes=8, checkpoint_every=4, on_checkpoint=states.append,
                      on_round=rounds.append)
    again = train_run(cfg, market, windows, seed=7, episodes=8)
    other = train_run(cfg, market, windows, seed=8, episodes=8)
    resumed = train_run(cfg, market, windows, seed=7, episodes=8, resume=states[0]) if states else None
    return dict(market=market, windows=windows, first=first, again=again, other=other, resumed=resumed,
                states=states, rounds=rounds)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_run(runs):
    a, b = runs["first"], runs["again"]
    assert a.agent.grad_steps > 0
    assert a.val_metrics == b.val_metrics
    assert a.train_returns == b.train_returns
    assert same_weights(a.agent.model.state_dict(), b.agent.model.state_dict())


def test_different_seed_different_run(runs):
    a, c = runs["first"], runs["other"]
    assert not same_weights(a.agent.model.state_dict(), c.agent.model.state_dict())
    assert a.train_returns != c.train_returns


def test_resume_after_round_one_ends_where_the_uninterrupted_run_ends(runs):
    states = runs["states"]
    assert len(states) == 1 and states[0]["rounds_done"] == 1 and states[0]["episodes_done"] == 4
    a, r = runs["first"], runs["resumed"]
    assert r.episodes_trained == 8
    assert r.agent.grad_steps == a.agent.grad_steps
    assert same_weights(a.agent.model.state_dict(), r.agent.model.state_dict())
    assert same_weights(a.agent.target_model.state_dict(), r.agent.target_model.state_dict())
    assert r.train_returns == a.train_returns
    assert r.val_metrics == a.val_metrics


def test_training_epsilon_decays_over_the_run(runs):
    """2 rounds of 299 steps: 598 steps, decay over half of them (299). The last step of round 1 is step
    298: epsilon 1 + (0.05 - 1) * 298/299; round 2 ends at the final 0.05."""
    eps = [r["epsilon"] for r in runs["rounds"]]
    assert eps == [pytest.approx(1.0 + (0.05 - 1.0) * 298 / 299), pytest.approx(0.05)]
    assert eps[0] == epsilon_at(298, 598, 1.0, 0.05, 0.5)


def test_run_normalizer_fitted_on_training_bars_only(runs):
    market, windows = runs["market"], runs["windows"]
    expected = Normalizer.fit(market_features(market), max(windows.train[0], WARMUP_BARS), windows.train[1])
    assert runs["first"].normalizer == expected
    assert set(runs["first"].val_metrics["per_pair"]) == {"BTC/USDT"}
