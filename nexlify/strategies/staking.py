"""Staking: rewards that compound on staked coins, and an unbonding queue before they can be sold.

Model
-----
- Yield convention: each asset's `apy` is its *effective annual yield*: one coin staked for a year
  (8,760 hours, a 365-day year) becomes exactly `1 + apy` coins. The per-bar growth is then
  `(1 + apy) ** (bar_hours / 8760)`, the same for every compounding frequency, because the frequency
  is already folded into the APY. Published *APR* figures (Lido publishes an APR) are converted with
  `apy_from_apr(apr, compounds_per_year)` = (1 + apr/n)**n - 1.
- Smooth vs discrete crediting: `per_bar_growth` credits rewards smoothly every bar. A protocol that
  credits rewards only at compounding boundaries (stETH's daily rebase, Solana's per-epoch payout) is
  modelled by `boundary_growth`, which returns 1 except on bars that contain a boundary. Over a
  whole number of compounding periods both give the same `1 + apy` per year; they differ only in
  when, inside a period, the reward shows up.
- Rewards are in coin units: staking changes how many coins you hold, not their price. The
  environment marks staked coins at the pair's close like spot coins.
- Unbonding: units asked back stop earning at once (a simplification: on Ethereum the validator
  earns until its exit epoch, on Solana until the end of the epoch) and become sellable
  `unbond_bars` bars later. State per (episode, pair), all shaped [B, P]:
  `staked_units`, `unbonding_units` and `release_bar` (int64, `NO_LOT` where nothing is pending).
  There is at most ONE unbonding lot per (episode, pair): a new unstake request while a lot is still
  pending is masked (ignored), so the state stays three fixed-size tensors with no queue to grow.
  The agent can ask again once the lot has been released.
- BTC has no native staking; it is not stakeable unless an entry is configured for it.

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

HOURS_PER_YEAR = 8760.0  # 365 days; leap days are ignored
NO_LOT = -1  # release_bar of a (episode, pair) with nothing unbonding


# ------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class StakedAsset:
    """How one coin stakes: its effective annual yield, how often rewards are credited, and how long
    unstaked coins take to come back."""

    apy: float
    compounds_per_year: float
    unbonding_hours: float
    source: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.apy) and -1.0 < self.apy < 10.0):
            raise InputError(f"staking apy {self.apy!r} is out of range; accepted: a fraction in (-1, 10), "
                             "e.g. 0.03 for 3% a year")
        if not (math.isfinite(self.compounds_per_year) and self.compounds_per_year > 0):
            raise InputError(f"staking compounds_per_year {self.compounds_per_year!r} is invalid; "
                             "accepted: a positive number (365 = daily, 8760 / 48 = every 2 days)")
        if not (math.isfinite(self.unbonding_hours) and self.unbonding_hours >= 0):
            raise InputError(f"staking unbonding_hours {self.unbonding_hours!r} is invalid; "
                             "accepted: hours >= 0")

    @property
    def compounding_hours(self) -> float:
        return HOURS_PER_YEAR / self.compounds_per_year


def _default_assets() -> dict[str, StakedAsset]:
    # Sources, dates and reasoning: see the StakingParams docstring.
    return {
        "ETH": StakedAsset(apy=0.02839, compounds_per_year=365.0, unbonding_hours=120.0,
                           source="Lido staking APR 7d MA ~2.8%, late May 2025 (Lido query on Flipside); daily rebase"),
        "SOL": StakedAsset(apy=0.065, compounds_per_year=HOURS_PER_YEAR / 48.0, unbonding_hours=54.0,
                           source="Solana base staking APY ~6.5%, 2025 (starke.finance, data of 2025-08-13)"),
    }


@dataclass(frozen=True)
class StakingParams:
    """Per-asset staking terms, keyed by base coin. A coin with no entry cannot be staked: BTC has no
    native staking and gets none by default. Every value is an assumption with a date, not a live rate.

    ETH, via Lido stETH:
    - apy 0.02839: Lido's published staking APR (7-day moving average, net of Lido's 10% fee) was
      2.80-2.85% over 2025-05-25 .. 2025-06-03 (Lido's "Lido Staking User APR 7days MA" query,
      flipsidecrypto.xyz/lidofinance). ASSUMPTION: APR 2.8%; stETH rebases once a day, so
      APY = (1 + 0.028/365)**365 - 1 = 0.02839.
    - compounds_per_year 365: rewards accrue per beacon-chain epoch (~6.4 min) but reach stETH
      holders at the daily rebase.
    - unbonding_hours 120 (ASSUMPTION): 5 days for a Lido withdrawal request to be finalised and
      claimable; it depends on the validator exit queue, ~1-5 days for most of 2024-25.

    SOL, native delegation:
    - apy 0.065: base staking APY ~6.5% in 2025, 7.19% with MEV tips (starke.finance, "Solana
      Staking Percentage: Metrics & Analysis", data as of 2025-08-13: inflation ~4.4%, 67% of supply
      staked; inflation falls 15% a year towards 1.5%, solana.com/staking). ASSUMPTION: 6.5%, MEV
      left out because only some validators pass it through.
    - compounds_per_year 8760 / 48: rewards are paid and auto-compounded once per epoch, "approximately
      every 2 days" (docs.stake.fish, Solana inflation rewards); an epoch is 432,000 slots at
      0.40-0.45 s = 48-54 h, and compounding uses the nominal 48 h.
    - unbonding_hours 54 (ASSUMPTION): deactivation completes at the next epoch boundary, at most
      one epoch later; we take the conservative end, 432,000 slots * 0.45 s = 54 h.
    """

    assets: Mapping[str, StakedAsset] = field(default_factory=_default_assets)

    def asset(self, base: str) -> StakedAsset | None:
        return self.assets.get(base.upper())

    def pair_tensors(self, pairs: Sequence[str], bar_hours: float, *, dtype: torch.dtype = torch.float64,
                     device: torch.device | str = "cpu") -> PairStaking:
        """Per-pair tensors [P] for the environment: smooth per-bar growth (1 where not stakeable), the
        unbonding delay in whole bars (rounded up), and the stakeable mask. Built once, not per step."""
        if not (math.isfinite(bar_hours) and bar_hours > 0):
            raise InputError(f"bar_hours {bar_hours!r} is invalid; accepted: a positive number of hours")
        terms = [self.asset(base_of(pair)) for pair in pairs]
        apy = torch.tensor([t.apy if t else 0.0 for t in terms], dtype=dtype, device=device)
        bars = [math.ceil(t.unbonding_hours / bar_hours - 1e-9) if t else 0 for t in terms]
        return PairStaking(
            growth=per_bar_growth(apy, bar_hours),
            unbond_bars=torch.tensor(bars, dtype=torch.int64, device=device),
            stakeable=torch.tensor([t is not None for t in terms], dtype=torch.bool, device=device),
        )


class PairStaking(NamedTuple):
    growth: Tensor  # [P] per-bar multiplicative growth of staked units
    unbond_bars: Tensor  # [P] int64 bars from an unstake request to the units being sellable
    stakeable: Tensor  # [P] bool


def base_of(pair: str) -> str:
    """"ETH/USDT" -> "ETH"."""
    return pair.split("/")[0].strip().upper()


# ------------------------------------------------------------------------------------------------
# Yield arithmetic


def apy_from_apr(apr: TensorLike, compounds_per_year: TensorLike) -> Tensor:
    """Effective annual yield of a simple annual rate `apr` credited `compounds_per_year` times a year:
    (1 + apr/n)**n - 1. Computed through log1p/expm1 so small rates keep their precision."""
    apr, n = as_float_tensors(apr, compounds_per_year)
    return torch.expm1(n * torch.log1p(apr / n))


def per_bar_growth(apy: TensorLike, bar_hours: float) -> Tensor:
    """Multiplicative growth of staked units over one bar of `bar_hours` hours, with `apy` the
    effective annual yield: (1 + apy) ** (bar_hours / 8760). Compounding this over 8,760 hourly bars
    (or any bars adding up to a year) gives exactly 1 + apy."""
    (apy,) = as_float_tensors(apy)
    return torch.exp(torch.log1p(apy) * (bar_hours / HOURS_PER_YEAR))


def boundary_growth(bar_index: TensorLike, apy: TensorLike, compounds_per_year: TensorLike,
                    bar_hours: float) -> Tensor:
    """Discrete crediting: growth over bar `bar_index` (bar k covers hours [k*h, (k+1)*h) counted from
    the start of staking) when rewards are credited only at compounding boundaries, every
    8760 / compounds_per_year hours. Returns (1 + apy) ** (boundaries_in_bar / compounds_per_year):
    1 on bars without a boundary, one period's growth on a bar that contains one."""
    k, apy, n = as_float_tensors(bar_index, apy, compounds_per_year)
    period_hours = HOURS_PER_YEAR / n
    # A small tolerance keeps a boundary that falls exactly on a bar edge from being lost to rounding.
    boundaries_crossed = (torch.floor((k + 1.0) * bar_hours / period_hours + 1e-9)
                          - torch.floor(k * bar_hours / period_hours + 1e-9))
    return torch.exp(torch.log1p(apy) * boundaries_crossed / n)


def accrue(staked_units: Tensor, growth: TensorLike) -> Tensor:
    """Staked units after one bar of rewards; the reward itself is the difference."""
    return staked_units * torch.as_tensor(growth, dtype=staked_units.dtype, device=staked_units.device)


# ------------------------------------------------------------------------------------------------
# Unbonding queue: at most one lot per (episode, pair)


class UnbondState(NamedTuple):
    staked_units: Tensor
    unbonding_units: Tensor
    release_bar: Tensor  # int64; NO_LOT where nothing is unbonding


class Released(NamedTuple):
    freed_units: Tensor  # units that became sellable this bar
    unbonding_units: Tensor
    release_bar: Tensor


def empty_unbond_state(shape: Sequence[int], *, dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu") -> UnbondState:
    """Nothing staked and nothing unbonding, shaped e.g. [B, P]."""
    zeros = torch.zeros(tuple(shape), dtype=dtype, device=device)
    return UnbondState(zeros, zeros.clone(), torch.full(tuple(shape), NO_LOT, dtype=torch.int64, device=device))


def start_unbond(staked_units: Tensor, unbonding_units: Tensor, release_bar: Tensor, request_units: TensorLike,
                 now_bar: TensorLike, unbond_bars: TensorLike) -> UnbondState:
    """Move up to `request_units` from staked to unbonding at bar `now_bar`, releasable at
    `now_bar + unbond_bars`. The request is clipped to [0, staked_units] and MASKED (nothing happens)
    where a lot is still pending for that (episode, pair). `now_bar` is the decision bar of each
    episode, e.g. shaped [B, 1]; `unbond_bars` is per pair, e.g. [P] int64."""
    request = torch.as_tensor(request_units, dtype=staked_units.dtype, device=staked_units.device)
    pending = unbonding_units > 0
    amount = torch.where(pending, torch.zeros_like(staked_units),
                         torch.minimum(request.clamp(min=0.0), staked_units.clamp(min=0.0)))
    starts = amount > 0
    due_at = (torch.as_tensor(now_bar, dtype=torch.int64, device=release_bar.device)
              + torch.as_tensor(unbond_bars, dtype=torch.int64, device=release_bar.device))
    return UnbondState(
        staked_units=staked_units - amount,
        unbonding_units=unbonding_units + amount,
        release_bar=torch.where(starts, due_at, release_bar),
    )


def release_unbonded(now_bar: TensorLike, release_bar: Tensor, unbonding_units: Tensor) -> Released:
    """Units whose lot is due (`now_bar >= release_bar`) become free: zero before the release bar, the
    whole lot from it on. The released slots go back to NO_LOT."""
    now = torch.as_tensor(now_bar, dtype=torch.int64, device=release_bar.device)
    due = (unbonding_units > 0) & (release_bar != NO_LOT) & (now >= release_bar)
    freed = torch.where(due, unbonding_units, torch.zeros_like(unbonding_units))
    return Released(
        freed_units=freed,
        unbonding_units=unbonding_units - freed,
        release_bar=torch.where(due, torch.full_like(release_bar, NO_LOT), release_bar),
    )
