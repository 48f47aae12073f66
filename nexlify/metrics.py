"""Validation metrics and the score, as pure functions of recorded numbers.

Per pair: total return %, Sharpe of hourly returns annualised with sqrt(24*365), max drawdown % as a
positive number, win rate over closed trades (a fraction in [0, 1]), the trade count and, from the
environment, the PnL broken down by source (spot, staking_rewards, lp_fees, impermanent_loss,
lending_interest, arbitrage, fees_and_gas, total: quote currency); then the average over pairs. The
score rewards return, Sharpe and win rate and is lowered by drawdown (the original had this sign
inverted).
"""

from __future__ import annotations

import math

HOURS_PER_YEAR = 24 * 365
SCORE_WEIGHTS = {"return": 0.4, "sharpe": 10 * 0.3, "win_rate": 100 * 0.2, "drawdown": 0.1}


def score(avg_return: float, avg_sharpe: float, avg_win_rate: float, avg_drawdown: float) -> float:
    """score = avg_return*0.4 + avg_sharpe*10*0.3 + avg_win_rate*100*0.2 - avg_drawdown*0.1

    avg_return and avg_drawdown in percent (drawdown positive), avg_win_rate a fraction."""
    return (avg_return * 0.4 + avg_sharpe * 10 * 0.3 + avg_win_rate * 100 * 0.2 - avg_drawdown * 0.1)


def sharpe_from_sums(ret_sum: float, ret_sq_sum: float, n: int) -> float:
    """Annualised Sharpe of n hourly returns given their sum and sum of squares (sample std, ddof=1).
    0 when undefined (fewer than 2 returns or no variation)."""
    if n < 2:
        return 0.0
    mean = ret_sum / n
    var = (ret_sq_sum - n * mean * mean) / (n - 1)
    if var <= 1e-18:
        return 0.0
    return mean / math.sqrt(var) * math.sqrt(HOURS_PER_YEAR)


def pair_metrics(final_equity: float, initial_equity: float, ret_sum: float, ret_sq_sum: float, n: int,
                 max_drawdown: float, trades: int, wins: int, *, pnl_breakdown: dict[str, float] | None = None) -> dict:
    """One pair's metrics; `pnl_breakdown` (PnL by source in quote currency, e.g. EpisodeStats.pnl_breakdown)
    is carried as given (plain floats)."""
    out = {
        "total_return": (final_equity / initial_equity - 1.0) * 100.0,
        "sharpe": sharpe_from_sums(ret_sum, ret_sq_sum, n),
        "max_drawdown": max_drawdown * 100.0,
        "win_rate": (wins / trades) if trades > 0 else 0.0,
        "trades": int(trades),
    }
    if pnl_breakdown is not None:
        out["pnl_breakdown"] = {k: float(v) for k, v in pnl_breakdown.items()}
    return out


def average_breakdown(per_pair: dict[str, dict]) -> dict[str, float] | None:
    """The mean over pairs of each PnL source (each pair is its own portfolio, like avg_return); None
    when no pair carries a breakdown."""
    tables = [m["pnl_breakdown"] for m in per_pair.values() if m.get("pnl_breakdown") is not None]
    if not tables:
        return None
    keys = list(tables[0])
    return {k: sum(t.get(k, 0.0) for t in tables) / len(tables) for k in keys}


def average_metrics(per_pair: dict[str, dict]) -> dict:
    """The pipeline's val_metrics: averages over pairs, the score, and the per-pair table."""
    n = max(len(per_pair), 1)
    avg = {
        "avg_return": sum(m["total_return"] for m in per_pair.values()) / n,
        "avg_sharpe": sum(m["sharpe"] for m in per_pair.values()) / n,
        "avg_win_rate": sum(m["win_rate"] for m in per_pair.values()) / n,
        "avg_drawdown": sum(m["max_drawdown"] for m in per_pair.values()) / n,
        "total_trades": sum(m["trades"] for m in per_pair.values()),
    }
    avg["score"] = score(avg["avg_return"], avg["avg_sharpe"], avg["avg_win_rate"], avg["avg_drawdown"])
    breakdown = average_breakdown(per_pair)
    if breakdown is not None:
        avg["pnl_breakdown"] = breakdown
    avg["per_pair"] = per_pair
    return avg

