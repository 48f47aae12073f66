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
from typing import NamedTuple

import torch
from torch import Tensor

from nexlify.strategies._tensors import TensorLike, as_float_tensors
from nexlify.strategies.params import FEE_TIERS, LPParams  # noqa: F401 (re-exported)


# ------------------------------------------------------------------------------------------------
# Position arithmetic


def range_around(p: TensorLike, width: TensorLike) -> tuple[Tensor, Tensor]:
    """The symmetric-percentage range (p (1 - width), p (1 + width)); ticks ignored."""
    p, width = as_float_tensors(p, width)
    return p * (1.0 - width), p * (1.0 + width)


def amounts(L: TensorLike, p: TensorLike, pa: TensorLike, pb: TensorLike) -> tuple[Tensor, Tensor]:
    """Token amounts (x base units, y quote units) of liquidity L on [pa, pb] at price p."""
    L, p, pa, pb = as_float_tensors(L, p, pa, pb)
    return amounts_sqrt(L, torch.sqrt(p), torch.sqrt(pa), torch.sqrt(pb))


def amounts_sqrt(L: Tensor, sqrt_p: Tensor, sqrt_pa: Tensor, sqrt_pb: Tensor) -> tuple[Tensor, Tensor]:
    """`amounts` on square roots of the prices (V3 works in sqrt prices; callers that keep a position's
    sqrt bounds save the square roots every bar). sqrt is monotone, so clamping sqrt(p) into
    [sqrt(pa), sqrt(pb)] is clamping p into [pa, pb]."""
    sqrt_p = torch.minimum(torch.maximum(sqrt_p, sqrt_pa), sqrt_pb)
    x = L * (1.0 / sqrt_p - 1.0 / sqrt_pb)
    y = L * (sqrt_p - sqrt_pa)
    return x, y


class SymmetricPosition(NamedTuple):
    L: Tensor
    x: Tensor  # base units at opening
    y: Tensor  # quote units at opening
    sqrt_pa: Tensor
    sqrt_pb: Tensor


def coin_share(width: float) -> float:
    """The share of a position's value held in the coin (x p / value) when it is opened at the middle
    of range_around(p, width): (1 - 1/sqrt(1 + w)) / (2 - 1/sqrt(1 + w) - sqrt(1 - w)), whatever p is
    (just under one half: 0.4875 at w = 0.10)."""
    up, down = math.sqrt(1.0 + width), math.sqrt(1.0 - width)
    return (1.0 - 1.0 / up) / (2.0 - 1.0 / up - down)


def open_symmetric(value_usd: TensorLike, p: TensorLike, width: float,
                   sqrt_p: Tensor | None = None) -> SymmetricPosition:
    """A position worth `value_usd` opened at price p on range_around(p, width), in closed form.

    With s = sqrt(p), sqrt(pa) = s sqrt(1 - w) and sqrt(pb) = s sqrt(1 + w), the whitepaper's amounts at
    p are x = (L / s)(1 - 1/sqrt(1 + w)) and y = L s (1 - sqrt(1 - w)), so value = x p + y = L s k with
    k = 2 - 1/sqrt(1 + w) - sqrt(1 - w). Hence L = value / (s k), x p = value (1 - 1/sqrt(1 + w)) / k and
    y = value (1 - sqrt(1 - w)) / k: the coin share of the value depends on the width only. The same
    numbers as liquidity_for_value + amounts, with one square root instead of five (none when the
    caller has sqrt(p) already)."""
    value_usd, p = as_float_tensors(value_usd, p)
    up, down = math.sqrt(1.0 + width), math.sqrt(1.0 - width)
    k = 2.0 - 1.0 / up - down
    s = torch.sqrt(p) if sqrt_p is None else sqrt_p
    return SymmetricPosition(L=value_usd / (s * k), x=value_usd * ((1.0 - 1.0 / up) / k) / p,
                             y=value_usd * ((1.0 - down) / k), sqrt_pa=s * down, sqrt_pb=s * up)


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
    fraction = (overlap / span.clamp(min=torch.finfo(span.dtype).tiny)).clamp(max=1.0)  # a flat bar: 0 / tiny
    return torch.where(span <= 0, in_range(low, pa, pb).to(fraction.dtype), fraction)


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
    # L >= 0 and pool >= 0: where the total is 0 so is L, and L / tiny = 0
    return L / (L + pool).clamp(min=torch.finfo(L.dtype).tiny)


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
