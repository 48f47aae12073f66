"""The verdict on a model: the one rule, and its one rendering in words, that every surface shows (the
train command's last lines, the summary's `verdict` block, the top of report.html, `nexlify evaluate`
and the walk-forward table).

A model trading a USDT book is worth keeping only if it beats what the same cash earns riskless: cash
plus lending (the idle cash supplied to Aave at the modelled USDT rate, nexlify.baselines). The verdict
says three things, computed from plain numbers (no environment, no torch):

- beats_cash_plus_lending: the model's return over the window is strictly above cash plus lending's on
  the same window, in the same environment (a tie is not a win);
- the Sharpe in excess of lending: mean / std (ddof 1) of the per-bar excess return, the model's book
  return minus lending's per-bar return, per bar and annualised with sqrt(24 * 365). Lending's smooth
  returns make a plain Sharpe (rf = 0) of a book that mostly lends large and meaningless; in excess of
  lending such a book has about 0. An excess whose annualised volatility is below
  nexlify.metrics.RISKLESS_VOL is riskless: no Sharpe (the model did what lending does);
- the deflated Sharpe ratio (Bailey & Lopez de Prado 2014, nexlify.metrics.deflated_sharpe) of that
  per-bar excess Sharpe for the number of models tried: the probability that it beats the best excess
  Sharpe that many skill-less models would show by luck. A model whose excess never varied counts as a
  trial with excess Sharpe 0.
"""

from __future__ import annotations

import math

import numpy as np

from nexlify.metrics import HOURS_PER_YEAR, RISKLESS_VOL, deflated_sharpe, return_moments


def excess_moments(agent_returns, lending_returns) -> dict:
    """The return moments (nexlify.metrics.return_moments) of the per-bar excess return, the agent's book
    return minus lending's per-bar return, bar by bar. Riskless (annualised std below RISKLESS_VOL): std
    0 and no Sharpe, skew or kurtosis."""
    a = np.asarray(agent_returns, dtype=np.float64)
    b = np.asarray(lending_returns, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape[0] if a.ndim else 0} agent returns against {b.shape[0] if b.ndim else 0} "
                         "lending returns: expected one of each per bar")
    m = return_moments(a - b)
    if m["sharpe"] is not None and m["std"] * math.sqrt(HOURS_PER_YEAR) < RISKLESS_VOL:
        m.update(std=0.0, skew=None, kurtosis=None, sharpe=None)
    return m


def verdict(agent_return: float | None, lending_return: float | None, excess: dict | None,
            trial_sharpes: list[float | None], *, window: str) -> dict:
    """The verdict block.

    agent_return, lending_return: the model's and cash plus lending's return over the window, in percent
    (None: not recorded); excess: the model's excess_moments (None: not recorded); trial_sharpes: the per-bar
    excess Sharpe of every model tried, the selected one included (None: it never varied, counted as 0);
    window: which window the numbers are from, in words ("validation", "test 2025-01-01 .. 2025-02-01")."""
    beats = None if agent_return is None or lending_return is None else bool(agent_return > lending_return)
    per_bar = None if excess is None else excess.get("sharpe")
    tried = max(len(trial_sharpes), 1)
    out = {"window": window, "beats_cash_plus_lending": beats, "return_pct": agent_return,
           "cash_plus_lending_return_pct": lending_return, "excess_recorded": excess is not None,
           "sharpe_vs_lending": None if per_bar is None else per_bar * math.sqrt(HOURS_PER_YEAR),
           "sharpe_vs_lending_per_bar": per_bar, "models_tried": tried, "deflated_sharpe": None,
           "expected_max_sharpe_per_bar": None, "trials_sharpe_variance": None, "deflated_sharpe_reason": None}
    if excess is None:
        out["deflated_sharpe_reason"] = "no excess returns were recorded"
    elif per_bar is None:
        out["deflated_sharpe_reason"] = "its return never differed from lending's by more than noise"
    else:
        trials = [0.0 if s is None else float(s) for s in trial_sharpes] or [float(per_bar)]
        try:
            d = deflated_sharpe(float(per_bar), int(excess["n"]), float(excess["skew"]), float(excess["kurtosis"]),
                                trials)
        except ValueError as exc:
            out["deflated_sharpe_reason"] = str(exc)
        else:
            out["deflated_sharpe"] = d["value"]
            out["expected_max_sharpe_per_bar"] = d["expected_max_sharpe"]
            out["trials_sharpe_variance"] = d["trials_sharpe_variance"]
    out["text"] = verdict_text(out)
    return out


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.3f} %"


def verdict_text(v: dict) -> str:
    """The verdict in words, one line: the same sentence on every surface."""
    beats = v["beats_cash_plus_lending"]
    head = {True: "beats cash plus lending", False: "does not beat cash plus lending",
            None: "unknown against cash plus lending"}[beats]
    if v["sharpe_vs_lending"] is not None:
        sharpe = f"{v['sharpe_vs_lending']:.3f} (annualised)"
    else:
        sharpe = "not recorded" if v.get("excess_recorded") is False else "none (riskless: no excess over lending)"
    n = v["models_tried"]
    dsr = (f"deflated Sharpe {v['deflated_sharpe']:.3f} for {n} model{'s' if n != 1 else ''} tried"
           if v["deflated_sharpe"] is not None else f"deflated Sharpe none ({v['deflated_sharpe_reason']})")
    return (f"Verdict ({v['window']}): {head}: return {_pct(v['return_pct'])} against "
            f"{_pct(v['cash_plus_lending_return_pct'])} from lending idle cash; Sharpe in excess of lending "
            f"{sharpe}; {dsr}.")
