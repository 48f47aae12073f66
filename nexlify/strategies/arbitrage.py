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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from nexlify.errors import InputError
from nexlify.strategies._tensors import TensorLike, as_float_tensors

SPREAD_FEATURE = "spread_coinbase_usd_vs_binance_usdt_bps"  # includes USDT/USD drift, see module doc


def _default_withdrawal_fees() -> dict[str, float]:
    return {"BTC": 0.0005, "ETH": 0.00168, "SOL": 0.01}  # coin units; sources in ArbParams


def _default_delays() -> dict[str, float]:
    return {"BTC": 1.0, "ETH": 0.25, "SOL": 0.1}  # hours; reasoning in ArbParams


@dataclass(frozen=True)
class ArbParams:
    """Costs and limits of cross-exchange arbitrage.

    - taker_fee_a 0.001: Binance spot, regular (VIP 0) account, taker 0.10% (maker 0.10%), before
      the 25% discount for paying fees in BNB (binance.com/en/fee/trading; restated in Binance
      Square posts of 2025).
    - taker_fee_b 0.006: Coinbase Advanced (help.coinbase.com/en/coinbase/trading-and-funding/
      advanced-trade/advanced-trade-fees: maker-taker fees by trailing 30-day USD volume). 0.60%
      taker / 0.40% maker is the lowest-volume tier ($0-10K) of the 2023-24 table as we recall it;
      the stored copy of that page omits its table, so this figure is NOT verified against a dated
      copy. CAUTION: a later table (API Evangelist's copy of the page, May 2026) starts with
      "Intro 1" (under $1K a month) at 1.20% taker / 0.60% maker. Set 0.012 for a very small account.
    - withdrawal_fee_units, fixed per withdrawal in coin units, set by Binance and changed with network
      conditions: BTC (Bitcoin network) 0.0005 BTC and ETH (ERC-20) 0.00168 ETH, as summarised from
      Binance's withdrawal-fee page in 2025 (do-binance.com, "withdraw fee calculation"); SOL (Solana
      network) 0.01 SOL is an ASSUMPTION, no dated published figure found.
    - rebalance_delay_hours (ASSUMPTIONS, block times plus exchange processing and confirmation
      waits): BTC 1 h (a few 10-minute blocks), ETH 0.25 h (~64 blocks of 12 s to finality), SOL
      0.1 h. `pair_tensors` rounds them up to whole bars.
    - rebalance_notional_usd 25,000 (ASSUMPTION): one coin transfer per 25,000 USD of arbitrage
      volume; e.g. BTC at 100,000: 0.0005 * 100,000 / 25,000 = 20 bps per trade.
    - min_edge_bps 5 (ASSUMPTION): safety buffer for slippage and the fills not being simultaneous.
    - max_notional_usd 10,000 (ASSUMPTION): largest arbitrage per (episode, pair) and bar.
    """

    taker_fee_a: float = 0.001
    taker_fee_b: float = 0.006
    withdrawal_fee_units: Mapping[str, float] = field(default_factory=_default_withdrawal_fees)
    rebalance_delay_hours: Mapping[str, float] = field(default_factory=_default_delays)
    rebalance_notional_usd: float = 25_000.0
    min_edge_bps: float = 5.0
    max_notional_usd: float = 10_000.0

    def __post_init__(self) -> None:
        for name in ("taker_fee_a", "taker_fee_b"):
            fee = getattr(self, name)
            if not (math.isfinite(fee) and 0.0 <= fee < 0.1):
                raise InputError(f"arbitrage {name} {fee!r} is out of range; accepted: a fraction in [0, 0.1), "
                                 "e.g. 0.001 for 0.10%")
        for coin, fee in self.withdrawal_fee_units.items():
            if not (math.isfinite(fee) and fee >= 0):
                raise InputError(f"arbitrage withdrawal fee for {coin} {fee!r} is invalid; accepted: coin units >= 0")
        for coin, hours in self.rebalance_delay_hours.items():
            if not (math.isfinite(hours) and hours >= 0):
                raise InputError(f"arbitrage rebalance delay for {coin} {hours!r} is invalid; accepted: hours >= 0")
        for name in ("rebalance_notional_usd", "max_notional_usd"):
            number = getattr(self, name)
            if not (math.isfinite(number) and number > 0):
                raise InputError(f"arbitrage {name} {number!r} is invalid; accepted: a positive amount of USD")
        if not (math.isfinite(self.min_edge_bps) and self.min_edge_bps >= 0):
            raise InputError(f"arbitrage min_edge_bps {self.min_edge_bps!r} is invalid; accepted: bps >= 0")

    @property
    def min_edge(self) -> float:
        return self.min_edge_bps * 1e-4

    def pair_tensors(self, pairs: Sequence[str], bar_hours: float, *, dtype: torch.dtype = torch.float64,
                     device: torch.device | str = "cpu") -> PairArbitrage:
        """Per-pair [P] withdrawal fee (coin units) and rebalancing delay in whole bars (rounded up).
        A coin missing from the tables raises InputError: arbitrage on it would be free of transfer
        costs, which is never true."""
        if not (math.isfinite(bar_hours) and bar_hours > 0):
            raise InputError(f"bar_hours {bar_hours!r} is invalid; accepted: a positive number of hours")
        coins = [pair.split("/")[0].strip().upper() for pair in pairs]
        known = set(self.withdrawal_fee_units) & set(self.rebalance_delay_hours)
        for coin in coins:
            if coin not in known:
                raise InputError(f"arbitrage has no withdrawal fee or delay for {coin!r}; accepted coins: "
                                 + ", ".join(sorted(known)))
        fees = [self.withdrawal_fee_units[c] for c in coins]
        bars = [math.ceil(self.rebalance_delay_hours[c] / bar_hours - 1e-9) for c in coins]
        return PairArbitrage(
            withdrawal_fee_units=torch.tensor(fees, dtype=dtype, device=device),
            delay_bars=torch.tensor(bars, dtype=torch.int64, device=device),
        )


class PairArbitrage(NamedTuple):
    withdrawal_fee_units: Tensor  # [P]
    delay_bars: Tensor  # [P] int64


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


def arb_trade(quote_a: Tensor, coin_a: Tensor, quote_b: Tensor, coin_b: Tensor, price_a: TensorLike,
              price_b: TensorLike, available: TensorLike, fee_a: TensorLike, fee_b: TensorLike,
              transfer_cost: TensorLike, min_edge: TensorLike, max_notional: TensorLike) -> ArbFill:
    """One bar of arbitrage from pre-positioned inventory on both venues.

    Where buying on A and selling on B has an edge above `min_edge`, buy q coins on A with A's quote
    and sell q on B from B's coin inventory (and the mirror image when B is the cheap venue), with
    q = min(quote on the cheap venue / (price * (1 + fee)), coin on the dear venue,
    max_notional / cheap price). Nothing trades where `available` is False, or a price is NaN or <= 0.
    Returns the new inventories, the signed units traded, the buying notional, the profit realised
    after both fees, and the amortised transfer cost (the caller books it or accrues it until it
    actually rebalances).
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
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    q_ab = torch.minimum(torch.minimum(quote_a.clamp(min=0.0) / (pa * (1.0 + fa)), coin_b.clamp(min=0.0)), cap / pa)
    q_ba = torch.minimum(torch.minimum(quote_b.clamp(min=0.0) / (pb * (1.0 + fb)), coin_a.clamp(min=0.0)), cap / pb)
    q_ab = torch.where(buy_a, q_ab, zero)
    q_ba = torch.where(buy_b, q_ba, zero)

    spent_a, received_b = q_ab * pa * (1.0 + fa), q_ab * pb * (1.0 - fb)
    spent_b, received_a = q_ba * pb * (1.0 + fb), q_ba * pa * (1.0 - fa)
    notional = q_ab * pa + q_ba * pb
    return ArbFill(
        quote_a=quote_a - spent_a + received_a,
        coin_a=coin_a + q_ab - q_ba,
        quote_b=quote_b + received_b - spent_b,
        coin_b=coin_b - q_ab + q_ba,
        units=q_ab - q_ba,
        notional=notional,
        realised_profit=(received_b - spent_a) + (received_a - spent_b),
        transfer_cost=notional * transfer,
    )
