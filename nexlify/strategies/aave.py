"""Aave V3 lending: the supply rate of a reserve from its utilization, and interest per bar.

Model
-----
Rates follow Aave V3's DefaultReserveInterestRateStrategyV2 (aave-dao/aave-v3-origin,
src/contracts/misc/DefaultReserveInterestRateStrategyV2.sol; documented at
aave.com/docs/aave-v3/smart-contracts/interest-rate-strategy). With utilization U (borrowed / supplied)
and the optimal usage ratio U*:

    borrow(U) = base + slope1 * U / U*                          for U <= U*
    borrow(U) = base + slope1 + slope2 * (U - U*) / (1 - U*)    for U >  U*
    supply(U) = borrow(U) * U * (1 - reserve_factor)

(the contract's supply usage ratio is debt / (available + debt + unbacked); with no unbacked aTokens it
is U). Both are annual rates, simple (not compounded), as Aave stores them.

Accrual: Aave grows a supplier's balance through the liquidity index, linearly in time between two
index updates: index *= 1 + rate * dt / SECONDS_PER_YEAR (MathUtils.calculateLinearInterest, a
365-day year). We update the index once per bar, so the per-bar growth is
`1 + supply_rate * bar_hours / 8760`: linear within a bar, compounding from bar to bar. On chain the
index is updated at every interaction with the reserve (many times an hour for USDT), so the real
APY is a hair above our hourly-compounded one (at 5% APR: 5.12711% continuous vs 5.12709% hourly).

Utilization path: by default a constant (an assumption, `AaveParams.utilization`); optionally a CSV
series `timestamp,utilization` (timestamp in ms since the epoch, UTC; utilization as a fraction)
aligned to the bars by an as-of join: each bar takes the last value at or before the bar's timestamp
(the candle's open time, i.e. the rate in force when the bar starts), never a later one. Bars before
the first value of the series take the constant.

Every rate function takes tensors of any broadcastable shape, returns new tensors, never loops over
elements and never syncs the device to Python. The CSV is read once, before training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nexlify.strategies._tensors import TensorLike, as_float_tensors
from nexlify.strategies.params import HOURS_PER_YEAR, AaveParams  # noqa: F401 (re-exported)
from nexlify.strategies.utilization import load_utilization_csv  # noqa: F401 (re-exported; torch-free)


# ------------------------------------------------------------------------------------------------
# Rates


def borrow_rate(utilization: TensorLike, base: TensorLike, slope1: TensorLike, slope2: TensorLike,
                optimal_usage_ratio: TensorLike) -> Tensor:
    """Variable borrow rate (annual, simple) at `utilization`, clamped to [0, 1] first."""
    u, base, slope1, slope2, u_opt = as_float_tensors(utilization, base, slope1, slope2, optimal_usage_ratio)
    u = u.clamp(0.0, 1.0)
    below = base + slope1 * u / u_opt
    above = base + slope1 + slope2 * (u - u_opt) / (1.0 - u_opt)
    return torch.where(u <= u_opt, below, above)


def supply_rate(utilization: TensorLike, base: TensorLike, slope1: TensorLike, slope2: TensorLike,
                optimal_usage_ratio: TensorLike, reserve_factor: TensorLike) -> Tensor:
    """Supply (liquidity) rate, annual and simple: borrow rate * U * (1 - reserve_factor)."""
    borrow = borrow_rate(utilization, base, slope1, slope2, optimal_usage_ratio)
    u, reserve_factor = as_float_tensors(utilization, reserve_factor)
    u = u.to(dtype=borrow.dtype, device=borrow.device).clamp(0.0, 1.0)
    return borrow * u * (1.0 - reserve_factor.to(dtype=borrow.dtype, device=borrow.device))


def supply_rate_for(utilization: TensorLike, params: AaveParams) -> Tensor:
    """`supply_rate` with the parameters of `params`."""
    return supply_rate(utilization, params.base_variable_borrow_rate, params.variable_rate_slope1,
                       params.variable_rate_slope2, params.optimal_usage_ratio, params.reserve_factor)


def per_bar_supply_growth(supply_rate_annual: TensorLike, bar_hours: float) -> Tensor:
    """Growth of a supplied balance over one bar: 1 + rate * bar_hours / 8760 (linear in the bar)."""
    (rate,) = as_float_tensors(supply_rate_annual)
    return 1.0 + rate * (bar_hours / HOURS_PER_YEAR)


# ------------------------------------------------------------------------------------------------
# Utilization path


def align_asof(series_timestamps_ms: Tensor, series_values: Tensor, bar_timestamps_ms: Tensor,
               fill: float) -> Tensor:
    """For each bar, the last series value at or before the bar's timestamp (no look-ahead); `fill`
    for bars before the first value. `series_timestamps_ms` must be strictly increasing."""
    index = torch.searchsorted(series_timestamps_ms, bar_timestamps_ms, right=True) - 1
    picked = series_values[index.clamp(min=0)]
    return torch.where(index >= 0, picked, torch.full_like(picked, fill))


def utilization_path(params: AaveParams, bar_timestamps_ms: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Utilization per bar [T] on the device of `bar_timestamps_ms`: the constant, or the CSV series
    as-of joined to the bars. Built once per run."""
    device = bar_timestamps_ms.device
    if params.utilization_csv is None:
        return torch.full(bar_timestamps_ms.shape, params.utilization, dtype=dtype, device=device)
    timestamps, values = load_utilization_csv(params.utilization_csv)
    return align_asof(torch.tensor(timestamps, dtype=torch.int64, device=device),
                      torch.tensor(values, dtype=dtype, device=device),
                      bar_timestamps_ms.to(torch.int64), params.utilization)
