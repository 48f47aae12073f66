"""Hand-checkable arithmetic of the strategies beyond spot (nexlify.strategies).

Every expected number is computed here from the published formulas with `math`, never by calling the
code under test a second way. Batched [B, P] calls are checked against the scalar results, and the
per-step functions are run on meta tensors (which have no data) to prove they never sync to Python.
"""

from __future__ import annotations

import math

import pytest
import torch

from nexlify.errors import InputError
from nexlify.strategies import aave, arbitrage, staking, uniswap_v3

F64 = torch.float64


def t(value) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


# ================================================================================================
# Uniswap V3

# L = 1000 on [1600, 2500]: sqrt(pa) = 40, sqrt(pb) = 50 keep the hand numbers round.
L, PA, PB = 1000.0, 1600.0, 2500.0


def whitepaper_amounts(liq: float, p: float, pa: float, pb: float) -> tuple[float, float]:
    """The three cases of the V3 whitepaper (6.2-6.3), written out separately on purpose."""
    if p <= pa:
        return liq * (1 / math.sqrt(pa) - 1 / math.sqrt(pb)), 0.0
    if p >= pb:
        return 0.0, liq * (math.sqrt(pb) - math.sqrt(pa))
    return liq * (1 / math.sqrt(p) - 1 / math.sqrt(pb)), liq * (math.sqrt(p) - math.sqrt(pa))


@pytest.mark.parametrize("p, x_hand, y_hand, value_hand", [
    (1444.0, 5.0, 0.0, 7220.0),                # below: 1000 (1/40 - 1/50) = 5 ETH, worth 5 * 1444
    (2025.0, 1000 * (1 / 45 - 1 / 50), 5000.0, 9500.0),  # inside: 2.2222 ETH * 2025 + 1000 (45 - 40)
    (2601.0, 0.0, 10_000.0, 10_000.0),         # above: all quote, 1000 (50 - 40)
])
def test_v3_amounts_and_value_below_inside_above(p, x_hand, y_hand, value_hand):
    x_formula, y_formula = whitepaper_amounts(L, p, PA, PB)
    assert x_formula == pytest.approx(x_hand, rel=1e-12) and y_formula == pytest.approx(y_hand, abs=1e-9)
    x, y = uniswap_v3.amounts(t(L), t(p), t(PA), t(PB))
    assert float(x) == pytest.approx(x_hand, rel=1e-12, abs=1e-12)
    assert float(y) == pytest.approx(y_hand, rel=1e-12, abs=1e-9)
    assert float(uniswap_v3.value(t(L), t(p), t(PA), t(PB))) == pytest.approx(value_hand, rel=1e-12)


@pytest.mark.parametrize("edge", [PA, PB])
def test_v3_amounts_are_continuous_at_both_edges(edge):
    below, at, above = t([edge * (1 - 1e-12), edge, edge * (1 + 1e-12)])
    xs, ys = uniswap_v3.amounts(L, torch.stack([below, at, above]), PA, PB)
    x_edge, y_edge = whitepaper_amounts(L, edge, PA, PB)
    assert torch.allclose(xs, t([x_edge] * 3), atol=1e-9)
    assert torch.allclose(ys, t([y_edge] * 3), atol=1e-6)
    values = uniswap_v3.value(L, torch.stack([below, at, above]), PA, PB)
    assert float(values.max() - values.min()) < 1e-5


def test_liquidity_for_value_inverts_value():
    # The inside case above: L = 1000 is worth exactly 9500 at 2025.
    assert float(uniswap_v3.liquidity_for_value(9500.0, t(2025.0), PA, PB)) == pytest.approx(1000.0, rel=1e-12)
    prices = t([900.0, 1600.0, 2000.0, 2400.0, 3000.0])
    pa, pb = uniswap_v3.range_around(prices, 0.10)
    liq = uniswap_v3.liquidity_for_value(t(12_345.0), prices, pa, pb)
    assert torch.allclose(uniswap_v3.value(liq, prices, pa, pb), torch.full_like(prices, 12_345.0), rtol=1e-12)


def test_range_around_is_symmetric_percent():
    pa, pb = uniswap_v3.range_around(t(2000.0), 0.25)
    assert (float(pa), float(pb)) == (1500.0, 2500.0)
    assert uniswap_v3.in_range(t([1499.0, 1500.0, 2000.0, 2500.0, 2501.0]), pa, pb).tolist() == [
        False, True, True, True, False]


@pytest.mark.parametrize("r", [0.5, 2.0, 4.0])
def test_full_range_impermanent_loss_matches_the_closed_form(r):
    p0 = 100.0
    pa, pb = 1e-18, 1e18  # "full range": sqrt terms of 1e-9 are negligible next to 1/sqrt(100) = 0.1
    loss = uniswap_v3.impermanent_loss_vs_hold(t(7.0), t(p0), t(p0 * r), pa, pb)
    x0, y0 = whitepaper_amounts(7.0, p0, pa, pb)
    hold_value = x0 * p0 * r + y0
    assert float(loss) / hold_value == pytest.approx(2 * math.sqrt(r) / (1 + r) - 1, abs=1e-8)


@pytest.mark.parametrize("r", [0.5, 0.8, 1.05, 2.0, 4.0])
def test_concentrated_range_loses_more_than_full_range(r):
    p0 = 100.0

    def loss_fraction(pa, pb):
        loss = uniswap_v3.impermanent_loss_vs_hold(1.0, t(p0), t(p0 * r), pa, pb)
        x0, y0 = uniswap_v3.amounts(1.0, t(p0), pa, pb)
        return float(loss / (x0 * p0 * r + y0))

    full = loss_fraction(1e-18, 1e18)
    narrow = loss_fraction(*uniswap_v3.range_around(t(p0), 0.10))
    assert full < 0 and narrow < full


def test_impermanent_loss_of_a_concentrated_position_by_hand():
    # Opened at 2025 (2.2222 ETH + 5000 USDT); at 2500 it is all quote: 10,000 vs holding
    # 2.2222 * 2500 + 5000 = 10,555.56 -> loss 555.56.
    x0 = 1000 * (1 / 45 - 1 / 50)
    expected = 1000 * (50 - 40) - (x0 * 2500 + 5000)
    assert float(uniswap_v3.impermanent_loss_vs_hold(L, t(2025.0), t(2500.0), PA, PB)) == pytest.approx(expected)
    assert expected == pytest.approx(-555.5555555, rel=1e-9)


def test_fee_income_on_a_constructed_bar():
    # 100 BTC at 50,000 = 5,000,000 USD on Binance; 10% of it through the pool = 500,000 USD; at 0.3%
    # that is 1,500 USD of fees; with 1% of the active liquidity (L = 1 next to 99) we earn 15 USD.
    volume = uniswap_v3.pool_volume_usd(t(100.0), t(50_000.0), 0.1)
    assert float(volume) == pytest.approx(500_000.0)
    pa, pb = 45_000.0, 55_000.0
    fee = uniswap_v3.fee_income(t(1.0), t(49_000.0), t(51_000.0), pa, pb, 0.003, volume, t(99.0))
    assert float(fee) == pytest.approx(15.0, rel=1e-12)
    # Half of the bar's [40,000, 50,000] lies in the range: half the fees.
    half = uniswap_v3.fee_income(t(1.0), t(40_000.0), t(50_000.0), pa, pb, 0.003, volume, t(99.0))
    assert float(half) == pytest.approx(7.5, rel=1e-12)
    # Entirely below the range: nothing.
    assert float(uniswap_v3.fee_income(t(1.0), t(30_000.0), t(40_000.0), pa, pb, 0.003, volume, t(99.0))) == 0.0


def test_in_range_fraction_of_flat_and_covering_bars():
    frac = uniswap_v3.in_range_fraction(t([100.0, 120.0, 90.0, 95.0]), t([100.0, 120.0, 130.0, 105.0]), 95.0, 110.0)
    # flat bar in range -> 1; flat bar out of range -> 0; bar [90, 130] covers [95, 110]: 15/40;
    # bar [95, 105] inside -> 1.
    assert frac.tolist() == pytest.approx([1.0, 0.0, 15.0 / 40.0, 1.0])


def test_pool_liquidity_from_tvl_and_share():
    pool_l = uniswap_v3.pool_liquidity_from_tvl(t(50e6), t(2000.0), 0.10)
    pa, pb = 1800.0, 2200.0
    assert float(uniswap_v3.value(pool_l, t(2000.0), pa, pb)) == pytest.approx(50e6, rel=1e-12)
    assert float(uniswap_v3.liquidity_share(pool_l / 99.0, pool_l)) == pytest.approx(0.01, rel=1e-12)
    assert float(uniswap_v3.liquidity_share(t(0.0), t(0.0))) == 0.0


def test_lp_params_validate_and_price_gas():
    params = uniswap_v3.LPParams()
    # 434,903 gas * 5 gwei * 2,500 USD/ETH and 178,028 gas likewise.
    assert params.gas_usd_open == pytest.approx(434_903 * 5e-9 * 2500)
    assert params.gas_usd_close == pytest.approx(178_028 * 5e-9 * 2500)
    with pytest.raises(InputError, match="0.002"):
        uniswap_v3.LPParams(fee_tier=0.002)
    with pytest.raises(InputError, match="range_width"):
        uniswap_v3.LPParams(range_width=1.5)


# ================================================================================================
# Aave V3

U_OPT, BASE, S1, S2, RF = 0.92, 0.0, 0.065, 0.35, 0.10


@pytest.mark.parametrize("u, borrow_hand", [
    (0.0, 0.0),
    (0.46, 0.065 * 0.5),                    # half of U*: half of slope1
    (0.91, 0.065 * 0.91 / 0.92),            # just below the kink: still on slope1
    (0.92, 0.065),                          # at U*: base + slope1
    (0.96, 0.065 + 0.35 * 0.04 / 0.08),     # half-way from U* to 1: slope1 + slope2 / 2 = 0.24
    (1.0, 0.065 + 0.35),
])
def test_aave_rates_below_at_and_above_optimal(u, borrow_hand):
    borrow = aave.borrow_rate(t(u), BASE, S1, S2, U_OPT)
    assert float(borrow) == pytest.approx(borrow_hand, abs=1e-15)
    supply = aave.supply_rate(t(u), BASE, S1, S2, U_OPT, RF)
    assert float(supply) == pytest.approx(borrow_hand * u * (1 - RF), abs=1e-15)


def test_aave_supply_rate_hand_numbers_and_defaults():
    assert float(aave.supply_rate(t(0.46), BASE, S1, S2, U_OPT, RF)) == pytest.approx(0.013455)
    assert float(aave.supply_rate(t(0.92), BASE, S1, S2, U_OPT, RF)) == pytest.approx(0.05382)
    assert float(aave.supply_rate(t(0.96), BASE, S1, S2, U_OPT, RF)) == pytest.approx(0.20736)
    params = aave.AaveParams()
    assert (params.optimal_usage_ratio, params.variable_rate_slope1, params.variable_rate_slope2,
            params.reserve_factor) == (U_OPT, S1, S2, RF)
    # At the default 80% utilization: 0.065 * 0.8/0.92 * 0.8 * 0.9
    assert float(aave.supply_rate_for(t(0.80), params)) == pytest.approx(0.065 * 0.8 / 0.92 * 0.8 * 0.9)


def test_aave_per_bar_growth_is_linear_in_the_bar_and_compounds_across_bars():
    growth = aave.per_bar_supply_growth(t(0.05), 1.0)
    assert float(growth) == pytest.approx(1 + 0.05 / 8760, abs=1e-16)
    balance = t(1.0)
    for _ in range(8760):
        balance = balance * growth
    assert float(balance) == pytest.approx((1 + 0.05 / 8760) ** 8760, abs=1e-12)
    assert float(aave.per_bar_supply_growth(t(0.05), 24.0)) == pytest.approx(1 + 0.05 * 24 / 8760, abs=1e-16)


def test_aave_utilization_asof_join_never_looks_ahead():
    series_ts = torch.tensor([1000, 5000, 9000], dtype=torch.int64)
    series_u = t([0.5, 0.6, 0.7])
    bars = torch.tensor([0, 999, 1000, 4999, 5000, 9500], dtype=torch.int64)
    assert aave.align_asof(series_ts, series_u, bars, fill=0.8).tolist() == [0.8, 0.8, 0.5, 0.5, 0.6, 0.7]


def test_aave_utilization_path_from_constant_and_csv(tmp_path):
    bars = torch.tensor([0, 3_600_000, 7_200_000], dtype=torch.int64)
    assert aave.utilization_path(aave.AaveParams(utilization=0.75), bars).tolist() == [0.75] * 3
    csv = tmp_path / "u.csv"
    csv.write_text("timestamp,utilization\n3600000,0.9\n7200001,0.1\n")
    path = aave.utilization_path(aave.AaveParams(utilization_csv=str(csv)), bars)
    assert path.tolist() == [0.80, 0.9, 0.9]  # before the series: the constant; 7,200,001 is after bar 3


@pytest.mark.parametrize("content, match", [
    ("timestamp,utilization\n1000,1.5\n", "1.5"),
    ("timestamp,utilization\n2000,0.5\n1000,0.6\n", "strictly increasing"),
    ("time,u\n1000,0.5\n", "columns"),
])
def test_aave_bad_utilization_csv_is_input_error(tmp_path, content, match):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    with pytest.raises(InputError, match=match):
        aave.load_utilization_csv(csv)


def test_aave_params_validate():
    with pytest.raises(InputError, match="optimal_usage_ratio"):
        aave.AaveParams(optimal_usage_ratio=1.0)
    with pytest.raises(InputError, match="utilization"):
        aave.AaveParams(utilization=1.2)


# ================================================================================================
# Staking


@pytest.mark.parametrize("apy", [0.02839, 0.065])
def test_staking_a_year_of_hourly_bars_yields_exactly_the_apy(apy):
    growth = staking.per_bar_growth(t(apy), 1.0)
    units = t(1.0)
    for _ in range(8760):
        units = staking.accrue(units, growth)
    assert float(units) - 1.0 == pytest.approx(apy, abs=1e-9)


def test_staking_apy_from_apr_and_default_terms():
    assert float(staking.apy_from_apr(0.028, 365.0)) == pytest.approx((1 + 0.028 / 365) ** 365 - 1, rel=1e-12)
    params = staking.StakingParams()
    assert params.asset("eth").apy == pytest.approx((1 + 0.028 / 365) ** 365 - 1, abs=1e-5)
    assert params.asset("BTC") is None
    pairs = staking.pair_tensors(params, ["BTC/USDT", "ETH/USDT", "SOL/USDT"], 1.0)
    assert pairs.stakeable.tolist() == [False, True, True]
    assert pairs.unbond_bars.tolist() == [0, 120, 54]
    assert float(pairs.growth[0]) == 1.0
    assert float(pairs.growth[2]) == pytest.approx(1.065 ** (1 / 8760), rel=1e-15)
    assert staking.pair_tensors(params, ["SOL/USDT"], 4.0).unbond_bars.tolist() == [14]  # 54 h / 4 h, rounded up


def test_staking_discrete_boundaries_credit_daily_and_sum_to_the_apy():
    apy = 0.02839
    growth = staking.boundary_growth(torch.arange(8760, dtype=F64), apy, 365.0, 1.0)
    daily = (1 + apy) ** (1 / 365)
    assert torch.all(growth[:23] == 1.0) and float(growth[23]) == pytest.approx(daily, rel=1e-14)
    assert int((growth > 1.0).sum()) == 365
    assert float(torch.prod(growth)) == pytest.approx(1 + apy, abs=1e-12)
    assert float(torch.prod(growth[:24 * 30])) == pytest.approx((1 + apy) ** (30 / 365), abs=1e-12)


def test_unbonding_blocks_until_the_release_bar_then_frees_everything():
    state = staking.UnbondState(t([10.0]), t([0.0]), torch.tensor([staking.NO_LOT]))
    state = staking.start_unbond(*state, request_units=4.0, now_bar=100, unbond_bars=120)
    assert (state.staked_units.tolist(), state.unbonding_units.tolist(), state.release_bar.tolist()) == (
        [6.0], [4.0], [220])
    # A second request while the lot is pending is masked.
    masked = staking.start_unbond(*state, request_units=3.0, now_bar=150, unbond_bars=120)
    assert (masked.staked_units.tolist(), masked.unbonding_units.tolist(), masked.release_bar.tolist()) == (
        [6.0], [4.0], [220])
    for now in (100, 150, 219):
        assert staking.release_unbonded(now, state.release_bar, state.unbonding_units).freed_units.tolist() == [0.0]
    released = staking.release_unbonded(220, state.release_bar, state.unbonding_units)
    assert released.freed_units.tolist() == [4.0]
    assert released.unbonding_units.tolist() == [0.0] and released.release_bar.tolist() == [staking.NO_LOT]
    # Once released, a new request is accepted again; requests are clipped to what is staked.
    again = staking.start_unbond(state.staked_units, released.unbonding_units, released.release_bar,
                                 request_units=50.0, now_bar=221, unbond_bars=120)
    assert (again.staked_units.tolist(), again.unbonding_units.tolist(), again.release_bar.tolist()) == (
        [0.0], [6.0], [341])
    negative = staking.start_unbond(t([5.0]), t([0.0]), torch.tensor([staking.NO_LOT]), -1.0, 0, 10)
    assert negative.release_bar.tolist() == [staking.NO_LOT] and negative.staked_units.tolist() == [5.0]


def test_unbonding_batched_per_episode_cursor_and_per_pair_delay():
    B, P = 2, 3
    state = staking.empty_unbond_state((B, P))
    state = staking.UnbondState(torch.full((B, P), 10.0, dtype=F64), state.unbonding_units, state.release_bar)
    now = torch.tensor([[100], [500]])  # each episode has its own cursor
    delay = torch.tensor([0, 120, 54])
    request = t([[0.0, 2.0, 3.0], [1.0, 0.0, 10.0]])
    state = staking.start_unbond(*state, request, now, delay)
    assert state.release_bar.tolist() == [[-1, 220, 154], [500, -1, 554]]
    for b in range(B):  # every element matches the scalar call
        for p in range(P):
            scalar = staking.start_unbond(t([10.0]), t([0.0]), torch.tensor([-1]), float(request[b, p]),
                                          int(now[b, 0]), int(delay[p]))
            assert float(state.unbonding_units[b, p]) == float(scalar.unbonding_units[0])
            assert int(state.release_bar[b, p]) == int(scalar.release_bar[0])
    freed = staking.release_unbonded(torch.tensor([[220], [553]]), state.release_bar, state.unbonding_units)
    assert freed.freed_units.tolist() == [[0.0, 2.0, 3.0], [1.0, 0.0, 0.0]]


def test_staking_params_validate():
    with pytest.raises(InputError, match="compounds_per_year"):
        staking.StakedAsset(apy=0.03, compounds_per_year=0.0, unbonding_hours=1.0)


# ================================================================================================
# Arbitrage

FEE_A, FEE_B = 0.001, 0.006


def test_spread_bps_sign_and_size():
    assert float(arbitrage.spread_bps(t(100.0), t(101.0))) == pytest.approx(100.0)
    assert float(arbitrage.spread_bps(t(100.0), t(99.0))) == pytest.approx(-100.0)


def test_arb_edge_after_both_fees_and_transfer():
    # Buy at 100 paying 0.1%: 100.1 spent; sell at 101 paying 0.6%: 100.394 received;
    # 100.394 / 100.1 - 1 = 0.0029371; minus 5 bps of transfer = 0.0024371.
    edge = arbitrage.arb_edge(t(100.0), t(101.0), FEE_A, FEE_B, 0.0005)
    assert float(edge) == pytest.approx(100.394 / 100.1 - 1 - 0.0005, rel=1e-12)
    assert float(edge) == pytest.approx(0.0024371, abs=1e-7)
    # A 50 bps spread does not cover 70 bps of fees: negative edge.
    assert float(arbitrage.arb_edge(t(100.0), t(100.5), FEE_A, FEE_B, 0.0)) < 0
    # transfer cost: 0.0005 BTC at 100,000 over 25,000 USD of volume = 20 bps
    assert float(arbitrage.transfer_cost_frac(0.0005, t(100_000.0), 25_000.0)) == pytest.approx(0.002)
    assert float(arbitrage.transfer_arrival(t(1.0), 0.0005)) == pytest.approx(0.9995)


def trade(quote_a, coin_a, quote_b, coin_b, pa, pb, available=True, cap=10_000.0, min_edge=0.0005, transfer=0.0005):
    return arbitrage.arb_trade(t(quote_a), t(coin_a), t(quote_b), t(coin_b), t(pa), t(pb), available, FEE_A, FEE_B,
                               transfer, min_edge, cap)


def test_arb_trade_profit_after_both_fees():
    # 5005 USDT on A buys 5005 / 100.1 = 50 coins; selling 50 on B yields 50 * 101 * 0.994 = 5019.7 USD.
    fill = trade(5005.0, 0.0, 0.0, 100.0, 100.0, 101.0)
    assert float(fill.units) == pytest.approx(50.0)
    assert float(fill.realised_profit) == pytest.approx(5019.7 - 5005.0)
    assert float(fill.quote_a) == pytest.approx(0.0, abs=1e-9) and float(fill.coin_a) == pytest.approx(50.0)
    assert float(fill.quote_b) == pytest.approx(5019.7) and float(fill.coin_b) == pytest.approx(50.0)
    assert float(fill.notional) == pytest.approx(5000.0) and float(fill.transfer_cost) == pytest.approx(2.5)


def test_arb_trade_mirror_direction_when_b_is_cheap():
    # B at 100 (fee 0.6%): 1006 USD buys 10 coins; sell 10 on A at 102 (fee 0.1%): 1018.98 USDT.
    fill = trade(0.0, 10.0, 1006.0, 0.0, 102.0, 100.0)
    assert float(fill.units) == pytest.approx(-10.0)
    assert float(fill.realised_profit) == pytest.approx(10 * 102 * 0.999 - 1006.0)
    assert (float(fill.coin_a), float(fill.coin_b)) == pytest.approx((0.0, 10.0))


def test_arb_trade_sized_by_inventory_and_cap():
    assert float(trade(1e6, 0.0, 0.0, 10.0, 100.0, 101.0).units) == pytest.approx(10.0)  # coin on B
    assert float(trade(1e6, 0.0, 0.0, 1e3, 100.0, 101.0, cap=1000.0).units) == pytest.approx(10.0)  # notional cap


@pytest.mark.parametrize("pa, pb, available", [
    (100.0, 100.5, True),          # 50 bps spread < 70 bps of fees: no trade
    (100.0, 100.72, True),         # covers the fees but not fees + transfer + buffer
    (100.0, float("nan"), True),   # Coinbase has no candle
    (100.0, 101.0, False),         # flagged not tradable
])
def test_arb_no_trade_below_costs_or_without_a_candle(pa, pb, available):
    fill = trade(5005.0, 3.0, 7.0, 100.0, pa, pb, available=available)
    assert float(fill.units) == 0.0 and float(fill.realised_profit) == 0.0 and float(fill.transfer_cost) == 0.0
    assert [float(v) for v in (fill.quote_a, fill.coin_a, fill.quote_b, fill.coin_b)] == [5005.0, 3.0, 7.0, 100.0]


def test_arb_min_edge_buffer_blocks_thin_edges():
    # Without transfer costs, selling at 100.733 nets 100.733 * 0.994 / 100.1 - 1 = ~3.1 bps: positive,
    # but under a 5 bps buffer. With no buffer the same spread trades.
    edge = 100.733 * 0.994 / 100.1 - 1
    assert 0 < edge < 0.0005
    assert float(trade(5005.0, 0.0, 0.0, 100.0, 100.0, 100.733, transfer=0.0, min_edge=0.0005).units) == 0.0
    fill = trade(5005.0, 0.0, 0.0, 100.0, 100.0, 100.733, transfer=0.0, min_edge=0.0)
    assert float(fill.units) == pytest.approx(50.0)
    assert float(fill.realised_profit) == pytest.approx(5005.0 * edge, rel=1e-9)


def test_arb_params_defaults_and_validation():
    params = arbitrage.ArbParams()
    assert (params.taker_fee_a, params.taker_fee_b, params.min_edge) == (0.001, 0.006, 0.0005)
    pair = arbitrage.pair_tensors(params, ["BTC/USDT", "ETH/USDT", "SOL/USDT"], 1.0)
    assert pair.withdrawal_fee_units.tolist() == [0.0005, 0.00168, 0.01] and pair.delay_bars.tolist() == [1, 1, 1]
    with pytest.raises(InputError, match="DOGE"):
        arbitrage.pair_tensors(params, ["DOGE/USDT"], 1.0)
    with pytest.raises(InputError, match="taker_fee_b"):
        arbitrage.ArbParams(taker_fee_b=0.5)


def test_arb_trade_batched_matches_scalar():
    cases = [  # quote_a, coin_a, quote_b, coin_b, price_a, price_b, available
        (5005.0, 0.0, 0.0, 100.0, 100.0, 101.0, True),
        (0.0, 10.0, 1006.0, 0.0, 102.0, 100.0, True),
        (5005.0, 3.0, 7.0, 100.0, 100.0, 100.5, True),
        (1e6, 0.0, 0.0, 10.0, 100.0, 101.0, True),
        (5005.0, 3.0, 7.0, 100.0, 100.0, float("nan"), True),
        (5005.0, 3.0, 7.0, 100.0, 100.0, 101.0, False),
    ]
    columns = list(zip(*cases))
    grid = [t(list(c)).reshape(2, 3) for c in columns[:6]]
    available = torch.tensor(columns[6]).reshape(2, 3)
    batched = arbitrage.arb_trade(*grid[:4], grid[4], grid[5], available, FEE_A, FEE_B, 0.0005, 0.0005, 10_000.0)
    for i, case in enumerate(cases):
        scalar = trade(*case[:6], available=case[6])
        for name in arbitrage.ArbFill._fields:
            assert float(getattr(batched, name).reshape(-1)[i]) == pytest.approx(float(getattr(scalar, name)), abs=1e-9)


# ================================================================================================
# Batched shapes, dtypes and no device syncs


def test_v3_and_aave_batched_match_scalar_and_keep_float32():
    prices = t([[1444.0, 2025.0, 2601.0], [1600.0, 2500.0, 2000.0]])
    x, y = uniswap_v3.amounts(L, prices, PA, PB)
    for (b, p), price in zip([(b, p) for b in range(2) for p in range(3)], prices.reshape(-1).tolist()):
        x_hand, y_hand = whitepaper_amounts(L, price, PA, PB)
        assert float(x[b, p]) == pytest.approx(x_hand, abs=1e-12) and float(y[b, p]) == pytest.approx(y_hand, abs=1e-9)
    util = t([[0.0, 0.46, 0.92], [0.96, 1.0, 0.5]])
    rates = aave.supply_rate(util, BASE, S1, S2, U_OPT, RF)
    for u, rate in zip(util.reshape(-1).tolist(), rates.reshape(-1).tolist()):
        assert rate == pytest.approx(float(aave.supply_rate(t(u), BASE, S1, S2, U_OPT, RF)), abs=1e-15)
    assert uniswap_v3.value(L, prices.float(), PA, PB).dtype == torch.float32
    assert aave.supply_rate(util.float(), BASE, S1, S2, U_OPT, RF).dtype == torch.float32
    assert staking.accrue(torch.ones(2, 3), staking.per_bar_growth(t([0.0, 0.03, 0.065]), 1.0)).dtype == torch.float32


def test_per_step_functions_never_sync():
    """Meta tensors carry no data: any .item(), bool(tensor) or copy to the host raises on them."""
    B, P = 4, 3

    def m(*shape, dtype=F64):
        return torch.empty(*shape, dtype=dtype, device="meta")

    i64 = torch.int64
    outputs = [
        *uniswap_v3.amounts(m(B, P), m(B, P), m(B, P), m(B, P)),
        uniswap_v3.liquidity_for_value(m(B, P), m(B, P), m(B, P), m(B, P)),
        uniswap_v3.fee_income(m(B, P), m(B, P), m(B, P), m(B, P), m(B, P), 0.0005, m(B, P), m(B, P)),
        uniswap_v3.impermanent_loss_vs_hold(m(B, P), m(B, P), m(B, P), m(B, P), m(B, P)),
        aave.per_bar_supply_growth(aave.supply_rate_for(m(B, P), aave.AaveParams()), 1.0),
        aave.align_asof(m(9, dtype=i64), m(9), m(20, dtype=i64), 0.8),
        staking.accrue(m(B, P), staking.per_bar_growth(m(P), 1.0)),
        staking.boundary_growth(m(B, 1), m(P), 365.0, 1.0),
        *staking.start_unbond(m(B, P), m(B, P), m(B, P, dtype=i64), m(B, P), m(B, 1, dtype=i64), m(P, dtype=i64)),
        *staking.release_unbonded(m(B, 1, dtype=i64), m(B, P, dtype=i64), m(B, P)),
        *arbitrage.arb_trade(m(B, P), m(B, P), m(B, P), m(B, P), m(B, P), m(B, P), m(B, P, dtype=torch.bool),
                             FEE_A, FEE_B, m(P), 0.0005, 10_000.0),
        arbitrage.spread_bps(m(B, P), m(B, P)),
    ]
    assert all(out.device.type == "meta" for out in outputs)
    assert all(out.shape in ((B, P), (20,)) for out in outputs)
