"""Tear-sheet figures from an equity curve sampled every bar, beside the pipeline's metrics
(nexlify.metrics: return, Sharpe, drawdown, win rate, score, which the report shows as computed there).

Definitions follow empyrical / pyfolio (a maintained library we did not add: empyrical-reloaded pulls in
scipy, bottleneck and peewee, ~150 MB, for these few lines; quantstats pulls matplotlib, seaborn and yfinance):
    r_t            = E_t / E_{t-1} - 1, one per bar
    annual_return  = (E_n / E_0) ** (bars_per_year / n) - 1                      (empyrical.annual_return)
    sortino        = mean(r) / sqrt(mean(min(r, 0) ** 2)) * sqrt(bars_per_year)  (empyrical.sortino_ratio,
                     required return 0; 0 when there is no downside)
    calmar         = annual_return / max drawdown (a fraction); 0 without a drawdown (empyrical.calmar_ratio
                     returns NaN there)
    exposure_share = share of bars that end with a spot position open
Over a short window the annualised figures extrapolate a few weeks to a year: read them as rates.
"""

from __future__ import annotations

import math

import numpy as np

from nexlify.metrics import HOURS_PER_YEAR


def annual_return(equity: np.ndarray, bars_per_year: int = HOURS_PER_YEAR) -> float:
    n = len(equity) - 1
    if n < 1 or equity[0] <= 0:
        return 0.0
    return float((equity[-1] / equity[0]) ** (bars_per_year / n) - 1.0)


def max_drawdown(equity: np.ndarray) -> float:
    """The largest fall from a peak, as a positive fraction."""
    peak = np.maximum.accumulate(equity)
    return float((1.0 - equity / peak).max()) if len(equity) else 0.0


def sortino(equity: np.ndarray, bars_per_year: int = HOURS_PER_YEAR) -> float:
    r = np.diff(equity) / equity[:-1]
    if len(r) < 2:
        return 0.0
    downside = math.sqrt(float(np.mean(np.minimum(r, 0.0) ** 2)))
    if downside <= 1e-18:
        return 0.0
    return float(np.mean(r) / downside * math.sqrt(bars_per_year))


def calmar(equity: np.ndarray, bars_per_year: int = HOURS_PER_YEAR) -> float:
    dd = max_drawdown(equity)
    return annual_return(equity, bars_per_year) / dd if dd > 1e-12 else 0.0


def tear_sheet(equity, holding, fees_paid: float, bars_per_year: int = HOURS_PER_YEAR) -> dict:
    equity = np.asarray(equity, dtype=np.float64)
    holding = np.asarray(holding)
    return {
        "annual_return": annual_return(equity, bars_per_year) * 100.0,
        "sortino": sortino(equity, bars_per_year),
        "calmar": calmar(equity, bars_per_year),
        "exposure_share": float(holding.mean()) if len(holding) else 0.0,
        "fees_paid": float(fees_paid),
    }
