"""The fused CPU kernel (nexlify.env.fused_portfolio, for spot alone and with the strategies beyond spot)
against the tensor step it stands in for.

Two environments on the same real candles, one with kernel="torch" (the reference) and one with
kernel="auto" (a fused kernel on the CPU), take the same actions step by step; every
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
from nexlify.env import batched, fused_portfolio, layout
from nexlify.env.batched import (
    ACTION_NAMES, CLOSE, HOLD, LEND, N_ACTIONS, NO_TRANSFER, OPEN_LONG, PNL_SOURCES, STATE_NAMES, WITHDRAW,
    BatchedTradingEnv,
)
from nexlify.env.market import MarketTensors, market_features
from nexlify.features import WARMUP_BARS, Normalizer
from nexlify.strategies import arbitrage
from nexlify.strategies.params import AaveParams, ArbParams, StakedAsset, StakingParams, StrategyParams
from tests.helpers_market import actions, binance_with_coinbase, flat, make_market, quiet_risk

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


def pair_of_envs(tensors, risk_cfg, env_cfg, starts, n_steps, pair_idx=None, params=None):
    pair_idx = torch.arange(3).expand(len(starts), 3) if pair_idx is None else pair_idx
    ref, fast = (BatchedTradingEnv(tensors, pair_idx, starts, n_steps, dataclasses.replace(env_cfg, kernel=kernel),
                                   risk_cfg, params) for kernel in ("torch", "auto"))
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


def run_side_by_side(ref, fast, n_steps, seed, rtol, atol, obs_atol, reward_atol=1e-9, p_hold=0.0, p_wild=0.2,
                     wild_every=1):
    """Steps both environments with the same actions and compares every output and every piece of state
    after each step. Actions: random valid ones, a share p_hold of them turned into hold (so that positions
    live a while), and every wild_every-th step a share p_wild replaced by any action (the invalid ones must
    turn into hold in both). Returns how often each valid action was taken and how many slot-steps saw the
    rarer strategy states."""
    assert ref._fused is None and fast._fused is not None
    portfolio = isinstance(fast._fused, fused_portfolio.FusedPortfolioStep)
    assert torch.equal(ref.reset(), fast.reset())
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(N_ACTIONS, dtype=torch.int64)
    seen = dict.fromkeys(("transfer", "pending_exit", "staked_and_unbonding"), 0)
    for k in range(n_steps):
        act = torch.where(ref.mask, torch.rand(ref.mask.shape, generator=gen), -1.0).argmax(-1)
        if p_hold:
            act = torch.where(torch.rand(act.shape, generator=gen) < p_hold, HOLD, act)
        if k % wild_every == 0:
            act = torch.where(torch.rand(act.shape, generator=gen) < p_wild,
                              torch.randint(0, N_ACTIONS, act.shape, generator=gen), act)
        counts += torch.bincount(act[ref.mask.gather(-1, act.unsqueeze(-1)).squeeze(-1)], minlength=N_ACTIONS)
        obs_ref, reward_ref, done_ref = ref.step(act)
        obs_fast, reward_fast, done_fast = fast.step(act)
        where = f"step {k + 1}"
        assert done_ref == done_fast, where
        torch.testing.assert_close(obs_fast, obs_ref, rtol=1e-6, atol=obs_atol, msg=lambda m: f"{where}: obs: {m}")
        torch.testing.assert_close(reward_fast, reward_ref, rtol=1e-5, atol=reward_atol,
                                   msg=lambda m: f"{where}: reward: {m}")
        assert_same(ref, fast, rtol, atol, where)
        if portfolio:
            assert_same_portfolio(ref, fast, rtol, atol, where)
            seen["transfer"] += int((ref.arb_inventory["transfer_due"] != NO_TRANSFER).sum())
            seen["pending_exit"] += int(ref.exit_pending.sum())
            seen["staked_and_unbonding"] += int(((ref.staked_units > 0) & (ref.unbonding_units > 0)).sum())
    return counts, seen


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
    run_side_by_side(ref, fast, 350, seed=11, rtol=1e-12, atol=1e-9, obs_atol=1e-6)
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
    assert isinstance(spot._fused, fused_portfolio.FusedPortfolioStep) and fused_portfolio.available()
    assert spot._fused.groups == fused_portfolio.SPOT_GROUPS  # spot alone packs the spot trade's rows only
    reference = BatchedTradingEnv(tensors, torch.arange(3).expand(1, 3), starts, 10,
                                  EnvConfig(strategies=["spot"], kernel="torch"), RiskConfig())
    assert reference._fused is None
    every = BatchedTradingEnv(tensors, torch.arange(3).expand(1, 3), starts, 10, EnvConfig(), RiskConfig())
    assert isinstance(every._fused, fused_portfolio.FusedPortfolioStep)  # strategies beyond spot
    every_ref = BatchedTradingEnv(tensors, torch.arange(3).expand(1, 3), starts, 10, EnvConfig(kernel="torch"),
                                  RiskConfig())
    assert every_ref._fused is None


def test_the_layout_names_every_offset_and_the_kernels_number_as_the_environment_does():
    """nexlify.env.layout is the one source of the ids and offsets: each action has its id, each state field
    its offset S_<NAME> (its place in STATE_NAMES), each PnL source its row PNL_<NAME>; the kernels and the
    environment use the same numbers."""
    for i, name in enumerate(layout.ACTION_NAMES):
        assert getattr(layout, {"arbitrage": "ARB"}.get(name, name.upper())) == i, name
    for i, name in enumerate(layout.STATE_NAMES):
        assert getattr(layout, "S_SPREAD" if name == arbitrage.SPREAD_FEATURE else "S_" + name.upper()) == i, name
    for i, name in enumerate(layout.PNL_SOURCES):
        assert getattr(layout, "PNL_" + name.upper()) == i, name
    assert layout.PNL_SOURCES[-1] == "fees_and_gas"  # the tensor step writes the costs into pnl_rows[-1]
    names = ("HOLD", "OPEN_LONG", "CLOSE", "STAKE", "UNSTAKE", "LP_OPEN", "LP_CLOSE", "LEND", "WITHDRAW", "ARB",
             "ARB_CLOSE", "NO_LOT", "NO_TRANSFER")
    assert [getattr(fused_portfolio, n) for n in names] == [getattr(batched, n) for n in names]
    assert [getattr(batched, n) for n in names] == [getattr(layout, n) for n in names]
    assert (batched.NO_LOT, batched.NO_TRANSFER) == (-1, 2 ** 62)
    assert layout.N_SPOT_STATE == len(batched.SPOT_STATE_NAMES) == 11
    assert set(fused_portfolio.SLOT_FLOATS) <= set(vars(BatchedTradingEnv(
        binance_with_coinbase(), torch.zeros((1, 1), dtype=torch.int64), torch.tensor([800]), 1, EnvConfig(),
        RiskConfig())))


def test_the_kernel_cache_name_digests_every_source_the_kernel_compiles_in():
    """numba's disk cache checks only the kernel's own file: the build's name carries a digest of every nexlify
    module the kernel's module imports (the layout's offsets and the tables' rows are compiled in)."""
    sources = {p.name for p in fused_portfolio.kernel_sources("nexlify.env.fused_portfolio")}
    assert {"fused_portfolio.py", "layout.py", "strategy_tables.py", "staking.py", "arbitrage.py"} <= sources
    assert "batched.py" not in sources  # the kernel does not import the environment


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
    n = fused_portfolio.PARALLEL_MIN_SLOTS // 3 + 100
    starts = torch.arange(250, 250 + n) % 900 + 250
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, fast = pair_of_envs(tensors, BUSY_RISK, EnvConfig(strategies=["spot"]), starts, 80)
        assert fast._fused.parallel and fast._fused.kernel is fused_portfolio._compiled[("_portfolio_kernel", True)]
        run_side_by_side(ref, fast, 80, seed=2, rtol=1e-12, atol=1e-9, obs_atol=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert ref.stats.trades.sum() > n


# ============================================================== every strategy: nexlify.env.fused_portfolio

ALL = ["spot", "staking", "lp", "lending", "arbitrage"]
PORTFOLIO_STATE = STATE + ("staked_units", "unbonding_units", "release_bar", "exit_pending", "lp_liquidity",
                           "lp_fees_accrued", "lp_value", "lent", "slot_value")
# arbitrage fees low enough that books fund and trade on real spreads; staking with short unbonding delays
# and partial stakes and unstakes (so that a slot holds free, staked and unbonding coins at once); small
# arbitrage trades that leave books part-used, so that the rebalancing threshold decides
BUSY_PARAMS = StrategyParams(
    arbitrage=ArbParams(taker_fee_a=0.0, taker_fee_b=0.0002, min_edge_bps=0.0, rebalance_notional_usd=1e7,
                        rebalance_below=0.3, max_notional_usd=150.0,
                        rebalance_delay_hours={"BTC": 2.0, "ETH": 1.0, "SOL": 3.0}),
    staking=StakingParams(assets={"ETH": StakedAsset(0.05, 365.0, 5.0), "SOL": StakedAsset(0.07, 182.5, 2.0)},
                          stake_fraction=0.5, unstake_fraction=0.5))
PORTFOLIO_ACTIONS = {"p_hold": 0.5, "p_wild": 0.3, "wild_every": 10}
BUSY_PORTFOLIO_RISK = RiskConfig(max_position=0.2, fixed_size=0.2, kelly_min_trades=5, kelly_window=10,
                                 stop_loss=0.01, take_profit=0.02, trailing_stop=0.015, daily_loss_limit=0.03,
                                 max_trades=5)


@pytest.fixture(scope="module")
def venues() -> MarketTensors:
    return binance_with_coinbase()


def assert_same_portfolio(ref: BatchedTradingEnv, fast: BatchedTradingEnv, rtol: float, atol: float,
                          where: str) -> None:
    for name in PORTFOLIO_STATE:
        a, b = getattr(ref, name), getattr(fast, name)
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {name}: {m}")
    for name, (a, b) in {"lp_range": (ref.lp_range, fast.lp_range),
                         "lp_amounts_at_open": (ref.lp_amounts_at_open, fast.lp_amounts_at_open)}.items():
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {name}: {m}")
    inv_ref, inv_fast = ref.arb_inventory, fast.arb_inventory
    for name in inv_ref:
        torch.testing.assert_close(inv_fast[name], inv_ref[name], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{where}: arb_inventory[{name}]: {m}")


def assert_every_action_taken(counts: torch.Tensor, sweep: bool) -> None:
    """Every action but hold was taken; with the sweep, LEND and WITHDRAW never (they are masked)."""
    by_hand = [LEND, WITHDRAW]
    taken = dict(zip(ACTION_NAMES, counts.tolist()))
    rest = [a for a in range(1, len(ACTION_NAMES)) if not (sweep and a in by_hand)]
    assert (counts[rest] > 0).all(), f"every action was taken: {taken}"
    if sweep:
        assert counts[by_hand].sum() == 0, f"the sweep masks LEND and WITHDRAW: {taken}"


@pytest.mark.parametrize("risk_cfg, sweep", [(BUSY_PORTFOLIO_RISK, True), (BUSY_PORTFOLIO_RISK, False),
                                             (RiskConfig(), True)], ids=["busy", "busy-lend-by-hand", "defaults"])
def test_fused_portfolio_step_matches_the_tensor_step_with_every_strategy(venues, risk_cfg, sweep):
    """Every action of every strategy is taken and every PnL source moves, and the kernel agrees with the
    tensor step on every output and every piece of state to float64 rounding; lending by the sweep and by
    hand."""
    starts = torch.tensor([700, 760, 900, 1000, 1010, 1200])
    env_cfg = EnvConfig(drawdown_penalty=0.5)
    params = dataclasses.replace(BUSY_PARAMS, aave=AaveParams(sweep=sweep))
    ref, fast = pair_of_envs(venues, risk_cfg, env_cfg, starts, 450, params=params)
    counts, seen = run_side_by_side(ref, fast, 450, seed=11, rtol=1e-12, atol=1e-9, obs_atol=1e-6,
                                    **PORTFOLIO_ACTIONS)
    assert_every_action_taken(counts, sweep)
    assert min(seen.values()) > 0, f"the rarer states occurred: {seen}"
    moved = ref.stats.pnl.abs().sum(0)
    assert (moved > 0).all(), f"every PnL source moved: {dict(zip(PNL_SOURCES, moved.tolist()))}"
    assert (ref.stats.trades >= 20).all()


ACTION_OWNER = {"open_long": "spot", "close": "spot", "stake": "staking", "unstake": "staking", "lp_open": "lp",
                "lp_close": "lp", "lend": "lending", "withdraw": "lending", "arbitrage": "arbitrage",
                "arb_close": "arbitrage"}


@pytest.mark.parametrize("strategies", [
    ["spot", "staking", "lending"],  # no LP and no arbitrage: entries scaled as with spot alone
    ["spot", "lp"],
    ["spot", "arbitrage"],
    ["lp", "lending", "arbitrage"],  # no spot trades at all
], ids=lambda s: "+".join(s))
def test_fused_portfolio_step_matches_with_some_strategies_on(venues, strategies):
    starts = torch.tensor([700, 900, 1100])
    ref, fast = pair_of_envs(venues, BUSY_PORTFOLIO_RISK, EnvConfig(strategies=strategies), starts, 300,
                             params=BUSY_PARAMS)
    counts, _ = run_side_by_side(ref, fast, 300, seed=3, rtol=1e-12, atol=1e-9, obs_atol=1e-6,
                                 **PORTFOLIO_ACTIONS)
    off = [ACTION_NAMES.index(a) for a, on in ACTION_OWNER.items() if on not in strategies]
    assert counts[off].sum() == 0, "the actions of strategies that are off are masked"
    assert ref.stats.trades.sum() > 0




def test_fused_portfolio_step_in_float32_with_one_pair_per_episode(venues):
    """float32 accounting in validation's layout (one episode per pair). The kernel computes in float64 and
    stores float32, the tensor step computes in float32, so the two agree to float32 rounding in a step, but
    a decision on a number that float32 leaves at dust (cash spent to the last cent, then `cash > 0`) may
    differ and their paths part. So every step starts both from the reference's state (which also checks
    that the kernel packs a state it did not write itself)."""
    starts = torch.tensor([800, 800, 800])
    ref, fast = pair_of_envs(venues, BUSY_PORTFOLIO_RISK, EnvConfig(precision="float32"), starts, 300,
                             pair_idx=torch.tensor([[0], [1], [2]]), params=BUSY_PARAMS)
    ref.reset()
    gen = torch.Generator().manual_seed(5)
    for k in range(300):
        fused_portfolio.copy_step_state(ref, fast)
        act = torch.where(ref.mask, torch.rand(ref.mask.shape, generator=gen), -1.0).argmax(-1)
        act = torch.where(torch.rand(act.shape, generator=gen) < 0.5, HOLD, act)
        (obs_ref, reward_ref, _), (obs_fast, reward_fast, _) = ref.step(act), fast.step(act)
        where = f"step {k + 1}"
        torch.testing.assert_close(obs_fast, obs_ref, rtol=1e-4, atol=1e-3, msg=lambda m: f"{where}: obs: {m}")
        torch.testing.assert_close(reward_fast, reward_ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{where}: reward: {m}")
        assert_same(ref, fast, 1e-5, 1e-2, where)  # a cent: float32 rounding of a 10,000 portfolio
        assert_same_portfolio(ref, fast, 1e-5, 1e-2, where)
    assert ref.stats.trades.sum() > 10


def test_observe_after_a_fused_portfolio_step_gathers_the_tables_at_the_new_bar(venues):
    """The kernel does not leave the tables' rows of the new bar in the environment; observe() fetches them
    when asked, so it returns what the step returned (spread, edge, APY and utilization included)."""
    starts = torch.tensor([900, 950])
    ref, fast = pair_of_envs(venues, BUSY_PORTFOLIO_RISK, EnvConfig(), starts, 30, params=BUSY_PARAMS)
    fast.reset()
    for _ in range(30):
        obs, _, _ = fast.step(torch.zeros((2, 3), dtype=torch.int64))
        assert fast._strategy_rows_stale
        assert torch.equal(fast.observe(), obs)
    spread = fast.obs_size - len(STATE_NAMES) + STATE_NAMES.index(arbitrage.SPREAD_FEATURE)
    assert obs[..., spread].abs().sum() > 0


def test_the_threaded_portfolio_kernel_matches_the_tensor_step_on_a_large_batch(venues):
    n = fused_portfolio.PARALLEL_MIN_SLOTS // 3 + 100
    starts = torch.arange(n) % 500 + 700
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, fast = pair_of_envs(venues, BUSY_PORTFOLIO_RISK, EnvConfig(), starts, 60, params=BUSY_PARAMS)
        assert fast._fused.parallel
        counts, _ = run_side_by_side(ref, fast, 60, seed=2, rtol=1e-12, atol=1e-9, obs_atol=1e-6,
                                     **PORTFOLIO_ACTIONS)
    finally:
        torch.set_num_threads(threads)
    assert_every_action_taken(counts, sweep=True)
