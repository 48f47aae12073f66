"""The fused CPU kernel (nexlify.env.fused) against the tensor step it stands in for.

Two environments on the same real candles, one with kernel="torch" (the reference) and one with
kernel="auto" (the fused kernel: spot alone on the CPU), take the same actions step by step; every
output (observation, reward, done, mask) and every piece of state and statistics must agree. Random
actions include invalid ones (they must turn into hold in both), and the risk settings are chosen so
that every rule fires many times in a few hundred steps: stops, targets, the trailing stop, the daily
loss limit, the concurrent-trade cap, cash running short, and the Kelly window filling and evicting.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nexlify.config import EnvConfig, RiskConfig
from nexlify.data.candles import load_market
from nexlify.env import fused
from nexlify.env.batched import CLOSE, N_ACTIONS, OPEN_LONG, BatchedTradingEnv
from nexlify.env.market import MarketTensors, market_features
from nexlify.features import WARMUP_BARS, Normalizer
from tests.helpers_market import actions, flat, make_market, quiet_risk

STATE = ("cash", "equity", "peak", "day_start_equity", "size", "blocked", "t", "units", "entry", "highest",
         "close_now", "in_position", "mask", "trade_head")
STATS = ("equity", "ret_sum", "ret_sq_sum", "max_drawdown", "trades", "wins", "costs", "pnl_rows")

BUSY_RISK = RiskConfig(stop_loss=0.004, take_profit=0.006, trailing_stop=0.005, daily_loss_limit=0.004,
                       max_trades=2, max_position=0.6, fixed_size=0.6, kelly=True, kelly_window=6,
                       kelly_min_trades=3, kelly_fraction=0.5, kelly_floor=0.05)


@pytest.fixture(scope="module")
def tensors() -> MarketTensors:
    market = load_market("binance", ["BTC/USDT", "ETH/USDT", "SOL/USDT"]).slice(0, 1500)
    raw = market_features(market)
    return MarketTensors.build(market, Normalizer.fit(raw, WARMUP_BARS, 1000), "cpu", raw)


def pair_of_envs(tensors, risk_cfg, env_cfg, starts, n_steps, pair_idx=None):
    pair_idx = torch.arange(3).expand(len(starts), 3) if pair_idx is None else pair_idx
    ref = BatchedTradingEnv(tensors, pair_idx, starts, n_steps, dataclasses.replace(env_cfg, kernel="torch"), risk_cfg)
    fast = BatchedTradingEnv(tensors, pair_idx, starts, n_steps, dataclasses.replace(env_cfg, kernel="auto"), risk_cfg)
    return ref, fast


def assert_same(ref: BatchedTradingEnv, fast: BatchedTradingEnv, rtol: float, atol: float, where: str) -> None:
    for name in STATE:
        a, b = getattr(ref, name), getattr(fast, name)
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {name}: {m}")
    for name in STATS:
        a, b = getattr(ref.stats, name), getattr(fast.stats, name)
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{where}: stats.{name}: {m}")
    for a, b in zip(ref.kelly_sums, fast.kelly_sums):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{where}: kelly sums: {m}")
    window = ref.trade_ring.shape[1] - 1  # the last column is the ring's spare slot, not a trade
    torch.testing.assert_close(fast.trade_ring[:, :window], ref.trade_ring[:, :window], rtol=rtol, atol=atol)
    assert ref.stats.n_returns == fast.stats.n_returns and ref.steps_done == fast.steps_done


def run_side_by_side(ref, fast, n_steps, seed, rtol, atol, obs_atol, reward_atol=1e-9):
    assert ref._fused is None and fast._fused is not None
    obs_ref, obs_fast = ref.reset(), fast.reset()
    assert torch.equal(obs_ref, obs_fast)
    gen = torch.Generator().manual_seed(seed)
    for k in range(n_steps):
        # mostly valid actions, some invalid ones (those hold), some hold
        noise = torch.rand(ref.mask.shape, generator=gen)
        pick = torch.where(ref.mask, noise, -1.0).argmax(-1)
        wild = torch.randint(0, N_ACTIONS, pick.shape, generator=gen)
        act = torch.where(torch.rand(pick.shape, generator=gen) < 0.2, wild, pick)
        obs_ref, reward_ref, done_ref = ref.step(act)
        obs_fast, reward_fast, done_fast = fast.step(act)
        where = f"step {k + 1}"
        assert done_ref == done_fast, where
        torch.testing.assert_close(obs_fast, obs_ref, rtol=1e-6, atol=obs_atol, msg=lambda m: f"{where}: obs: {m}")
        torch.testing.assert_close(reward_fast, reward_ref, rtol=1e-5, atol=reward_atol,
                                   msg=lambda m: f"{where}: reward: {m}")
        assert_same(ref, fast, rtol, atol, where)
    return ref


@pytest.mark.parametrize("risk_cfg", [
    BUSY_RISK,
    dataclasses.replace(BUSY_RISK, kelly=False, trailing_stop=0.0, daily_loss_limit=0.0, max_trades=3),
    dataclasses.replace(BUSY_RISK, stop_loss=0.0, take_profit=0.0, max_trades=1),
    RiskConfig(),
], ids=["busy", "no-kelly-no-trailing", "trailing-only", "defaults"])
def test_fused_step_matches_the_tensor_step_in_float64(tensors, risk_cfg):
    starts = torch.tensor([250, 251, 300, 480, 700, 900, 1000, 1100])
    env_cfg = EnvConfig(strategies=["spot"], drawdown_penalty=0.5)
    ref, fast = pair_of_envs(tensors, risk_cfg, env_cfg, starts, 350)
    ref = run_side_by_side(ref, fast, 350, seed=11, rtol=1e-12, atol=1e-9, obs_atol=1e-6)
    assert (ref.stats.trades >= 20).all(), "the run must exercise the rules"
    if risk_cfg is BUSY_RISK:
        assert (ref.stats.trades > 2 * risk_cfg.kelly_window).all()  # the Kelly window evicts old trades


def test_fused_step_matches_in_float32_and_with_one_pair_per_episode(tensors):
    """Validation's layout (one episode per pair, one slot each) and float32 accounting (the kernel
    computes in float64 and stores float32: agreement to float32 rounding)."""
    starts = torch.tensor([300, 300, 300])
    env_cfg = EnvConfig(strategies=["spot"], precision="float32")
    ref, fast = pair_of_envs(tensors, BUSY_RISK, env_cfg, starts, 300, pair_idx=torch.tensor([[0], [1], [2]]))
    run_side_by_side(ref, fast, 300, seed=5, rtol=2e-4, atol=1e-2, obs_atol=1e-3, reward_atol=1e-6)


def test_kernel_choice_follows_the_config_device_and_strategies(tensors):
    starts = torch.tensor([300])
    spot = BatchedTradingEnv(tensors, torch.arange(3).expand(1, 3), starts, 10, EnvConfig(strategies=["spot"]),
                             RiskConfig())
    assert spot._fused is not None and fused.available()
    reference = BatchedTradingEnv(tensors, torch.arange(3).expand(1, 3), starts, 10,
                                  EnvConfig(strategies=["spot"], kernel="torch"), RiskConfig())
    assert reference._fused is None
    every = BatchedTradingEnv(tensors, torch.arange(3).expand(1, 3), starts, 10, EnvConfig(), RiskConfig())
    assert every._fused is None  # strategies beyond spot: the tensor step


def test_fused_step_by_hand_and_earlier_tensors_keep_their_values():
    """The hand-computed round trip of tests/test_env.py on the fused kernel, and the state a caller kept
    from an earlier step is not overwritten by the next one."""
    market = make_market([flat(100), (100, 110, 95, 105), (108, 112, 104, 110), flat(110)])
    env = BatchedTradingEnv(market, torch.zeros((1, 1), dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 3,
                            EnvConfig(fee=0.001, slippage_bps=5.0, strategies=["spot"]), quiet_risk())
    assert env._fused is not None
    units = 5000 / 100.05
    env.step(actions(OPEN_LONG))
    kept_units, kept_cash = env.units, env.cash
    assert env.units.item() == pytest.approx(units, abs=1e-12)
    assert env.cash.item() == pytest.approx(4995.0, abs=1e-9)
    env.step(actions(CLOSE))
    gross = units * 108 * (1 - 0.0005)
    assert env.units.item() == 0.0 and env.cash.item() == pytest.approx(4995.0 + gross * 0.999, abs=1e-9)
    assert kept_units.item() == pytest.approx(units, abs=1e-12) and kept_cash.item() == pytest.approx(4995.0)
    assert env.stats.trades.item() == 1 and env.stats.wins.item() == 1


def test_the_threaded_kernel_matches_the_tensor_step_on_a_large_batch(tensors):
    """Past PARALLEL_MIN_SLOTS slots with two threads the kernel runs its episodes on a thread pool."""
    n = fused.PARALLEL_MIN_SLOTS // 3 + 100
    starts = torch.arange(250, 250 + n) % 900 + 250
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, fast = pair_of_envs(tensors, BUSY_RISK, EnvConfig(strategies=["spot"]), starts, 80)
        assert fast._fused.kernel is fused._compiled[True]
        ref = run_side_by_side(ref, fast, 80, seed=2, rtol=1e-12, atol=1e-9, obs_atol=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert ref.stats.trades.sum() > n
