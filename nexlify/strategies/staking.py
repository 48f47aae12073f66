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
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from nexlify.errors import InputError
from nexlify.strategies._tensors import TensorLike, as_float_tensors
from nexlify.strategies.params import (  # noqa: F401 (re-exported)
    HOURS_PER_YEAR, NO_LOT, StakedAsset, StakingParams, base_of)


# ------------------------------------------------------------------------------------------------
# Per-pair tensors


class PairStaking(NamedTuple):
    growth: Tensor  # [P] per-bar multiplicative growth of staked units
    unbond_bars: Tensor  # [P] int64 bars from an unstake request to the units being sellable
    stakeable: Tensor  # [P] bool


def pair_tensors(params: StakingParams, pairs: Sequence[str], bar_hours: float, *,
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> PairStaking:
    """Per-pair tensors [P] for the environment: smooth per-bar growth (1 where not stakeable), the
    unbonding delay in whole bars (rounded up), and the stakeable mask. Built once, not per step."""
    dtype = torch.float64 if dtype is None else dtype
    if not (math.isfinite(bar_hours) and bar_hours > 0):
        raise InputError(f"bar_hours {bar_hours!r} is invalid; accepted: a positive number of hours")
    terms = [params.asset(base_of(pair)) for pair in pairs]
    apy = torch.tensor([t.apy if t else 0.0 for t in terms], dtype=dtype, device=device)
    bars = [math.ceil(t.unbonding_hours / bar_hours - 1e-9) if t else 0 for t in terms]
    return PairStaking(
        growth=per_bar_growth(apy, bar_hours),
        unbond_bars=torch.tensor(bars, dtype=torch.int64, device=device),
        stakeable=torch.tensor([t is not None for t in terms], dtype=torch.bool, device=device),
    )



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
    amount = torch.where(pending, 0.0, torch.minimum(request.clamp(min=0.0), staked_units.clamp(min=0.0)))
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
    freed = torch.where(due, unbonding_units, 0.0)
    return Released(
        freed_units=freed,
        unbonding_units=unbonding_units - freed,
        release_bar=torch.where(due, NO_LOT, release_bar),
    )
