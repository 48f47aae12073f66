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
import statistics

import numpy as np

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


RISKLESS_VOL = 1e-4  # annualised volatility (0.01 % a year) below which a book is riskless: no excess Sharpe


def sharpe_vs_lending(returns: np.ndarray, risk_free: np.ndarray) -> float:
    """Annualised Sharpe of per-bar returns in excess of a per-bar risk-free rate, sample std (ddof=1):
    mean(r - rf) / std(r - rf) * sqrt(24*365). For a USDT book the risk-free rate is what cash plus lending
    earns (nexlify.evaluation.riskless_return), so this is the Sharpe a quant compares books on: with rf = 0
    a book that only lends has a near-zero std and a Sharpe in the hundreds of thousands that no trading
    book can match. 0 for a riskless book (the excess's annualised std below RISKLESS_VOL: cash, cash plus
    lending, where the ratio is noise over noise) or fewer than 2 returns."""
    excess = np.asarray(returns, dtype=np.float64) - np.asarray(risk_free, dtype=np.float64)
    if excess.size < 2:
        return 0.0
    std = float(excess.std(ddof=1))
    if std * math.sqrt(HOURS_PER_YEAR) < RISKLESS_VOL:
        return 0.0
    return float(excess.mean()) / std * math.sqrt(HOURS_PER_YEAR)


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
        **({"avg_sharpe_vs_lending": sum(m["sharpe_vs_lending"] for m in per_pair.values()) / n}
           if per_pair and all("sharpe_vs_lending" in m for m in per_pair.values()) else {}),
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



# --------------------------------------------------------------------------------------------------
# Return moments and the deflated Sharpe ratio (Bailey & Lopez de Prado, "The Deflated Sharpe Ratio:
# Correcting for Selection Bias, Backtest Overfitting and Non-Normality", J. Portfolio Management 40(5),
# 2014). Sharpe ratios here are per bar (mean / std of per-bar returns), never annualised: the formulas
# take the number of returns T as it is.

EULER_GAMMA = 0.5772156649015329
_NORMAL = statistics.NormalDist()


def return_moments(returns) -> dict:
    """n, mean, std (ddof=1), skewness and kurtosis (non-excess: 3 for a normal law; population central
    moments m3 / m2^1.5 and m4 / m2^2) and the per-bar Sharpe mean / std of a series of per-bar returns.
    With fewer than 2 returns or no variation std is 0 and sharpe, skew and kurtosis are None."""
    xs = [float(x) for x in returns]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": 0.0, "std": 0.0, "skew": None, "kurtosis": None, "sharpe": None}
    mean = math.fsum(xs) / n
    dev = [x - mean for x in xs]
    m2 = math.fsum(d * d for d in dev) / n
    if n < 2 or m2 <= 1e-30:
        return {"n": n, "mean": mean, "std": 0.0, "skew": None, "kurtosis": None, "sharpe": None}
    m3 = math.fsum(d ** 3 for d in dev) / n
    m4 = math.fsum(d ** 4 for d in dev) / n
    std = math.sqrt(m2 * n / (n - 1))
    return {"n": n, "mean": mean, "std": std, "skew": m3 / m2 ** 1.5, "kurtosis": m4 / (m2 * m2),
            "sharpe": mean / std}


def expected_max_sharpe(n_trials: int, sharpe_variance: float) -> float:
    """E[max SR] of n_trials independent trials whose true Sharpe is 0 and whose estimated Sharpes have
    variance `sharpe_variance` (the paper's SR0):
        sqrt(V) * ((1 - g) * Z^-1(1 - 1/N) + g * Z^-1(1 - 1/(N e))),  g = Euler-Mascheroni.
    0 for a single trial (no selection) or no variance between trials."""
    if n_trials < 1:
        raise ValueError(f"n_trials {n_trials}: accepted: at least 1")
    if n_trials == 1 or sharpe_variance <= 0:
        return 0.0
    z = _NORMAL.inv_cdf
    return math.sqrt(sharpe_variance) * ((1.0 - EULER_GAMMA) * z(1.0 - 1.0 / n_trials)
                                         + EULER_GAMMA * z(1.0 - 1.0 / (n_trials * math.e)))


def probabilistic_sharpe(sharpe: float, benchmark: float, n: int, skew: float, kurtosis: float) -> float:
    """PSR: the probability that the true Sharpe exceeds `benchmark`, given the estimate `sharpe` from n
    returns with this skewness and (non-excess) kurtosis:
        Z[(SR - SR*) sqrt(n - 1) / sqrt(1 - skew SR + (kurtosis - 1) / 4 SR^2)]."""
    if n < 2:
        raise ValueError(f"n {n}: the probabilistic Sharpe ratio needs at least 2 returns")
    denom = 1.0 - skew * sharpe + (kurtosis - 1.0) / 4.0 * sharpe * sharpe
    if not denom > 0:  # only a two-point law reaches 0 (kurtosis >= 1 + skew^2)
        raise ValueError(f"skew {skew}, kurtosis {kurtosis} and Sharpe {sharpe} leave no variance for the estimate")
    return _NORMAL.cdf((sharpe - benchmark) * math.sqrt(n - 1) / math.sqrt(denom))


def deflated_sharpe(sharpe: float, n: int, skew: float, kurtosis: float, trial_sharpes: list[float]) -> dict:
    """The deflated Sharpe ratio of a model selected among len(trial_sharpes) trials (its own Sharpe among
    them): PSR against the expected maximum Sharpe of that many trials, with the sample variance (ddof=1)
    of the trials' Sharpes. All Sharpes per bar. Returns value, the benchmark SR0 and what went in."""
    n_trials = len(trial_sharpes)
    variance = statistics.variance(trial_sharpes) if n_trials >= 2 else 0.0
    sr0 = expected_max_sharpe(max(n_trials, 1), variance)
    return {"value": probabilistic_sharpe(sharpe, sr0, n, skew, kurtosis), "sharpe": sharpe,
            "expected_max_sharpe": sr0, "trials": n_trials, "trials_sharpe_variance": variance, "n_returns": n,
            "skew": skew, "kurtosis": kurtosis}
