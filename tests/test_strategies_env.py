"""The strategies beyond spot THROUGH the environment: staking, Uniswap V3 liquidity, Aave lending and
cross-exchange arbitrage on hand-made markets whose every number is computed here on paper (with `math`,
from the published formulas, never by calling the code under test a second way); masking in the agent's
acting and in its Q-target; the risk caps across strategies; the equity identity, the per-slot rewards and
the PnL breakdown on a random run over real candles with every strategy on; the second venue's data from
the file to the pipeline's snapshot.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from controller.config import PipelineConfig
from controller.pipeline import Pipeline
from controller.stores.local import LocalStore
from controller.worker import fetch_snapshot, load_train_config
from nexlify.agent.dqn import NEG_INF, DQNAgent
from nexlify.config import AgentConfig, EnvConfig, RiskConfig, TrainConfig
from nexlify.configtools import apply_mapping, from_dict, to_dict, validate_tree
from nexlify.data.candles import load_market, write_candles
from nexlify.data.second_venue import load_second_venue, second_venue_pair
from nexlify.env.batched import (
    ACTION_NAMES, ARB, ARB_CLOSE, CLOSE, HOLD, LEND, LP_CLOSE, LP_OPEN, N_ACTIONS, OPEN_LONG, PNL_SOURCES, STAKE,
    STATE_NAMES, UNSTAKE, WITHDRAW, BatchedTradingEnv,
)
from nexlify.env import risk
from nexlify.env.market import MS_PER_DAY, MarketTensors
from nexlify.errors import InputError
from nexlify.evaluation import evaluate_policy
from nexlify.metrics import average_metrics, pair_metrics
from nexlify.strategies.params import AaveParams, ArbParams, LPParams, StakedAsset, StakingParams, StrategyParams
from nexlify.strategies.uniswap_v3 import open_symmetric
from tests.helpers_market import (  # noqa: F401  (step_kernel: a fixture)
    actions, binance_with_coinbase, flat, make_market, quiet_risk, step_kernel,
)

ALL = ["spot", "staking", "lp", "lending", "arbitrage"]


pytestmark = pytest.mark.usefixtures("step_kernel")  # every test on the fused kernel and on the tensor step
H = 3_600_000
NO_GAS = LPParams(gas_price_gwei=0.0)


def env_for(market: MarketTensors, strategies: list[str], params: StrategyParams | None = None, *,
            risk: RiskConfig | None = None, episodes: int = 1, fee: float = 0.0, slippage_bps: float = 0.0,
            **env_overrides) -> BatchedTradingEnv:
    """Every pair of `market` in each of `episodes` identical episodes, from bar 0 to the last bar."""
    n_pairs = len(market.pairs)
    cfg = EnvConfig(fee=fee, slippage_bps=slippage_bps, initial_equity=10_000.0, strategies=strategies,
                    **env_overrides)
    return BatchedTradingEnv(market, torch.arange(n_pairs).expand(episodes, n_pairs),
                             torch.zeros(episodes, dtype=torch.int64), market.n_bars - 1, cfg,
                             risk or quiet_risk(), params or StrategyParams())


def with_second_venue(market: MarketTensors, bars, available=None) -> MarketTensors:
    """Attach the second venue's OHLC ([T] for one pair or [T][P]); NaN rows are bars it has no candle for."""
    prices = np.asarray(bars, dtype=np.float64)
    if prices.ndim == 2:
        prices = prices[:, None, :]
    avail = ~np.isnan(prices).any(-1) if available is None else np.asarray(available, dtype=bool).reshape(
        prices.shape[:2])
    market.venue2_prices = torch.as_tensor(prices)
    market.venue2_available = torch.as_tensor(avail)
    return market


def mark(env: BatchedTradingEnv, close: torch.Tensor) -> torch.Tensor:
    """equity from the public views, the identity written out: cash + coins * close + LP value (the V3
    whitepaper's three cases, by hand) + accrued fees + Aave supply + both venues' books."""
    pa, pb = env.lp_range
    L = env.lp_liquidity
    p = torch.minimum(torch.maximum(close, pa), pb)
    lp_value = L * (1 / p.sqrt() - 1 / pb.sqrt()) * close + L * (p.sqrt() - pa.sqrt())
    inv = env.arb_inventory
    coins = env.units + env.staked_units + env.unbonding_units + inv["coin_a"] + inv["coin_b"] + inv["transit_coin"].abs()
    other = lp_value + env.lp_fees_accrued + env.lent + inv["quote_a"] + inv["quote_b"] + inv["transit_quote"].abs()
    return env.cash + (coins * close + other).sum(-1)


def v3_value(L: float, p: float, pa: float, pb: float) -> float:
    """The whitepaper's amounts, case by case, valued at p."""
    if p <= pa:
        return L * (1 / math.sqrt(pa) - 1 / math.sqrt(pb)) * p
    if p >= pb:
        return L * (math.sqrt(pb) - math.sqrt(pa))
    return L * (1 / math.sqrt(p) - 1 / math.sqrt(pb)) * p + L * (math.sqrt(p) - math.sqrt(pa))


# =============================================================================================== Uniswap V3


@pytest.mark.parametrize("close, case", [(80.0, "below"), (105.0, "inside"), (120.0, "above")])
def test_lp_position_value_below_inside_above_the_range(close, case):
    """5,000 (size 50% of 10,000) on +-10% around the open 100: [90, 110]. L = 5000 / value(L=1, 100).
    Marked at the close: the V3 value of that L; impermanent loss = value - holding the opening amounts;
    the spot bucket = the opening coins' price move; no fee, gas or volume."""
    market = make_market([flat(100), (100, max(100, close), min(100, close), close), flat(close)],
                         pairs=["ETH/USDT"], volume=[0.0, 0.0, 0.0])
    env = env_for(market, ["lp"], StrategyParams(lp=NO_GAS))
    assert env.mask[0, 0, LP_OPEN] and not env.mask[0, 0, LP_CLOSE]
    env.step(actions(LP_OPEN))
    L = 5000.0 / v3_value(1.0, 100.0, 90.0, 110.0)
    x0 = L * (1 / math.sqrt(100) - 1 / math.sqrt(110))
    y0 = L * (math.sqrt(100) - math.sqrt(90))
    assert x0 * 100 + y0 == pytest.approx(5000.0)
    value = v3_value(L, close, 90.0, 110.0)
    pa, pb = env.lp_range
    assert (pa.item(), pb.item()) == (pytest.approx(90.0), pytest.approx(110.0))
    assert env.lp_liquidity.item() == pytest.approx(L, rel=1e-12)
    assert env.lp_value.item() == pytest.approx(value, rel=1e-12)
    assert env.cash.item() == pytest.approx(5000.0)
    assert env.equity.item() == pytest.approx(5000.0 + value, rel=1e-12)
    if case == "below":  # all coin: x at pa
        assert value == pytest.approx(L * (1 / math.sqrt(90) - 1 / math.sqrt(110)) * close)
    if case == "above":  # all quote
        assert value == pytest.approx(L * (math.sqrt(110) - math.sqrt(90)))
    if case == "inside":  # the closed form of the loss inside the range: -L (sqrt(p1) - sqrt(p0))^2 / sqrt(p0)
        assert value - (x0 * close + y0) == pytest.approx(-L * (math.sqrt(close) - 10.0) ** 2 / 10.0, rel=1e-9)
    pnl = env.stats.pnl_breakdown(0)
    assert pnl["impermanent_loss"] == pytest.approx(value - (x0 * close + y0), rel=1e-9, abs=1e-9)
    assert pnl["spot"] == pytest.approx(x0 * (close - 100.0), rel=1e-12)
    assert pnl["total"] == pytest.approx(env.equity.item() - 10_000.0, abs=1e-8)
    assert env.mask[0, 0, LP_CLOSE] and not env.mask[0, 0, LP_OPEN]


def test_lp_open_in_closed_form_equals_the_whitepaper_path():
    """open_symmetric (one square root) gives the L and amounts of liquidity_for_value + amounts."""
    for width in (0.05, 0.10, 0.25):
        pos = open_symmetric(torch.tensor(7_000.0, dtype=torch.float64), torch.tensor(2_500.0, dtype=torch.float64),
                             width)
        pa, pb = 2500 * (1 - width), 2500 * (1 + width)
        L = 7000.0 / v3_value(1.0, 2500.0, pa, pb)
        assert pos.L.item() == pytest.approx(L, rel=1e-12)
        assert pos.x.item() == pytest.approx(L * (1 / 50 - 1 / math.sqrt(pb)), rel=1e-12)
        assert pos.y.item() == pytest.approx(L * (50 - math.sqrt(pa)), rel=1e-12)
        assert (pos.sqrt_pa.item() ** 2, pos.sqrt_pb.item() ** 2) == (pytest.approx(pa), pytest.approx(pb))


def test_lp_fee_income_on_a_constructed_bar_then_close_with_costs():
    """Fee tier 0.3%, DEX share 10%, pool TVL 1,000,000 spread over +-10%. Bar 1: opens 100, high 115, low 98,
    close 108, volume 1,000 coins: pool volume 1000 * 108 * 0.1 = 10,800; in range for the part of [98, 115]
    inside [90, 110]: 12 / 17; our share L / (L + pool L at 108). Bar 2 closes the position at its open 108
    with fee 0.1% + 5 bps slippage on the coin share and gas on both ends."""
    lp = LPParams(fee_tier=0.003, dex_volume_share=0.1, pool_tvl_usd=1_000_000.0, pool_range_width=0.1,
                  gas_price_gwei=5.0, eth_usd_for_gas=2_000.0)
    market = make_market([flat(100), (100, 115, 98, 108), flat(108), flat(108)], pairs=["ETH/USDT"],
                         volume=[0.0, 1000.0, 0.0, 0.0])
    env = env_for(market, ["lp"], StrategyParams(lp=lp), fee=0.001, slippage_bps=5.0)
    env.step(actions(LP_OPEN))
    gas_open, gas_close = 434_903 * 5e-9 * 2000, 178_028 * 5e-9 * 2000  # 4.349, 1.780 USD
    L = 5000.0 / v3_value(1.0, 100.0, 90.0, 110.0)
    x0 = L * (1 / 10 - 1 / math.sqrt(110))
    y0 = L * (10 - math.sqrt(90))
    swap_in = x0 * 100 * (0.001 + 0.0005)  # the coin share is bought at the spot fee and slippage
    assert env.cash.item() == pytest.approx(10_000 - 5000 - swap_in - gas_open, rel=1e-12)
    pool_L = 1_000_000.0 / v3_value(1.0, 108.0, 97.2, 118.8)
    fees = 0.003 * (1000 * 108 * 0.1) * (12 / 17) * L / (L + pool_L)
    assert env.lp_fees_accrued.item() == pytest.approx(fees, rel=1e-12)
    assert env.stats.pnl_breakdown(0)["lp_fees"] == pytest.approx(fees, rel=1e-12)
    assert env.stats.costs.item() == pytest.approx(swap_in + gas_open, rel=1e-12)
    env.step(actions(HOLD))  # bar 2: no volume, no fees
    assert env.lp_fees_accrued.item() == pytest.approx(fees, rel=1e-12)
    cash_before = env.cash.item()
    env.step(actions(LP_CLOSE))  # at bar 3's open, 108
    x = L * (1 / math.sqrt(108) - 1 / math.sqrt(110))
    y = L * (math.sqrt(108) - math.sqrt(90))
    received = x * 108 + y + fees - x * 108 * 0.0015 - gas_close
    assert env.cash.item() == pytest.approx(cash_before + received, rel=1e-12)
    assert env.lp_liquidity.item() == 0.0 and env.lp_fees_accrued.item() == 0.0
    assert env.equity.item() == pytest.approx(env.cash.item())
    pnl = env.stats.pnl_breakdown(0)
    assert pnl["impermanent_loss"] == pytest.approx(x * 108 + y - (x0 * 108 + y0), rel=1e-9)
    assert pnl["fees_and_gas"] == pytest.approx(-(swap_in + gas_open + x * 108 * 0.0015 + gas_close), rel=1e-12)
    assert pnl["total"] == pytest.approx(env.equity.item() - 10_000, abs=1e-8)
    # one closed trade: an LP position counts (cash back minus the cash it cost)
    assert env.stats.trades.item() == 1
    assert env.stats.wins.item() == int(received > 5000 + swap_in + gas_open)


# ============================================================================================ Aave lending


def aave_supply_rate(u: float) -> float:
    """Aave V3 USDT (slope1 6.5%, slope2 35%, kink 92%, reserve factor 10%), written out."""
    borrow = 0.065 * u / 0.92 if u <= 0.92 else 0.065 + 0.35 * (u - 0.92) / (1 - 0.92)
    return borrow * u * (1 - 0.10)


@pytest.mark.parametrize("u, borrow_by_hand", [(0.46, 0.0325), (0.92, 0.065), (0.96, 0.065 + 0.175)])
def test_lending_supply_rate_below_at_and_above_the_optimum(u, borrow_by_hand):
    """LEND supplies max_idle_share 85% of the idle 10,000 at bar 1's open (8,500, whatever the 50% trade size);
    one hour of interest at the supply rate of the utilization: balance * (1 + rate / 8760). WITHDRAW takes it
    all back."""
    rate = borrow_by_hand * u * 0.9
    assert rate == pytest.approx(aave_supply_rate(u), rel=1e-12)
    market = make_market([flat(100)] * 4, pairs=["ETH/USDT"])
    env = env_for(market, ["spot", "lending"], StrategyParams(aave=AaveParams(utilization=u, sweep=False)))
    apy_index = market.n_features + STATE_NAMES.index("aave_supply_apy")
    obs = env.reset()
    assert obs[0, 0, apy_index].item() == pytest.approx(rate * 10, rel=1e-6)
    assert obs[0, 0, apy_index + 1].item() == pytest.approx(u, rel=1e-6)
    assert env.mask[0, 0, LEND] and not env.mask[0, 0, WITHDRAW]
    env.step(actions(LEND))
    assert env.lent.item() == pytest.approx(8500 * (1 + rate / 8760), rel=1e-13)
    assert env.cash.item() == pytest.approx(1500.0)
    # the supply (with its interest) is more than 85% of the idle 1,500 + 8,500.x: nothing left to lend
    assert not env.mask[0, 0, LEND]
    env.step(actions(HOLD))
    assert env.lent.item() == pytest.approx(8500 * (1 + rate / 8760) ** 2, rel=1e-13)
    assert env.stats.pnl_breakdown(0)["lending_interest"] == pytest.approx(8500 * ((1 + rate / 8760) ** 2 - 1),
                                                                           rel=1e-9)
    assert env.mask[0, 0, WITHDRAW]
    env.step(actions(WITHDRAW))  # at bar 3's open: no interest for bar 3
    assert env.lent.item() == 0.0
    assert env.cash.item() == pytest.approx(1500 + 8500 * (1 + rate / 8760) ** 2, rel=1e-13)


def test_lend_uses_only_cash_left_after_the_entries():
    """Two pairs: pair 0 opens a spot trade, pair 1 lends from the cash left after the entries. With 60% sizes
    the buy takes 6,000; the lend gets max_idle_share 85% of the 4,000 left: 3,400, and 600 stay cash."""
    market = make_market([[flat(100), flat(50)]] * 3, pairs=["ETH/USDT", "SOL/USDT"])
    env = env_for(market, ["spot", "lending"], StrategyParams(aave=AaveParams(utilization=0.0, sweep=False)),
                  risk=quiet_risk(max_position=0.6, fixed_size=0.6))
    env.step(actions(OPEN_LONG, LEND))
    assert env.units[0].tolist() == [pytest.approx(60.0), 0.0]
    assert env.lent[0].tolist() == [0.0, pytest.approx(3400.0)]
    assert env.cash.item() == pytest.approx(600.0)


def test_lend_tops_the_supply_up_to_max_idle_share_whatever_the_trade_size():
    """max_idle_share 0.9, trade size 5% (500). Bar 1: pair 0 buys 500 of ETH, pair 1 lends: the idle cash is
    9,500 and LEND supplies 0.9 * 9,500 = 8,550 (17 trade sizes: lending is not a risk trade); 950 stay cash.
    Then the supply is exactly 90% of the idle 9,500: LEND is masked on both slots (a LEND asked for anyway is a
    hold). Bar 2: pair 1 withdraws its 8,550. Bar 3: both slots lend: the first in pair order tops the supply up
    to 0.9 * 9,500 again, the second gets 0."""
    market = make_market([[flat(100), flat(50)]] * 5, pairs=["ETH/USDT", "SOL/USDT"])
    env = env_for(market, ["spot", "lending"],
                  StrategyParams(aave=AaveParams(utilization=0.0, max_idle_share=0.9, sweep=False)), risk=quiet_risk(max_position=0.05, fixed_size=0.05))
    env.step(actions(OPEN_LONG, LEND))
    assert env.units[0].tolist() == [pytest.approx(5.0), 0.0]
    assert env.lent[0].tolist() == [0.0, pytest.approx(8550.0)]
    assert env.cash.item() == pytest.approx(950.0)
    assert not env.mask[0, :, LEND].any()
    env.step(actions(HOLD, WITHDRAW))
    assert env.cash.item() == pytest.approx(9500.0) and env.mask[0, :, LEND].all()
    env.step(actions(LEND, LEND))
    assert env.lent[0].tolist() == [pytest.approx(8550.0), 0.0]
    assert env.equity.item() == pytest.approx(10_000.0)



def test_sweep_keeps_max_idle_share_of_idle_usdt_lent_and_compounds_its_share_of_the_rate():
    """The sweep (the default): nobody lends by hand (LEND and WITHDRAW masked); after each bar's entries the
    supply is set to 85% of the idle USDT. Holding from 10,000 at hourly growth g = rate / 8760: bar k lends
    0.85 * E(k-1) at its open, which earns g, so E(k) = E(k-1) * (1 + 0.85 g) = 10,000 * (1 + 0.85 g)^k, with
    0.15 * E(k-1) as cash; every dollar of the gain is lending interest."""
    rate = aave_supply_rate(0.80)
    g = rate / 8760
    market = make_market([flat(100)] * 5, pairs=["ETH/USDT"])
    env = env_for(market, ["spot", "lending"], StrategyParams(aave=AaveParams(utilization=0.80)))
    env.reset()
    assert not env.mask[0, 0, LEND] and not env.mask[0, 0, WITHDRAW]
    before = 10_000.0
    for k in range(1, 5):
        env.step(actions(HOLD))
        assert env.lent.item() == pytest.approx(0.85 * before * (1 + g), rel=1e-13)
        assert env.cash.item() == pytest.approx(0.15 * before, rel=1e-13)
        assert env.equity.item() == pytest.approx(10_000 * (1 + 0.85 * g) ** k, rel=1e-13)
        assert not env.mask[0, 0, LEND] and not env.mask[0, 0, WITHDRAW]
        before = env.equity.item()
    pnl = env.stats.pnl_breakdown(0)
    assert pnl["lending_interest"] == pytest.approx(before - 10_000, rel=1e-9)
    assert pnl["total"] == pytest.approx(before - 10_000, rel=1e-9)


def test_sweep_lets_entries_spend_the_supply_and_lends_what_they_leave():
    """Two pairs, no interest (utilization 0), trades of 30% (3,000): more than the 1,500 of cash the sweep
    leaves after bar 1, so the entry draws on the supply. Bar 1 (hold): 8,500 lent, 4,250 per slot. Bar 2:
    ETH buys 30 coins at 100; 7,000 stay idle: 85% of it, 5,950, is lent (2,975 per slot), 1,050 cash.
    Bar 3: ETH closes at 100 and the 3,000 is swept back: 4,250 per slot again. A buy of all the equity
    (fixed size 100%) takes cash and supply alike: nothing left lent."""
    market = make_market([[flat(100), flat(50)]] * 4, pairs=["ETH/USDT", "SOL/USDT"])
    env = env_for(market, ["spot", "lending"], StrategyParams(aave=AaveParams(utilization=0.0)),
                  risk=quiet_risk(max_position=0.3, fixed_size=0.3))
    env.step(actions(HOLD, HOLD))
    assert env.lent[0].tolist() == [pytest.approx(4250.0), pytest.approx(4250.0)]
    assert env.cash.item() == pytest.approx(1500.0)
    assert env.mask[0, 0, OPEN_LONG]
    env.step(actions(OPEN_LONG, HOLD))
    assert env.units[0].tolist() == [pytest.approx(30.0), 0.0]
    assert env.lent[0].tolist() == [pytest.approx(2975.0), pytest.approx(2975.0)]
    assert env.cash.item() == pytest.approx(1050.0)
    env.step(actions(CLOSE, HOLD))
    assert env.lent[0].tolist() == [pytest.approx(4250.0), pytest.approx(4250.0)]
    assert env.cash.item() == pytest.approx(1500.0) and env.equity.item() == pytest.approx(10_000.0)

    full = env_for(market, ["spot", "lending"], StrategyParams(aave=AaveParams(utilization=0.0)),
                   risk=quiet_risk(max_position=1.0, fixed_size=1.0))
    full.step(actions(HOLD, HOLD))
    full.step(actions(OPEN_LONG, HOLD))
    assert full.units[0].tolist() == [pytest.approx(100.0), 0.0]
    assert full.lent.abs().max().item() == pytest.approx(0.0, abs=1e-9)
    assert full.cash.item() == pytest.approx(0.0, abs=1e-9)


# ================================================================================================= staking


def daily_market(closes: list[float], pair: str = "ETH/USDT") -> MarketTensors:
    """Daily bars (the environment reads the bar length from the timestamps)."""
    market = make_market([flat(c) for c in closes], pairs=[pair])
    market.timestamps = market.timestamps[0] + MS_PER_DAY * np.arange(len(closes), dtype=np.int64)
    market.day = torch.as_tensor(market.timestamps // MS_PER_DAY)
    return market


@pytest.mark.parametrize("apy", [0.02839, 0.065])
def test_staking_a_year_of_rewards_equals_the_apy(apy):
    """Buy 50 ETH at 100, stake them all at the next open, then 365 daily bars of rewards: 50 * (1 + apy)
    staked coins, whatever the compounding (the APY is the effective annual yield)."""
    staking_terms = StakingParams(assets={"ETH": StakedAsset(apy=apy, compounds_per_year=365.0, unbonding_hours=0)})
    env = env_for(daily_market([100.0] * 368), ["spot", "staking"], StrategyParams(staking=staking_terms))
    env.step(actions(OPEN_LONG))
    assert env.units.item() == 50.0 and env.mask[0, 0, STAKE]
    env.step(actions(STAKE))  # staked at bar 2's open: its first day of rewards at bar 2's close
    for _ in range(363):
        env.step(actions(HOLD))
    assert env.staked_units.item() == pytest.approx(50 * (1 + apy) ** (364 / 365), rel=1e-12)
    env.step(actions(HOLD))  # the 365th day of rewards
    assert env.units.item() == 0.0 and env.staked_units.item() == pytest.approx(50 * (1 + apy), rel=1e-12)
    pnl = env.stats.pnl_breakdown(0)
    assert pnl["staking_rewards"] == pytest.approx(50 * apy * 100, rel=1e-10)  # flat price: rewards at 100
    assert pnl["total"] == pytest.approx(env.equity.item() - 10_000, abs=1e-8)
    assert env.equity.item() == pytest.approx(5000 + 50 * (1 + apy) * 100, rel=1e-12)


def test_btc_is_not_stakeable_unless_configured():
    market = make_market([[flat(100), flat(100)]] * 3, pairs=["BTC/USDT", "ETH/USDT"])
    env = env_for(market, ALL)
    env.step(actions(OPEN_LONG, OPEN_LONG))
    assert env.mask[0, :, STAKE].tolist() == [False, True]
    terms = StakingParams(assets={"BTC": StakedAsset(apy=0.01, compounds_per_year=365, unbonding_hours=1)})
    env = env_for(market, ALL, StrategyParams(staking=terms))
    env.step(actions(OPEN_LONG, OPEN_LONG))
    assert env.mask[0, :, STAKE].tolist() == [True, False]


def staking_env(bars, unbonding_hours: float, risk: RiskConfig | None = None):
    terms = StakingParams(assets={"ETH": StakedAsset(apy=0.0, compounds_per_year=365.0,
                                                      unbonding_hours=unbonding_hours)})
    return env_for(make_market(bars, pairs=["ETH/USDT"]), ["spot", "staking"], StrategyParams(staking=terms),
                   risk=risk)


def test_unbonding_blocks_a_sale_until_the_coins_are_free():
    """50 ETH bought at bar 1's open, staked at bar 2's, unstaked at bar 3's with 3 hours of unbonding
    (free at bar 6's open). A close asked at bar 3's close sells nothing at bar 4 (no free coin): the exit
    waits, and the coins are sold at bar 6's open, 104, the first open at which they are free."""
    bars = [flat(100), flat(100), flat(101), flat(102), flat(103), flat(90), (104, 105, 103, 104), flat(104)]
    env = staking_env(bars, unbonding_hours=3)
    env.step(actions(OPEN_LONG))
    env.step(actions(STAKE))
    assert (env.units.item(), env.staked_units.item()) == (0.0, 50.0)
    assert env.mask[0, 0, UNSTAKE] and not env.mask[0, 0, STAKE]  # nothing free to stake
    env.step(actions(UNSTAKE))  # unbonding from bar 3's open: free at bar 6's open
    assert (env.staked_units.item(), env.unbonding_units.item(), env.release_bar.item()) == (0.0, 50.0, 6)
    assert not env.mask[0, 0, UNSTAKE] and not env.mask[0, 0, STAKE] and env.mask[0, 0, CLOSE]
    env.step(actions(CLOSE))  # bar 4: nothing to sell yet
    assert env.cash.item() == 5000.0 and env.unbonding_units.item() == 50.0 and env.exit_pending.item()
    assert not env.mask[0, 0, CLOSE]  # the exit already waits
    assert env.equity.item() == pytest.approx(5000 + 50 * 103)  # still exposed to the price
    env.step(actions(HOLD))  # bar 5 (close 90): still locked
    assert env.cash.item() == 5000.0 and env.equity.item() == pytest.approx(5000 + 50 * 90)
    env.step(actions(HOLD))  # bar 6: free at the open, sold at the open
    assert env.unbonding_units.item() == 0.0 and env.units.item() == 0.0
    assert env.cash.item() == pytest.approx(5000 + 50 * 104)
    assert not env.exit_pending.item()
    assert env.stats.trades.item() == 1 and env.stats.wins.item() == 1  # 5200 back for 5000


@pytest.mark.parametrize("lock", ["staked", "unbonding"])
def test_unbonding_and_staked_coins_cannot_be_stopped_out_until_free(lock):
    """Stop-loss 2% under the 100 entry. Bar 4 falls to 90: the stop triggers but every coin is locked, so
    nothing is sold at the stop price 98. Staked coins are unstaked at the next open (bar 5), unbonding
    coins were unstaked at bar 3's open; with 2 hours of unbonding they come free at bar 7 / bar 5 and
    are sold at that open."""
    bars = [flat(100), flat(100), flat(100), flat(100), (100, 100, 90, 95), flat(95), flat(96), flat(97),
            flat(97)]
    env = staking_env(bars, unbonding_hours=2, risk=quiet_risk(stop_loss=0.02))
    env.step(actions(OPEN_LONG))
    env.step(actions(STAKE))
    env.step(actions(UNSTAKE if lock == "unbonding" else HOLD))
    env.step(actions(HOLD))  # bar 4: the stop at 98 is hit, no coin is free
    assert env.cash.item() == 5000.0 and env.exit_pending.item()
    assert env.equity.item() == pytest.approx(5000 + 50 * 95)
    if lock == "unbonding":
        env.step(actions(HOLD))  # bar 5: released (3 + 2) and sold at its open, 95
        sold_at = 95.0
    else:
        env.step(actions(HOLD))  # bar 5: unstaked at the open, free at bar 7
        assert env.unbonding_units.item() == 50.0 and env.release_bar.item() == 7 and env.cash.item() == 5000.0
        env.step(actions(HOLD))  # bar 6
        assert env.cash.item() == 5000.0
        env.step(actions(HOLD))  # bar 7: sold at its open, 97
        sold_at = 97.0
    assert env.units.item() + env.staked_units.item() + env.unbonding_units.item() == 0.0
    assert env.cash.item() == pytest.approx(5000 + 50 * sold_at)
    assert env.stats.trades.item() == 1 and env.stats.wins.item() == 0


# ============================================================================================== arbitrage

ARB_FEES = dict(taker_fee_a=0.001, taker_fee_b=0.006)


def arb_market(primary, second, available=None) -> MarketTensors:
    market = make_market(primary, pairs=["BTC/USDT"])
    return with_second_venue(market, second, available)


def test_arbitrage_profit_after_both_fees_on_a_constructed_spread():
    """Binance 100, Coinbase 102 (200 bps > 70 bps of taker fees + 0.02 bps of amortised transfer + 5 bps).
    The first ARB funds a book of 5,000 at bar 1's opens: 1,250 of quote and 1,250 of coin on each venue
    (coins 12.5 on A, 1250/102 on B), paying both taker fees; then buys q = min(quote_a / (100 * 1.001),
    coin_b, 500 / 100) = 5 coins on A and sells them on B: profit 5 * (102 * 0.994 - 100 * 1.001)."""
    params = StrategyParams(arbitrage=ArbParams(max_notional_usd=500.0, **ARB_FEES))
    market = arb_market([flat(100)] * 3, [flat(102)] * 3)
    env = env_for(market, ["arbitrage"], params)
    assert env.mask[0, 0, ARB] and not env.mask[0, 0, ARB_CLOSE]
    env.step(actions(ARB))
    inv = {k: v.item() for k, v in env.arb_inventory.items()}
    q = 5.0
    assert inv["coin_a"] == pytest.approx(12.5 + q) and inv["coin_b"] == pytest.approx(1250 / 102 - q)
    assert inv["quote_a"] == pytest.approx(1250 - q * 100 * 1.001)
    assert inv["quote_b"] == pytest.approx(1250 + q * 102 * 0.994)
    assert inv["open"] and inv["transit_coin"] == 0.0
    profit = q * (102 * 0.994 - 100 * 1.001)
    assert profit == pytest.approx(6.44)
    funding_fees = 1250 * (0.001 + 0.006)
    # valued at Binance's close (100): the book's coins bought on B at 102 lost 2 each against A's price
    assert env.equity.item() == pytest.approx(10_000 - funding_fees - 1250 / 102 * 2 + profit, rel=1e-12)
    pnl = env.stats.pnl_breakdown(0)
    assert pnl["arbitrage"] == pytest.approx(q * 2 - 1250 / 102 * 2, rel=1e-12)
    assert pnl["fees_and_gas"] == pytest.approx(-(funding_fees + q * (100 * 0.001 + 102 * 0.006)), rel=1e-12)
    assert pnl["spot"] == pytest.approx(0.0, abs=1e-9)
    assert pnl["total"] == pytest.approx(env.equity.item() - 10_000, abs=1e-9)
    # the book unwinds at bar 2's opens: coins sold on each venue at its taker fee
    env.step(actions(ARB_CLOSE))
    back = inv["quote_a"] + inv["quote_b"] + inv["coin_a"] * 100 * 0.999 + inv["coin_b"] * 102 * 0.994
    assert env.cash.item() == pytest.approx(5000 - funding_fees + back, rel=1e-12)
    assert not env.arb_inventory["open"].item() and env.equity.item() == pytest.approx(env.cash.item())
    assert env.stats.trades.item() == 1


@pytest.mark.parametrize("second, reason", [
    (100.5, "50 bps do not cover 70 bps of taker fees"),
    (100.72, "72 bps cover the fees but not the 5 bps buffer"),
    (float("nan"), "no Coinbase candle"),
])
def test_no_arbitrage_when_the_spread_is_below_costs_or_unquoted(second, reason):
    market = arb_market([flat(100)] * 3, [flat(second)] * 3)
    env = env_for(market, ["arbitrage"], StrategyParams(arbitrage=ArbParams(**ARB_FEES)))
    assert not env.mask[0, 0, ARB], reason
    env.step(actions(ARB))  # refused: nothing funded, nothing paid
    assert env.cash.item() == 10_000.0 and not env.arb_inventory["open"].item()
    assert env.stats.costs.item() == 0.0


def test_arbitrage_decided_on_a_spread_that_is_gone_at_the_open_does_not_trade():
    """The spread at bar 0's close allows ARB; at bar 1's open Coinbase is at 100.3: the book is funded but
    no arbitrage fills (arb_trade's rule at the fill prices); a later open at 103 trades."""
    params = StrategyParams(arbitrage=ArbParams(max_notional_usd=500.0, **ARB_FEES))
    market = arb_market([flat(100)] * 4, [flat(102), flat(100.3), flat(103), flat(103)])
    env = env_for(market, ["arbitrage"], params)
    env.step(actions(ARB))
    inv = env.arb_inventory
    assert inv["open"].item() and inv["coin_a"].item() == pytest.approx(12.5)
    assert inv["coin_b"].item() == pytest.approx(1250 / 100.3)
    assert not env.mask[0, 0, ARB]  # bar 1's close: 30 bps
    env.step(actions(HOLD))
    assert env.mask[0, 0, ARB]
    env.step(actions(ARB))
    assert env.arb_inventory["coin_a"].item() == pytest.approx(12.5 + 5.0)


def test_rebalancing_pays_the_withdrawal_fee_and_takes_the_delay():
    """A trade that empties Coinbase's coins (q = coin_b = 1250/102) triggers a transfer: Binance sends half
    the coin difference minus the 0.0005 BTC withdrawal fee, quote moves at par; both land 3 bars later
    (rebalance_delay_hours 3); until then arbitrage from the empty side is masked and the book cannot close."""
    params = StrategyParams(arbitrage=ArbParams(rebalance_delay_hours={"BTC": 3.0}, **ARB_FEES))
    market = arb_market([flat(100)] * 7, [flat(102)] * 7)
    env = env_for(market, ["arbitrage"], params)
    env.step(actions(ARB))
    cb0 = 1250 / 102
    coin_a, quote_a, quote_b = 12.5 + cb0, 1250 - cb0 * 100 * 1.001, 1250 + cb0 * 102 * 0.994
    mean_coin, mean_quote = (coin_a + 0.0) / 2, (quote_a + quote_b) / 2
    inv = {k: v.item() for k, v in env.arb_inventory.items()}
    assert inv["coin_b"] == pytest.approx(0.0, abs=1e-12)
    assert inv["coin_a"] == pytest.approx(mean_coin) and inv["transit_coin"] == pytest.approx(-(mean_coin - 0.0005))
    assert inv["quote_b"] == pytest.approx(mean_quote) and inv["transit_quote"] == pytest.approx(mean_quote - quote_a)
    assert inv["transfer_due"] == 1 + 3
    assert env.stats.pnl_breakdown(0)["fees_and_gas"] == pytest.approx(
        -(1250 * 0.007 + cb0 * (100 * 0.001 + 102 * 0.006) + 0.0005 * 100), rel=1e-12)
    assert not env.mask[0, 0, ARB] and not env.mask[0, 0, ARB_CLOSE]  # no coin on B, a transfer under way
    for _ in range(2):
        env.step(actions(HOLD))
        assert env.arb_inventory["transit_coin"].item() != 0.0
    env.step(actions(HOLD))  # bar 4: landed
    inv = {k: v.item() for k, v in env.arb_inventory.items()}
    assert inv["coin_b"] == pytest.approx(mean_coin - 0.0005) and inv["transit_coin"] == 0.0
    assert inv["quote_a"] == pytest.approx(mean_quote) and inv["quote_b"] == pytest.approx(mean_quote)
    assert env.mask[0, 0, ARB] and env.mask[0, 0, ARB_CLOSE]
    assert env.equity.item() == pytest.approx(mark(env, torch.tensor([[100.0]])).item(), rel=1e-12)


def test_second_venue_is_aligned_as_of_the_bar_and_never_forward_filled(tmp_path):
    """Coinbase file with bar 2 missing and a candle after the window: bar 2 is unavailable (not the stale
    bar 1 price), the later candle is never seen, and a missing file leaves the pair unavailable."""
    t0 = 1_717_200_000_000  # 2024-06-01 00:00 UTC
    rows = lambda stamps, price: pd.DataFrame({"timestamp": stamps, "open": price, "high": price + 1,  # noqa: E731
                                               "low": price - 1, "close": price, "volume": 1.0})
    write_candles(rows(t0 + H * np.arange(6), 100.0), tmp_path / "binance_BTC-USDT_1h.csv.gz")
    write_candles(rows(t0 + H * np.arange(6), 50.0), tmp_path / "binance_ETH-USDT_1h.csv.gz")
    write_candles(rows(t0 + H * np.array([0, 1, 3, 4, 5, 9]), 101.0), tmp_path / "coinbase_BTC-USD_1h.csv.gz")
    market = load_market("binance", ["BTC/USDT", "ETH/USDT"], "1h", tmp_path)
    venue = load_second_venue(market, "coinbase", "USD", tmp_path)
    assert venue.pairs == ["BTC/USD", "ETH/USD"] and second_venue_pair("SOL/USDT", "usd") == "SOL/USD"
    assert venue.available[:, 0].tolist() == [True, True, False, True, True, True]
    assert np.isnan(venue.close[2, 0]) and venue.close[3, 0] == 101.0
    assert not venue.available[:, 1].any() and "ETH/USDT" not in venue.sources
    assert venue.slice(2, 5).available[:, 0].tolist() == [False, True, True]


# ================================================================================= masking and the agent


class FavouriteQ(torch.nn.Module):
    """Q = a fixed row: the favourite action highest, then down the list."""

    def __init__(self, order: list[int]) -> None:
        super().__init__()
        q = torch.full((N_ACTIONS,), -100.0)
        for rank, a in enumerate(order):
            q[a] = 100.0 - rank
        self.q = torch.nn.Parameter(q)

    def forward(self, obs):
        return self.q.expand(*obs.shape[:-1], N_ACTIONS)


def test_masked_actions_are_never_chosen_when_acting_greedy_or_exploring():
    """Every step of a run with every strategy on, an agent whose Q favours UNSTAKE, LP_CLOSE, WITHDRAW,
    ARB_CLOSE (invalid most of the time) only ever picks valid actions, greedy or at random."""
    market = arb_market([flat(100 + (k % 5)) for k in range(40)], [flat(103 + (k % 3)) for k in range(40)])
    env = env_for(market, ALL, StrategyParams(arbitrage=ArbParams(**ARB_FEES)), episodes=4)
    agent = DQNAgent(env.obs_size, N_ACTIONS, AgentConfig(hidden=8, buffer_size=16), torch.device("cpu"), 0)
    agent.model = FavouriteQ([UNSTAKE, LP_CLOSE, WITHDRAW, ARB_CLOSE, STAKE])
    obs, picked = env.reset(), set()
    for k in range(39):
        eps = 0.0 if k % 2 else 1.0
        a = agent.act(obs.flatten(0, 1), env.mask.flatten(0, 1), eps).view(4, 1)
        assert env.mask.gather(-1, a.unsqueeze(-1)).all()
        picked |= set(a.flatten().tolist())
        obs, _, _ = env.step(a)
    assert {ARB, LP_OPEN, LEND, OPEN_LONG} & picked  # exploring did reach the strategies' actions
    assert not env.mask[0, 0, UNSTAKE]  # BTC is not stakeable: never valid, never picked
    assert UNSTAKE not in picked


def test_q_target_argmax_never_picks_a_masked_action():
    """The next state's mask from the environment (flat, no LP, nothing lent: LP_CLOSE and WITHDRAW invalid);
    the online Q rates LP_CLOSE highest and WITHDRAW second, but the Double-DQN target takes the best VALID
    action (LP_OPEN here) and evaluates it with the target network."""
    env = env_for(make_market([flat(100)] * 3, pairs=["ETH/USDT"]), ALL)
    next_mask = env.mask.flatten(0, 1)
    assert not next_mask[0, LP_CLOSE] and not next_mask[0, WITHDRAW] and next_mask[0, LP_OPEN]
    agent = DQNAgent(env.obs_size, N_ACTIONS, AgentConfig(hidden=8, buffer_size=8, batch_size=4, learning_starts=0),
                     torch.device("cpu"), 0)
    agent.model = FavouriteQ([LP_CLOSE, WITHDRAW, LP_OPEN])
    target_q = torch.arange(N_ACTIONS, dtype=torch.float32)  # target network: Q(a) = a
    agent.target_model = torch.nn.Module()
    agent.target_model.forward = lambda o: target_q.expand(*o.shape[:-1], N_ACTIONS)
    obs = env.reset().flatten(0, 1)
    n = 4
    agent.buffer.add(obs.expand(n, -1), torch.zeros(n, dtype=torch.int64), torch.ones(n), torch.full((n,), 0.5),
                     obs.expand(n, -1), next_mask.expand(n, -1))
    loss = agent.learn()
    q_taken = -100.0  # Q(s, HOLD): not among the favourites
    correct = 1 + 0.5 * LP_OPEN  # target Q of LP_OPEN = its index
    assert float(loss) == pytest.approx(abs(q_taken - correct) - 0.5, abs=1e-4)  # smooth L1, |d| > 1
    assert torch.where(next_mask, agent.model(obs), NEG_INF).argmax().item() == LP_OPEN


# ====================================================================================== risk across strategies


def test_concurrent_cap_counts_lp_positions_and_arbitrage_legs():
    """Cap 3 trades. Pair 0 opens spot, pair 1 an LP position: 2 open; an arbitrage book (2 legs) on pair 2
    would make 4: masked (and refused), while a third single trade (LP on pair 2) still fits."""
    bars = [[flat(100), flat(100), flat(100)]] * 4
    market = make_market(bars, pairs=["ETH/USDT", "SOL/USDT", "BTC/USDT"])
    with_second_venue(market, [[flat(100), flat(100), flat(103)]] * 4)
    params = StrategyParams(lp=NO_GAS, arbitrage=ArbParams(**ARB_FEES))
    env = env_for(market, ALL, params, risk=quiet_risk(max_trades=3, fixed_size=0.1))
    assert env.mask[0, 2, ARB]
    env.step(actions(OPEN_LONG, LP_OPEN, HOLD))
    assert not env.mask[0, 2, ARB], "a book's 2 legs do not fit in the 1 trade left"
    assert env.mask[0, 2, LP_OPEN] and env.mask[0, 0, LP_OPEN]
    env.step(actions(HOLD, HOLD, ARB))  # refused
    assert not env.arb_inventory["open"][0, 2].item()
    env.step(actions(LP_OPEN, HOLD, LP_OPEN))  # two requests, one place: served in pair order
    assert env.lp_liquidity[0].gt(0).tolist() == [True, True, False]
    assert not env.mask[0, :, OPEN_LONG].any() and not env.mask[0, :, LP_OPEN].any()


@pytest.mark.parametrize("trades, books, open_trades, cap, expected_trades, expected_books", [
    ([1, 1, 0, 1], [1, 0], 0, 3, [1, 1, 0, 1], [0, 0]),   # 3 singles fill the cap: no room for 2 legs
    ([1, 0, 0, 0], [1, 1], 0, 3, [1, 0, 0, 0], [1, 0]),   # 1 + 2 = 3: the first book fits, the second not
    ([0, 0, 0, 0], [0, 1], 1, 3, [0, 0, 0, 0], [0, 1]),   # 1 open + 2 legs
    ([1, 1, 1, 1], [1, 1], 2, 3, [1, 0, 0, 0], [0, 0]),   # one place left: the first single takes it
    ([0, 1, 0, 0], [1, 1], 0, 5, [0, 1, 0, 0], [1, 1]),
])
def test_trades_then_books_is_the_weighted_first_come_first_served_rule(trades, books, open_trades, cap,
                                                                        expected_trades, expected_books):
    t_req = torch.tensor(trades, dtype=torch.bool).unsqueeze(1)  # [K, B=1]
    b_req = torch.tensor(books, dtype=torch.bool).unsqueeze(1)
    got_t, got_b = risk.accept_trades_then_books(t_req, b_req, torch.tensor([open_trades]), cap)
    assert got_t.squeeze(1).to(torch.int64).tolist() == expected_trades
    assert got_b.squeeze(1).to(torch.int64).tolist() == expected_books
    weights = torch.tensor([1] * len(trades) + [2] * len(books))
    weighted = risk.accept_weighted_entries(torch.cat([t_req, b_req]).t(), weights, torch.tensor([open_trades]), cap)
    assert weighted.t().squeeze(1).to(torch.int64).tolist() == expected_trades + expected_books


def test_arbitrage_book_is_refused_when_only_one_trade_fits_in_the_same_bar():
    bars = [[flat(100), flat(100)]] * 3
    market = make_market(bars, pairs=["ETH/USDT", "BTC/USDT"])
    with_second_venue(market, [[flat(100), flat(103)]] * 3)
    env = env_for(market, ALL, StrategyParams(lp=NO_GAS, arbitrage=ArbParams(**ARB_FEES)),
                  risk=quiet_risk(max_trades=2, fixed_size=0.1))
    env.step(actions(OPEN_LONG, ARB))  # the spot trade is served first; 1 place left for 2 legs
    assert env.units[0, 0].item() > 0 and not env.arb_inventory["open"][0, 1].item()


def test_per_trade_cap_sizes_lp_and_arbitrage_like_a_spot_trade_but_not_lending():
    """max_position 5%: the LP position and the arbitrage book are 500 each; lending is no risk trade: it
    supplies max_idle_share 85% of the 9,000 left, 7,650."""
    bars = [[flat(100), flat(100), flat(100)]] * 3
    market = make_market(bars, pairs=["ETH/USDT", "BTC/USDT", "SOL/USDT"], volume=[[0.0] * 3] * 3)
    with_second_venue(market, [[flat(100), flat(200), flat(100)]] * 3)
    params = StrategyParams(lp=NO_GAS, aave=AaveParams(utilization=0.0, sweep=False),
                            arbitrage=ArbParams(taker_fee_a=0.0, taker_fee_b=0.0))
    env = env_for(market, ALL, params, risk=quiet_risk(max_position=0.05, fixed_size=0.05, max_trades=5))
    env.step(actions(LP_OPEN, ARB, LEND))
    assert env.lp_value[0, 0].item() == pytest.approx(500.0)
    assert env.lent[0, 2].item() == pytest.approx(7650.0)
    assert env.cash.item() == pytest.approx(9000 - 7650.0)


def test_daily_loss_limit_sees_the_whole_portfolio_and_blocks_new_lp_and_books():
    """30% in ETH, staked; it loses 20% in bar 3: the day is down 6% (> 5%): new spot trades, LP positions and
    arbitrage books are masked; lending and the existing positions' exits are not. (At 30% the 7,000 of cash
    covers a new LP position or book of 3,000 with its gas and fees, so only the loss limit masks them.)"""
    bars = [[flat(100), flat(100)], [flat(100), flat(100)], [flat(100), flat(100)], [(100, 100, 80, 80), flat(100)],
            [flat(80), flat(100)]]
    market = make_market(bars, pairs=["ETH/USDT", "BTC/USDT"], start="2024-01-01T01:00:00Z")
    with_second_venue(market, [[flat(80), flat(103)]] * 5)
    env = env_for(market, ALL, StrategyParams(aave=AaveParams(sweep=False), arbitrage=ArbParams(**ARB_FEES)),
                  risk=quiet_risk(daily_loss_limit=0.05, max_position=0.3, fixed_size=0.3))
    env.step(actions(OPEN_LONG, HOLD))
    env.step(actions(STAKE, HOLD))
    assert env.mask[0, 1, ARB] and env.mask[0, 1, LP_OPEN]
    env.step(actions(HOLD, HOLD))
    assert env.equity.item() == pytest.approx(9400.0, abs=0.1)  # 30 staked coins at 80 (and 2 hours of rewards)
    assert not env.mask[0, 1, ARB] and not env.mask[0, 1, LP_OPEN] and not env.mask[0, 1, OPEN_LONG]
    assert env.mask[0, 1, LEND] and env.mask[0, 0, CLOSE]


# ================================================================== the whole portfolio on real candles


@pytest.fixture(scope="module")
def real_market() -> MarketTensors:
    return binance_with_coinbase()


def random_valid(mask: torch.Tensor, gen: torch.Generator, p_hold: float = 0.5) -> torch.Tensor:
    noise = torch.rand(mask.shape, generator=gen)
    pick = torch.where(mask, noise, -1.0).argmax(-1)
    return torch.where(torch.rand(pick.shape, generator=gen) < p_hold, HOLD, pick)


@pytest.mark.parametrize("sweep", [True, False], ids=["sweep", "lend-by-hand"])
def test_equity_identity_rewards_and_pnl_breakdown_with_every_strategy_on(real_market, step_kernel, sweep):
    """A random run with every strategy and every risk rule on (arbitrage fees lowered so that it trades):
    at every step equity = cash + coins * close + LP value + fees + supply + books, the slots' rewards add up
    to the log-equity change, nothing goes negative, and the PnL breakdown adds up to the equity change;
    lending by the sweep (LEND and WITHDRAW never valid) and by hand."""
    tensors = real_market
    params = StrategyParams(arbitrage=ArbParams(taker_fee_a=0.0, taker_fee_b=0.0002, min_edge_bps=0.0,
                                                rebalance_notional_usd=1e7, rebalance_delay_hours={
                                                    "BTC": 2.0, "ETH": 1.0, "SOL": 3.0}),
                            staking=StakingParams(assets={"ETH": StakedAsset(0.05, 365.0, 5.0),
                                                          "SOL": StakedAsset(0.07, 182.5, 2.0)}),
                            aave=AaveParams(sweep=sweep))
    risk_cfg = RiskConfig(max_position=0.2, fixed_size=0.2, kelly_min_trades=5, kelly_window=10, stop_loss=0.01,
                          take_profit=0.02, trailing_stop=0.015, daily_loss_limit=0.03, max_trades=5)
    starts = torch.tensor([700, 760, 900, 1000])
    n_steps = 450
    env = BatchedTradingEnv(tensors, torch.arange(3).expand(4, 3), starts, n_steps, EnvConfig(fee=0.001),
                            risk_cfg, params)
    assert (env._fused is not None) == (step_kernel == "fused")
    gen = torch.Generator().manual_seed(11)
    closes = tensors.prices[..., 3]
    counts = torch.zeros(N_ACTIONS)
    prev = env.equity.clone()
    for k in range(1, n_steps + 1):
        a = random_valid(env.mask, gen)
        assert env.mask.gather(-1, a.unsqueeze(-1)).all()
        counts += torch.bincount(a.flatten(), minlength=N_ACTIONS)
        _, reward, _ = env.step(a)
        close = closes[starts + k]
        torch.testing.assert_close(env.equity, mark(env, close), rtol=1e-12, atol=1e-8)
        torch.testing.assert_close(reward.sum(-1).double(), torch.log(env.equity / prev), rtol=1e-5, atol=1e-7)
        assert (env.units >= 0).all() and (env.staked_units >= 0).all() and (env.lent >= 0).all()
        inv = env.arb_inventory
        assert all((inv[k] >= -1e-9).all() for k in ("quote_a", "coin_a", "quote_b", "coin_b"))
        prev = env.equity.clone()
    taken = dict(zip(ACTION_NAMES, counts.tolist()))
    by_hand = {ACTION_NAMES[LEND], ACTION_NAMES[WITHDRAW]}
    assert all(n > 0 for name, n in taken.items() if name != "hold" and not (sweep and name in by_hand)), taken
    if sweep:
        assert all(taken[name] == 0 for name in by_hand), taken
        assert (env.lent.sum(-1) > 0).all()  # the sweep lent
    total = env.stats.pnl.sum(-1)
    torch.testing.assert_close(total, env.equity - 10_000.0, rtol=0, atol=1e-7)
    by_source = env.stats.pnl.sum(0)
    for name in PNL_SOURCES:
        assert by_source[PNL_SOURCES.index(name)] != 0.0, f"{name} never moved"
    assert (env.stats.pnl[:, PNL_SOURCES.index("fees_and_gas")] == -env.stats.costs).all()
    assert env.stats.pnl[:, PNL_SOURCES.index("lp_fees")].gt(0).all()
    assert env.stats.pnl[:, PNL_SOURCES.index("impermanent_loss")].lt(0).any()


def test_spot_actions_with_every_strategy_on_equal_the_spot_only_environment(real_market):
    """The strategies cost nothing they are not asked for: the same spot actions give the same cash, units,
    equity and rewards to the last bit with every strategy on as with spot alone (lending by hand: the sweep
    lends without being asked)."""
    risk_cfg = RiskConfig(max_position=0.3, fixed_size=0.3, kelly_min_trades=5, kelly_window=10, stop_loss=0.01,
                          take_profit=0.02, trailing_stop=0.015, daily_loss_limit=0.03)
    starts = torch.tensor([300, 800, 1200])
    by_hand = StrategyParams(aave=AaveParams(sweep=False))
    envs = [BatchedTradingEnv(real_market, torch.arange(3).expand(3, 3), starts, 300,
                              EnvConfig(strategies=s), risk_cfg, by_hand) for s in (["spot"], ALL)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(300):
        spot_mask = envs[0].mask
        assert torch.equal(envs[1].mask[..., :3], spot_mask[..., :3])
        a = random_valid(spot_mask, gen)
        (o0, r0, _), (o1, r1, _) = (e.step(a) for e in envs)
        assert torch.equal(r0, r1) and torch.equal(envs[0].equity, envs[1].equity)
        assert torch.equal(envs[0].cash, envs[1].cash) and torch.equal(envs[0].units, envs[1].units)
        assert torch.equal(o0[..., :-len(STATE_NAMES) + 11], o1[..., :-len(STATE_NAMES) + 11])
    # spot alone books every non-cost change as spot; with the strategies on it is summed explicitly
    torch.testing.assert_close(envs[0].stats.pnl, envs[1].stats.pnl, rtol=0, atol=1e-8)
    assert envs[0].stats.trades.sum() > 10


def test_evaluation_reports_the_pnl_breakdown_adding_up_to_the_return(real_market):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(real_market.n_features + len(STATE_NAMES), 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, N_ACTIONS))
    metrics = evaluate_policy(model, real_market, (1300, 1700), EnvConfig(), RiskConfig(), margin=0.0)
    for pair, m in metrics["per_pair"].items():
        pnl = m["pnl_breakdown"]
        assert set(pnl) == set(PNL_SOURCES) | {"total"}
        assert pnl["total"] == pytest.approx(sum(pnl[s] for s in PNL_SOURCES))
        assert pnl["total"] == pytest.approx(m["total_return"] / 100 * 10_000, abs=1e-6)
        assert pnl["fees_and_gas"] == pytest.approx(-m["costs_paid"])
    assert metrics["pnl_breakdown"]["total"] == pytest.approx(metrics["avg_return"] / 100 * 10_000, abs=1e-6)


# ============================================================================================ metrics


def test_pair_and_average_metrics_carry_the_breakdown():
    a = pair_metrics(10_500.0, 10_000.0, 0.0, 0.0, 1, 0.0, 2, 1,
                     pnl_breakdown={"spot": 400.0, "lp_fees": 150.0, "fees_and_gas": -50.0, "total": 500.0})
    b = pair_metrics(9_900.0, 10_000.0, 0.0, 0.0, 1, 0.0, 0, 0,
                     pnl_breakdown={"spot": -80.0, "lp_fees": 0.0, "fees_and_gas": -20.0, "total": -100.0})
    avg = average_metrics({"A": a, "B": b})
    assert avg["pnl_breakdown"] == {"spot": 160.0, "lp_fees": 75.0, "fees_and_gas": -35.0, "total": 200.0}
    assert "pnl_breakdown" not in pair_metrics(1.0, 1.0, 0.0, 0.0, 1, 0.0, 0, 0)


# ============================================================================================= config


def test_strategies_flag_and_sections_in_files_flags_and_checkpoints():
    cfg = TrainConfig()
    assert cfg.env.strategies == ALL  # the seed's guide enables all
    apply_mapping(cfg, {"strategies": "spot,lp", "range_width": 0.25, "utilization": 0.5,
                        "staking": {"stake_fraction": 0.5, "staking_assets": {
                            "btc": {"apy": 0.01, "compounds_per_year": 365, "unbonding_hours": 24}}},
                        "arbitrage": {"taker_fee_b": 0.004, "withdrawal_fee_units": {"BTC": 0.0002}}}, "test")
    validate_tree(cfg)
    params = cfg.strategy_params()
    assert cfg.env.strategies == ["spot", "lp"]
    assert params.lp.range_width == 0.25 and params.aave.utilization == 0.5
    assert params.staking.stake_fraction == 0.5 and params.staking.asset("BTC").apy == 0.01
    assert params.staking.asset("ETH") is None  # the mapping replaces the table
    assert params.arbitrage.taker_fee_b == 0.004 and params.arbitrage.withdrawal_fee_units == {"BTC": 0.0002}
    again = from_dict(TrainConfig, to_dict(cfg))
    assert again.strategy_params() == params
    data = to_dict(PipelineConfig())
    assert {"staking", "lp", "lending", "arbitrage"} <= set(data)


@pytest.mark.parametrize("mapping, match", [
    ({"strategies": ["spot", "yield_farming"]}, "yield_farming"),
    ({"strategies": ["staking"]}, "needs spot"),
    ({"strategies": []}, "strategies"),
    ({"fee_tier": 0.002}, "fee-tier"),
    ({"range_width": 1.5}, "range-width"),
    ({"staking_assets": {"ETH": {"apy": 0.03}}}, "missing keys"),
    ({"staking_assets": {"ETH": {"apy": 50, "compounds_per_year": 1, "unbonding_hours": 1}}}, "apy"),
    ({"rebalance_delay_hours": {"BTC": -1}}, "delay"),
])
def test_bad_strategy_settings_are_input_errors(mapping, match):
    cfg = TrainConfig()
    with pytest.raises(InputError, match=match):
        apply_mapping(cfg, mapping, "test")
        validate_tree(cfg)


def test_worker_reads_the_strategy_sections_of_a_pipeline_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("strategies: [spot, lending]\nlending:\n  utilization: 0.3\nlp:\n  fee_tier: 0.003\n"
                    "initial_runs: 2\n")
    cfg = load_train_config(str(path), {})
    assert cfg.env.strategies == ["spot", "lending"]
    assert cfg.lending.utilization == 0.3 and cfg.lp.fee_tier == 0.003


# ====================================================================== the second venue in the pipeline


def test_pipeline_snapshot_and_worker_carry_the_second_venue(tmp_path):
    """With arbitrage on, the pipeline's data snapshot holds Coinbase's candles over the same bars (with their
    sha256 in the state), the worker copies them, and the runs see the same second venue."""
    from controller.state import PipelineState

    cfg = PipelineConfig()
    apply_mapping(cfg, {"pairs": ["BTC/USDT", "ETH/USDT"], "start": "2024-05-01", "end": "2024-06-01",
                        "val_days": 5}, "test")
    store = LocalStore(str(tmp_path / "out"))
    pipeline = Pipeline(cfg, store, executor=None)
    pipeline.state = PipelineState()
    pipeline.snapshot_data()
    files = pipeline.state.data.files
    keys = [f["key"] for f in files]
    assert keys == ["data/binance_BTC-USDT_1h.csv.gz", "data/binance_ETH-USDT_1h.csv.gz",
                    "data/coinbase_BTC-USD_1h.csv.gz", "data/coinbase_ETH-USD_1h.csv.gz"]
    assert [f.get("venue") for f in files] == [None, None, "second", "second"]
    bars = 31 * 24
    assert all(f["rows"] == bars for f in files)
    into = tmp_path / "run"
    into.mkdir()
    fetch_snapshot(store.url("data"), cfg.train, str(into))
    assert sorted(p.name for p in into.iterdir()) == sorted(k.split("/")[1] for k in keys)
    market = load_market("binance", ["BTC/USDT", "ETH/USDT"], "1h", into, "2024-05-01", "2024-06-01")
    venue = load_second_venue(market, "coinbase", "USD", into)
    bundled = load_second_venue(market, "coinbase", "USD")
    assert venue.available.all() and np.array_equal(venue.close, bundled.close)
    # spot only: the primary's files alone
    spot = PipelineConfig()
    apply_mapping(spot, {"pairs": ["BTC/USDT"], "start": "2024-05-01", "end": "2024-06-01", "val_days": 5,
                         "strategies": ["spot"]}, "test")
    other = Pipeline(spot, LocalStore(str(tmp_path / "spot")), executor=None)
    other.state = PipelineState()
    other.snapshot_data()
    assert [f["key"] for f in other.state.data.files] == ["data/binance_BTC-USDT_1h.csv.gz"]
    # a run with arbitrage on, from a snapshot without the second venue: arbitrage masked, no error
    bare = tmp_path / "bare"
    bare.mkdir()
    train = TrainConfig()
    train.data.pairs = ["BTC/USDT"]
    fetch_snapshot(LocalStore(str(tmp_path / "spot")).url("data"), train, str(bare))
    assert [p.name for p in bare.iterdir()] == ["binance_BTC-USDT_1h.csv.gz"]


def test_data_fetch_gets_the_second_venue_for_the_same_pairs(tmp_path, monkeypatch):
    """`nexlify data fetch --second-exchange coinbase`: the same coins quoted in USD, into the same cache."""
    from nexlify.cli import cmd_data_fetch
    from nexlify.data import fetch as fetch_module
    from nexlify.data.candles import bundled_dir, read_candles
    from tests.test_fetch import FakeExchange

    served = {"binance": {"BTC/USDT": read_candles(bundled_dir() / "binance_BTC-USDT_1h.csv.gz")},
              "coinbase": {"BTC/USD": read_candles(bundled_dir() / "coinbase_BTC-USD_1h.csv.gz")}}
    clients = {name: FakeExchange(candles, now="2024-06-01T00:30") for name, candles in served.items()}
    monkeypatch.setattr(fetch_module, "make_client", lambda exchange: clients[exchange])
    from controller.cli import build_parser

    args = build_parser().parse_args(["data", "fetch", "--pairs", "BTC/USDT", "--since", "2024-05-30",
                                      "--until", "2024-06-01", "--cache-dir", str(tmp_path),
                                      "--second-exchange", "coinbase"])
    assert cmd_data_fetch(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binance_BTC-USDT_1h.csv.gz", "coinbase_BTC-USD_1h.csv.gz"]
    assert len(read_candles(tmp_path / "coinbase_BTC-USD_1h.csv.gz")) == 48
    assert [c[0] for c in clients["coinbase"].calls] == ["BTC/USD"]
