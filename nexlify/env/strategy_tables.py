"""Everything the strategies beyond spot need from the market, computed once per run, not per step.

Whatever depends only on the market (prices of both venues, volumes, the utilization path) and the
parameters is computed here for every (bar, pair) at once; a step then gathers ONE column of each
table per (episode, pair), with the row numbers it uses for prices. Every entry for bar t uses bars
<= t only (the edge at bar t's open for the fills at that open, the edge at bar t's close for the
decision taken at that close), so the tables add no look-ahead.

`floats` [FLOAT_ROWS, T * N] (dtype of the environment):
- venue2_open: the second venue's open (the primary's open where it has no candle: never used then)
- pool_fee_volume: fee_tier * the Uniswap pool's volume in the bar (candle base volume * close *
  dex_volume_share): the fees the whole pool earns in the bar, in quote
- pool_liquidity: the pool's other active liquidity at the bar's close, from its TVL (uniswap_v3)
- spread_feature: (venue2 close / primary close - 1) in bps / 10, clipped to +-10 (0 where unavailable);
  includes the USDT/USD drift (arbitrage.SPREAD_FEATURE)
- edge_feature: the better direction's net edge at the closes in bps / 10, clipped to +-10 (0 where
  unavailable)
- venue2_available: 1.0 where arbitrage can trade the pair at this bar, else 0.0
- sqrt_open, sqrt_close: square roots of the primary's open and close (Uniswap V3 works in sqrt prices)
`flags` [FLAG_ROWS, T * N] bool:
- quoted: both venues have this bar's candle (primary not a gap bar), the coin has transfer terms
- mask_ab / mask_ba: quoted and the net edge at the bar's CLOSES beats min_edge, buying on the primary
  and selling on the second venue (ab) or the reverse (ba): what the agent may ask for at that close
- fill_ab / fill_ba: the same at the bar's OPENS: the direction arbitrage.arb_trade takes at that open
`bars` [BAR_ROWS, T]: the Aave supply growth over the bar, the supply rate (annual) x 10 and the
utilization (as of the bar's open: never a later value), the last two as observation features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import structlog
import torch
from torch import Tensor

from nexlify.env.market import MarketTensors
from nexlify.strategies import aave, arbitrage, staking, uniswap_v3
from nexlify.strategies.params import StrategyParams, base_of

log = structlog.get_logger(__name__)

FLOAT_ROWS = ("venue2_open", "pool_fee_volume", "pool_liquidity", "spread_feature", "edge_feature", "venue2_available",
              "sqrt_open", "sqrt_close")
FLAG_ROWS = ("quoted", "mask_ab", "mask_ba", "fill_ab", "fill_ba")
BAR_ROWS = ("supply_growth", "supply_apy_feature", "utilization")
(V2_OPEN, POOL_FEE_VOLUME, POOL_LIQUIDITY, SPREAD_FEATURE, EDGE_FEATURE, V2_AVAILABLE, SQRT_OPEN,
 SQRT_CLOSE) = range(len(FLOAT_ROWS))
QUOTED, MASK_AB, MASK_BA, FILL_AB, FILL_BA = range(len(FLAG_ROWS))
SUPPLY_GROWTH, SUPPLY_APY_FEATURE, UTILIZATION = range(len(BAR_ROWS))


@dataclass
class StrategyTables:
    """Per-run tables and per-market-column constants of the enabled strategies (see the module doc)."""

    staking: bool
    lp: bool
    lending: bool
    arbitrage: bool
    params: StrategyParams
    bar_hours: float
    floats: Tensor  # [FLOAT_ROWS, T * N]
    flags: Tensor  # [FLAG_ROWS, T * N] bool
    bars: Tensor  # [BAR_ROWS, T]
    prices: Tensor  # [4, T * N] open, high, low, close in the environment's dtype (rows contiguous)
    # per bar [T], on the host: some pair can be arbitraged at the bar's open (fill) / close (mask); the
    # environment skips the arbitrage fills of a step in which no episode's bar has any, with no device sync
    bar_has_fill: np.ndarray
    bar_has_mask: np.ndarray
    # per market column [N]
    stake_growth: Tensor  # per-bar growth of staked units (1 where not stakeable)
    stake_apy: Tensor  # effective annual yield (0 where not stakeable)
    unbond_bars: Tensor  # int64
    stakeable: Tensor  # bool
    withdrawal_fee_units: Tensor
    transfer_bars: Tensor  # int64, at least 1

    @property
    def any(self) -> bool:
        return self.staking or self.lp or self.lending or self.arbitrage

    @classmethod
    def for_market(cls, market: MarketTensors, strategies: list[str], params: StrategyParams,
                   dtype: torch.dtype) -> "StrategyTables":
        """Built once per (market, strategies, params, dtype) and cached on the market."""
        key = ("strategy_tables", tuple(sorted(strategies)), repr(params), dtype)
        if key not in market.cache:
            market.cache[key] = cls._build(market, set(strategies), params, dtype)
        return market.cache[key]

    @classmethod
    def _build(cls, market: MarketTensors, enabled: set[str], params: StrategyParams,
               dtype: torch.dtype) -> "StrategyTables":
        dev = market.prices.device
        T, N = market.prices.shape[:2]
        f64 = torch.float64
        bar_hours = bar_hours_of(market)
        prices = market.prices.to(f64)
        open_, close = prices[..., 0], prices[..., 3]
        coins = [base_of(pair) for pair in market.pairs]
        staking_on, lp_on, lending_on = "staking" in enabled, "lp" in enabled, "lending" in enabled

        stake = staking.pair_tensors(params.staking, market.pairs, bar_hours, dtype=f64, device=dev)
        terms = [params.staking.asset(c) for c in coins]
        apy = torch.tensor([a.apy if a else 0.0 for a in terms], dtype=f64, device=dev)

        floats = torch.zeros((len(FLOAT_ROWS), T, N), dtype=f64, device=dev)
        flags = torch.zeros((len(FLAG_ROWS), T, N), dtype=torch.bool, device=dev)
        floats[V2_OPEN] = open_
        lp = params.lp
        if lp_on:
            volume = uniswap_v3.pool_volume_usd(market.volume.to(f64), close, lp.dex_volume_share)
            floats[POOL_FEE_VOLUME] = lp.fee_tier * volume
            floats[POOL_LIQUIDITY] = uniswap_v3.pool_liquidity_from_tvl(lp.pool_tvl_usd, close, lp.pool_range_width)
            floats[SQRT_OPEN], floats[SQRT_CLOSE] = torch.sqrt(open_), torch.sqrt(close)

        arb = params.arbitrage
        known = set(arb.withdrawal_fee_units) & set(arb.rebalance_delay_hours)
        supported = torch.tensor([c in known for c in coins], dtype=torch.bool, device=dev)
        fee_units = torch.tensor([arb.withdrawal_fee_units[c] if c in known else 0.0 for c in coins],
                                 dtype=f64, device=dev)
        delays = [max(1, math.ceil(arb.rebalance_delay_hours[c] / bar_hours - 1e-9)) if c in known else 1
                  for c in coins]
        arbitrage_on = "arbitrage" in enabled
        if arbitrage_on and not bool(supported.all()):
            log.warning("arbitrage_unsupported_coins", coins=[c for c in coins if c not in known],
                        effect="arbitrage masked for these pairs; configure withdrawal_fee_units and "
                               "rebalance_delay_hours to enable it")
        if arbitrage_on and market.venue2_prices is not None:
            quoted = market.venue2_available.to(dev) & supported & market.tradable.to(dev)
            v2 = market.venue2_prices.to(f64)
            v2_open = torch.where(quoted, v2[..., 0], open_)
            v2_close = torch.where(quoted, v2[..., 3], close)
            floats[V2_OPEN] = v2_open
            flags[QUOTED] = quoted

            def edges(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
                transfer = arbitrage.transfer_cost_frac(fee_units, a, arb.rebalance_notional_usd)
                return (arbitrage.arb_edge(a, b, arb.taker_fee_a, arb.taker_fee_b, transfer),
                        arbitrage.arb_edge(b, a, arb.taker_fee_b, arb.taker_fee_a, transfer))

            close_ab, close_ba = edges(close, v2_close)
            open_ab, open_ba = edges(open_, v2_open)
            flags[MASK_AB], flags[MASK_BA] = quoted & (close_ab > arb.min_edge), quoted & (close_ba > arb.min_edge)
            flags[FILL_AB], flags[FILL_BA] = quoted & (open_ab > arb.min_edge), quoted & (open_ba > arb.min_edge)
            spread = arbitrage.spread_bps(close, v2_close)
            floats[SPREAD_FEATURE] = torch.where(quoted, (spread / 10.0).clamp(-10.0, 10.0), 0.0)
            floats[EDGE_FEATURE] = torch.where(quoted, (torch.maximum(close_ab, close_ba) * 1e3).clamp(-10.0, 10.0),
                                               0.0)
            floats[V2_AVAILABLE] = quoted.to(f64)

        bars = torch.zeros((len(BAR_ROWS), T), dtype=f64, device=dev)
        bars[SUPPLY_GROWTH] = 1.0
        if lending_on:
            stamps = torch.as_tensor(market.timestamps, dtype=torch.int64, device=dev)
            utilization = aave.utilization_path(params.aave, stamps)
            rate = aave.supply_rate_for(utilization, params.aave)
            bars[SUPPLY_GROWTH] = aave.per_bar_supply_growth(rate, bar_hours)
            bars[SUPPLY_APY_FEATURE] = rate * 10.0
            bars[UTILIZATION] = utilization

        return cls(
            staking=staking_on, lp=lp_on, lending=lending_on, arbitrage=arbitrage_on, params=params,
            bar_hours=bar_hours,
            floats=floats.reshape(len(FLOAT_ROWS), T * N).to(dtype).contiguous(),
            flags=flags.reshape(len(FLAG_ROWS), T * N).contiguous(),
            bars=bars.to(dtype).contiguous(),
            prices=market.prices.to(dtype).reshape(T * N, 4).t().contiguous(),
            bar_has_fill=(flags[FILL_AB] | flags[FILL_BA]).any(-1).cpu().numpy(),
            bar_has_mask=(flags[MASK_AB] | flags[MASK_BA]).any(-1).cpu().numpy(),
            stake_growth=torch.where(stake.stakeable & staking_on, stake.growth, 1.0).to(dtype),
            stake_apy=(apy if staking_on else torch.zeros_like(apy)).to(dtype),
            unbond_bars=stake.unbond_bars, stakeable=stake.stakeable & staking_on,
            withdrawal_fee_units=fee_units.to(dtype),
            transfer_bars=torch.tensor(delays, dtype=torch.int64, device=dev),
        )


def bar_hours_of(market: MarketTensors) -> float:
    """Hours per bar from the first two timestamps (1 for a market of one bar)."""
    if market.n_bars < 2:
        return 1.0
    return float(int(market.timestamps[1]) - int(market.timestamps[0])) / 3_600_000.0
