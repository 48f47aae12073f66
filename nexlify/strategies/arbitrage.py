"""Cross-exchange arbitrage between two venues quoting the same coin.

Venue A is Binance (BTC/USDT: quoted in the stablecoin USDT), venue B is Coinbase (BTC-USD: quoted in
US dollars). Their price gap therefore mixes two things: a true price difference between the venues
AND the USDT/USD exchange rate (USDT trades off its 1.00 peg by a few bps, sometimes tens). The spread
feature is named for that (`SPREAD_FEATURE`), and accounting adds USD and USDT at par: a profit that
is really USDT/USD drift is counted as profit, and a rebalancing of the quote currencies would have
to convert them (not modelled).

Model
-----
- `spread_bps(a, b)` = (b / a - 1) * 10,000: positive when venue B is dearer.
- Buying one coin on the cheap venue costs price_cheap * (1 + fee_cheap); selling it on the dear
  venue yields price_dear * (1 - fee_dear) (taker fees, charged in quote). The net fractional edge
  of the round trip, per unit of quote spent, after the amortised cost of moving the coin back is
      edge = price_dear (1 - fee_dear) / (price_cheap (1 + fee_cheap)) - 1 - transfer_cost_frac,
  positive only when the spread exceeds all the costs.
- Inventory is pre-positioned on both venues (quote cash and coin on each), so a trade is two
  simultaneous taker fills: no transfer inside the trade. Size is limited by the quote on the cheap
  venue, the coin on the dear venue and a notional cap. A trade happens only when the edge beats
  the `min_edge` buffer.
- Rebalancing: every arbitrage moves coin from the dear venue's inventory to the cheap venue's. Moving
  it back costs a withdrawal fee in coin units and takes `rebalance_delay_hours`. The fee is
  amortised over `rebalance_notional_usd` of arbitrage volume: transfer_cost_frac = fee_units * price /
  rebalance_notional_usd.
- Prices are whatever the caller passes (the environment fills at the next bar's open of each venue).
  A venue without a candle (NaN price) or a pair flagged not tradable never trades.

Every function takes tensors of any broadcastable shape ([B, P] in the environment), returns new
tensors, never loops over elements and never syncs the device to Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from nexlify.errors import InputError
from nexlify.strategies._tensors import TensorLike, as_float_tensors
from nexlify.strategies.params import SPREAD_FEATURE, ArbParams  # noqa: F401 (re-exported)


class PairArbitrage(NamedTuple):
    withdrawal_fee_units: Tensor  # [P]
    delay_bars: Tensor  # [P] int64


def pair_tensors(params: ArbParams, pairs: Sequence[str], bar_hours: float, *,
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> PairArbitrage:
    """Per-pair [P] withdrawal fee (coin units) and rebalancing delay in whole bars (rounded up).
    A coin missing from the tables raises InputError: arbitrage on it would be free of transfer
    costs, which is never true."""
    dtype = torch.float64 if dtype is None else dtype
    if not (math.isfinite(bar_hours) and bar_hours > 0):
        raise InputError(f"bar_hours {bar_hours!r} is invalid; accepted: a positive number of hours")
    coins = [pair.split("/")[0].strip().upper() for pair in pairs]
    known = set(params.withdrawal_fee_units) & set(params.rebalance_delay_hours)
    for coin in coins:
        if coin not in known:
            raise InputError(f"arbitrage has no withdrawal fee or delay for {coin!r}; accepted coins: "
                             + ", ".join(sorted(known)))
    fees = [params.withdrawal_fee_units[c] for c in coins]
    bars = [math.ceil(params.rebalance_delay_hours[c] / bar_hours - 1e-9) for c in coins]
    return PairArbitrage(
        withdrawal_fee_units=torch.tensor(fees, dtype=dtype, device=device),
        delay_bars=torch.tensor(bars, dtype=torch.int64, device=device),
    )


class ArbFill(NamedTuple):
    quote_a: Tensor
    coin_a: Tensor
    quote_b: Tensor
    coin_b: Tensor
    units: Tensor  # coin traded: > 0 bought on A and sold on B, < 0 bought on B and sold on A
    notional: Tensor  # quote spent on the buying leg, before its fee
    realised_profit: Tensor  # quote received - quote spent, after both taker fees (USD and USDT at par)
    transfer_cost: Tensor  # amortised rebalancing cost of this trade: notional * transfer_cost_frac


# ------------------------------------------------------------------------------------------------
# Spread and edge


def spread_bps(price_a: TensorLike, price_b: TensorLike) -> Tensor:
    """(price_b / price_a - 1) in basis points: positive when venue B is dearer. With A = Binance USDT
    and B = Coinbase USD it includes the USDT/USD rate (see SPREAD_FEATURE)."""
    a, b = as_float_tensors(price_a, price_b)
    return (b / a - 1.0) * 1e4


def transfer_cost_frac(withdrawal_fee_units: TensorLike, price: TensorLike,
                       rebalance_notional_usd: TensorLike) -> Tensor:
    """A coin withdrawal fee as a fraction of the arbitrage volume one transfer serves."""
    fee, price, notional = as_float_tensors(withdrawal_fee_units, price, rebalance_notional_usd)
    return fee * price / notional


def arb_edge(price_cheap: TensorLike, price_dear: TensorLike, fee_cheap: TensorLike, fee_dear: TensorLike,
             transfer_cost: TensorLike) -> Tensor:
    """Net fractional profit per unit of quote spent of buying on the cheap venue and selling on the dear
    one, after both taker fees and the amortised transfer cost; > 0 only when the spread beats them."""
    cheap, dear, fee_cheap, fee_dear, transfer = as_float_tensors(price_cheap, price_dear, fee_cheap, fee_dear,
                                                                  transfer_cost)
    return dear * (1.0 - fee_dear) / (cheap * (1.0 + fee_cheap)) - 1.0 - transfer


def transfer_arrival(amount_units: TensorLike, withdrawal_fee_units: TensorLike) -> Tensor:
    """Coin units that arrive on the other venue after a withdrawal of `amount_units` (0 if the fee
    exceeds the amount)."""
    amount, fee = as_float_tensors(amount_units, withdrawal_fee_units)
    return (amount - fee).clamp(min=0.0)


# ------------------------------------------------------------------------------------------------
# Trade


def directed_units(quote_a: Tensor, coin_a: Tensor, quote_b: Tensor, coin_b: Tensor, price_a: Tensor,
                   price_b: Tensor, buy_a: Tensor, buy_b: Tensor, fee_a: TensorLike, fee_b: TensorLike,
                   max_notional: TensorLike) -> Tensor:
    """Signed coin units of one arbitrage whose direction is decided (buy_a: buy on A and sell on B;
    buy_b: the mirror image; neither: 0). Sized by the quote on the cheap venue (fee included), the
    coins on the dear venue and the notional cap: q = min(quote_cheap / (price_cheap (1 + fee_cheap)),
    coin_dear, max_notional / price_cheap). + buys on A, - buys on B. Prices must be finite and > 0."""
    q_ab = torch.minimum(torch.minimum(quote_a.clamp(min=0.0) / (price_a * (1.0 + fee_a)), coin_b.clamp(min=0.0)),
                         max_notional / price_a)
    q_ba = torch.minimum(torch.minimum(quote_b.clamp(min=0.0) / (price_b * (1.0 + fee_b)), coin_a.clamp(min=0.0)),
                         max_notional / price_b)
    return torch.where(buy_a, q_ab, 0.0) - torch.where(buy_b, q_ba, 0.0)


class Settled(NamedTuple):
    quote_a: Tensor
    coin_a: Tensor
    quote_b: Tensor
    coin_b: Tensor
    fees: Tensor  # taker fees paid on both legs, in quote (USD and USDT at par)


def settle(quote_a: Tensor, coin_a: Tensor, quote_b: Tensor, coin_b: Tensor, units: Tensor, price_a: TensorLike,
           price_b: TensorLike, fee_a: TensorLike, fee_b: TensorLike) -> Settled:
    """Both legs of an arbitrage of `units` coins (+: bought on A at price_a, sold on B at price_b;
    -: the mirror image), each leg a taker fill paying its venue's fee in quote. The realised profit is
    units * (price_b - price_a) - fees."""
    size = units.abs()
    return Settled(
        quote_a=quote_a - units * price_a - size * (price_a * fee_a),
        coin_a=coin_a + units,
        quote_b=quote_b + units * price_b - size * (price_b * fee_b),
        coin_b=coin_b - units,
        fees=size * (price_a * fee_a + price_b * fee_b),
    )


def arb_trade(quote_a: Tensor, coin_a: Tensor, quote_b: Tensor, coin_b: Tensor, price_a: TensorLike,
              price_b: TensorLike, available: TensorLike, fee_a: TensorLike, fee_b: TensorLike,
              transfer_cost: TensorLike, min_edge: TensorLike, max_notional: TensorLike) -> ArbFill:
    """One bar of arbitrage from pre-positioned inventory on both venues.

    Where buying on A and selling on B has an edge above `min_edge`, buy q coins on A with A's quote
    and sell q on B from B's coin inventory (and the mirror image when B is the cheap venue), with
    q = min(quote on the cheap venue / (price * (1 + fee)), coin on the dear venue,
    max_notional / cheap price) (`directed_units`, then `settle`). Nothing trades where `available` is
    False, or a price is NaN or <= 0. Returns the new inventories, the signed units traded, the buying
    notional, the profit realised after both fees, and the amortised transfer cost (the caller books it
    or accrues it until it actually rebalances).
    """
    ref = quote_a

    def as_ref(value: TensorLike) -> Tensor:
        return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)

    pa, pb, fa, fb = as_ref(price_a), as_ref(price_b), as_ref(fee_a), as_ref(fee_b)
    transfer, edge_min, cap = as_ref(transfer_cost), as_ref(min_edge), as_ref(max_notional)
    valid = (torch.as_tensor(available, dtype=torch.bool, device=ref.device)
             & torch.isfinite(pa) & torch.isfinite(pb) & (pa > 0) & (pb > 0))
    pa = torch.where(valid, pa, torch.ones_like(pa))  # no NaN leaks into the sizes of masked trades
    pb = torch.where(valid, pb, torch.ones_like(pb))

    buy_a = valid & (arb_edge(pa, pb, fa, fb, transfer) > edge_min)
    buy_b = valid & (arb_edge(pb, pa, fb, fa, transfer) > edge_min)
    units = directed_units(quote_a, coin_a, quote_b, coin_b, pa, pb, buy_a, buy_b, fa, fb, cap)
    legs = settle(quote_a, coin_a, quote_b, coin_b, units, pa, pb, fa, fb)
    notional = units.clamp(min=0.0) * pa + (-units).clamp(min=0.0) * pb
    return ArbFill(
        quote_a=legs.quote_a,
        coin_a=legs.coin_a,
        quote_b=legs.quote_b,
        coin_b=legs.coin_b,
        units=units,
        notional=notional,
        realised_profit=units * (pb - pa) - legs.fees,
        transfer_cost=notional * transfer,
    )
