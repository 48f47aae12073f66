"""Uniswap V3 concentrated liquidity: position amounts and value, fees, impermanent loss.

Model
-----
Prices `p` are quote per base (USDT per ETH), the pair's candle prices. A position is liquidity `L`
on a price range [pa, pb] (0 < pa < pb). From the Uniswap V3 whitepaper (section 6.2-6.3; with
sqrt prices, eq. 6.29-6.30), the real token amounts it holds at price p are:

    p <= pa:       x = L (1/sqrt(pa) - 1/sqrt(pb)),   y = 0                      (all base)
    pa < p < pb:   x = L (1/sqrt(p)  - 1/sqrt(pb)),   y = L (sqrt(p) - sqrt(pa))
    p >= pb:       x = 0,                             y = L (sqrt(pb) - sqrt(pa)) (all quote)

which is the middle line evaluated at p clamped to [pa, pb], so `amounts` is continuous at both
edges by construction. x is in base units, y in quote units, and value = x * p + y (quote units).
Impermanent loss against holding the opening amounts falls out of these formulas
(`impermanent_loss_vs_hold`); nothing about it is put in by hand.

Assumptions, stated once:
- Ranges are symmetric percentages around a price, `range_around(p, w)` = (p (1 - w), p (1 + w)).
  Ticks are ignored: real ranges snap to the pool's tick spacing (10 ticks = ~0.1% for the 0.05%
  tier, 60 ticks = ~0.6% for 0.3%); at the widths used here (5-25%) the difference is small.
- Fees: a bar's pool volume is the Binance candle's base volume * close * `dex_volume_share`.
  Our position earns `fee_tier * pool_volume * in_range_fraction * our_share`, where
  * `in_range_fraction` is the fraction of the bar's [low, high] interval that overlaps [pa, pb]:
    the price is assumed to spend equal time at every level between the bar's low and high. A bar
    entirely inside the range counts fully, one entirely outside not at all, and a flat bar
    (high == low) counts fully when its price is in range. (The cruder "in range if the close is"
    misses fees on bars that cross the range and credits fees on bars that barely touch it.)
  * `our_share = L / (L + pool_active_liquidity)`: the pool's other liquidity active at the price,
    in the same L units. It is derived from a configured pool TVL in USD, assumed to be spread like
    one position over +-`pool_range_width` around the current price (`pool_liquidity_from_tvl`).
- Gas is a fixed USD cost per open (mint) and per close (decrease + collect + burn), in `LPParams`.
- Opening at value V assumes we can split V into the needed x and y at price p; the swap needed to
  get that split is not charged here (the environment may charge its spot fee on it).
- Fees are credited in quote units at the bar's close, not reinvested into L.

Every function takes tensors of any broadcastable shape ([B, P] in the environment), returns new
tensors, never loops over elements and never syncs the device to Python. Preconditions such as
0 < pa < pb are the caller's (checked in LPParams for the configured values, not per element).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nexlify.errors import InputError
from nexlify.strategies._tensors import TensorLike, as_float_tensors

# The fee tiers Uniswap V3 pools exist at on Ethereum (0.01%, 0.05%, 0.3%, 1%).
FEE_TIERS = (0.0001, 0.0005, 0.003, 0.01)


@dataclass(frozen=True)
class LPParams:
    """Assumptions of the liquidity-providing strategy; each value's source or reasoning is given.

    - fee_tier 0.0005: the 0.05% tier, where the deepest ETH/stablecoin pools on Ethereum trade.
      Accepted: one of Uniswap V3's tiers, 0.0001 / 0.0005 / 0.003 / 0.01.
    - range_width 0.10: the position's range is +-10% around the price at opening (0.05 and 0.25
      are the other widths we study). Accepted: 0 < width < 1.
    - dex_volume_share 0.10 (ASSUMPTION): the pool's volume as a fraction of the Binance candle's
      volume. Anchor: CoinGecko's DEX-to-CEX spot volume ratio, ~10% in March 2024, 0.13 in Q1 2025
      and 0.23 in Q2 2025 (CoinGecko Q2 2025 crypto industry report, July 2025; CoinGecko/DefiLlama
      study, Nov 2025: 6% in 2021 -> 21.2% in 2025). That ratio covers all DEXes and pairs, so using
      it for one pool against one Binance pair is a rough stand-in, kept at the low end on purpose.
    - pool_tvl_usd 50e6 and pool_range_width 0.10 (ASSUMPTION): the pool's other liquidity, $50M
      spread like one position over +-10% around the price; our share of fees is L / (L + its L).
    - Gas (chain ASSUMPTION: Ethereum mainnet): gas used by Uniswap's NonfungiblePositionManager from
      its gas snapshots (Uniswap/v3-periphery, test/__snapshots__/NonfungiblePositionManager.spec.ts.snap:
      "mint gas first mint for ticks" 434,903; "multicall exit gas" = decreaseLiquidity + collect +
      burn 178,028), at gas_price_gwei 5 (ASSUMPTION: a typical mainnet base + priority fee in
      2024-25 outside congestion spikes) and eth_usd_for_gas 2,500 (ASSUMPTION: ETH around
      2,500 USD in the first half of 2025; the bundled data ends at ~2,500 in May 2025). That makes
      an open ~5.44 USD and a close ~2.23 USD. On an L2 such as Arbitrum both would be cents.
    """

    fee_tier: float = 0.0005
    range_width: float = 0.10
    dex_volume_share: float = 0.10
    pool_tvl_usd: float = 50_000_000.0
    pool_range_width: float = 0.10
    gas_units_open: float = 434_903.0
    gas_units_close: float = 178_028.0
    gas_price_gwei: float = 5.0
    eth_usd_for_gas: float = 2_500.0

    def __post_init__(self) -> None:
        if not any(math.isclose(self.fee_tier, tier, rel_tol=0, abs_tol=1e-12) for tier in FEE_TIERS):
            raise InputError(f"LP fee_tier {self.fee_tier!r} is not a Uniswap V3 fee tier; accepted: "
                             + ", ".join(str(t) for t in FEE_TIERS))
        for name in ("range_width", "pool_range_width"):
            width = getattr(self, name)
            if not (math.isfinite(width) and 0.0 < width < 1.0):
                raise InputError(f"LP {name} {width!r} is out of range; accepted: 0 < width < 1 "
                                 "(0.10 = +-10% around the price)")
        if not (math.isfinite(self.dex_volume_share) and self.dex_volume_share > 0):
            raise InputError(f"LP dex_volume_share {self.dex_volume_share!r} is invalid; accepted: a positive "
                             "fraction of the candle's volume, e.g. 0.1")
        for name in ("pool_tvl_usd", "gas_units_open", "gas_units_close", "gas_price_gwei", "eth_usd_for_gas"):
            number = getattr(self, name)
            if not (math.isfinite(number) and number >= 0):
                raise InputError(f"LP {name} {number!r} is invalid; accepted: a number >= 0")

    @property
    def gas_usd_open(self) -> float:
        return self.gas_units_open * self.gas_price_gwei * 1e-9 * self.eth_usd_for_gas

    @property
    def gas_usd_close(self) -> float:
        return self.gas_units_close * self.gas_price_gwei * 1e-9 * self.eth_usd_for_gas


# ------------------------------------------------------------------------------------------------
# Position arithmetic


def range_around(p: TensorLike, width: TensorLike) -> tuple[Tensor, Tensor]:
    """The symmetric-percentage range (p (1 - width), p (1 + width)); ticks ignored."""
    p, width = as_float_tensors(p, width)
    return p * (1.0 - width), p * (1.0 + width)


def amounts(L: TensorLike, p: TensorLike, pa: TensorLike, pb: TensorLike) -> tuple[Tensor, Tensor]:
    """Token amounts (x base units, y quote units) of liquidity L on [pa, pb] at price p."""
    L, p, pa, pb = as_float_tensors(L, p, pa, pb)
    sqrt_pa, sqrt_pb = torch.sqrt(pa), torch.sqrt(pb)
    sqrt_p = torch.sqrt(torch.minimum(torch.maximum(p, pa), pb))  # p clamped into the range
    x = L * (1.0 / sqrt_p - 1.0 / sqrt_pb)
    y = L * (sqrt_p - sqrt_pa)
    return x, y


def value(L: TensorLike, p: TensorLike, pa: TensorLike, pb: TensorLike) -> Tensor:
    """Value of the position in quote units at price p: x * p + y."""
    x, y = amounts(L, p, pa, pb)
    return x * torch.as_tensor(p, dtype=x.dtype, device=x.device) + y


def liquidity_for_value(value_usd: TensorLike, p: TensorLike, pa: TensorLike, pb: TensorLike) -> Tensor:
    """The liquidity L of a position opened at price p on [pa, pb] that is worth `value_usd`.
    Value is linear in L, so L = value_usd / (value of L = 1); the value of L = 1 is positive for
    any p > 0 and 0 < pa < pb."""
    value_usd, p, pa, pb = as_float_tensors(value_usd, p, pa, pb)
    return value_usd / value(torch.ones_like(p), p, pa, pb)


def in_range(p: TensorLike, pa: TensorLike, pb: TensorLike) -> Tensor:
    """True where pa <= p <= pb (both edges count as in range)."""
    p, pa, pb = as_float_tensors(p, pa, pb)
    return (p >= pa) & (p <= pb)


def in_range_fraction(bar_low: TensorLike, bar_high: TensorLike, pa: TensorLike, pb: TensorLike) -> Tensor:
    """Fraction of a bar the position is assumed in range: the share of the bar's [low, high] interval
    that overlaps [pa, pb] (price assumed to spend equal time at every level of the bar). A flat bar
    counts 1 if its price is in range, else 0."""
    low, high, pa, pb = as_float_tensors(bar_low, bar_high, pa, pb)
    span = high - low
    overlap = (torch.minimum(high, pb) - torch.maximum(low, pa)).clamp(min=0.0)
    flat = span <= 0
    fraction = overlap / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, in_range(low, pa, pb).to(fraction.dtype), fraction.clamp(max=1.0))


# ------------------------------------------------------------------------------------------------
# Fees


def pool_volume_usd(base_volume: TensorLike, close: TensorLike, dex_volume_share: TensorLike) -> Tensor:
    """The pool's volume in quote units during a bar: candle base volume * close * DEX share."""
    base_volume, close, share = as_float_tensors(base_volume, close, dex_volume_share)
    return base_volume * close * share


def pool_liquidity_from_tvl(tvl_usd: TensorLike, p: TensorLike, width: TensorLike) -> Tensor:
    """The pool's active liquidity (L units) if its TVL were one position on +-width around p."""
    pa, pb = range_around(p, width)
    return liquidity_for_value(tvl_usd, p, pa, pb)


def liquidity_share(L: TensorLike, pool_active_liquidity: TensorLike) -> Tensor:
    """Our share of the in-range liquidity: L / (L + the pool's other active liquidity); 0 for L = 0."""
    L, pool = as_float_tensors(L, pool_active_liquidity)
    total = L + pool
    return torch.where(total > 0, L / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


def fee_income(L: TensorLike, bar_low: TensorLike, bar_high: TensorLike, pa: TensorLike, pb: TensorLike,
               fee_tier: TensorLike, pool_volume: TensorLike, pool_active_liquidity: TensorLike) -> Tensor:
    """Fees (quote units) our position earns in one bar:
    fee_tier * pool_volume * in_range_fraction(bar) * L / (L + pool_active_liquidity)."""
    fraction = in_range_fraction(bar_low, bar_high, pa, pb)
    share = liquidity_share(L, pool_active_liquidity)
    fee_tier = torch.as_tensor(fee_tier, dtype=share.dtype, device=share.device)
    pool_volume = torch.as_tensor(pool_volume, dtype=share.dtype, device=share.device)
    return fee_tier * pool_volume * fraction * share


# ------------------------------------------------------------------------------------------------
# Impermanent loss


def impermanent_loss_vs_hold(L: TensorLike, p0: TensorLike, p1: TensorLike, pa: TensorLike,
                             pb: TensorLike) -> Tensor:
    """Value at p1 of the position opened at p0, minus the value at p1 of simply holding the amounts
    it held at p0: value(p1) - (x0 * p1 + y0), in quote units (<= 0; fees not included)."""
    x0, y0 = amounts(L, p0, pa, pb)
    held_value = x0 * torch.as_tensor(p1, dtype=x0.dtype, device=x0.device) + y0
    return value(L, p1, pa, pb) - held_value
