"""Selection honesty: what the summary says about the candidates and the model it selected, as pure
functions of recorded numbers (each run's result.json, through the pipeline state).

- Every candidate (each initial run, each retraining iteration) with its validation return and Sharpe
  beside the guide's score, which decides the selection among the candidates on the same side of cash plus
  lending (controller.rules: one that trails lending on validation ranks below one that does not). The
  score is a selection score, not a return.
- For the selected model: the verdict (nexlify.verdict, the one rule every surface shows): does its
  validation return beat cash plus lending's on the same window, in the same environment; its Sharpe in
  excess of lending; and the deflated Sharpe ratio (Bailey & Lopez de Prado 2014) of that excess Sharpe
  for the number of models tried, from the per-bar excess-return moments of each candidate's validation
  book (a candidate whose excess never varied counts as a trial with Sharpe 0).
- `beats_baselines` makes the comparison with every baseline, on return and on Sharpe in excess of what
  cash plus lending earns (`avg_sharpe_vs_lending`, nexlify.metrics.sharpe_vs_lending: cash plus lending,
  riskless, has 0; with rf = 0 its near-constant returns make the plain Sharpe meaningless); the plain
  Sharpe (rf = 0), the score's, is reported beside.
"""

from __future__ import annotations

from nexlify.verdict import verdict

CASH_PLUS_LENDING = "cash_plus_lending"  # nexlify.baselines.CASH_PLUS_LENDING (the controller imports no torch)


def candidate(source: str, seed: int, val_score: float, val_metrics: dict, *, selected: bool) -> dict:
    """One row of the summary's candidate table."""
    return {"source": source, "seed": seed, "val_score": val_score, "val_return": val_metrics.get("avg_return"),
            "val_sharpe": val_metrics.get("avg_sharpe"),
            "val_sharpe_vs_lending": val_metrics.get("avg_sharpe_vs_lending"), "selected": selected}


def selection_report(candidates: list[dict], excess: dict[str, dict | None], baselines: dict | None) -> dict:
    """The summary's `selection`: the selected candidate (exactly one has selected=True), its validation
    return and Sharpe beside cash plus lending's, and the verdict (nexlify.verdict) under "verdict_block";
    "verdict" is its sentence and "beats_cash_plus_lending" / "deflated_sharpe" its numbers.

    excess: source -> the moments of its validation book's per-bar return in excess of lending's
    (nexlify.verdict.excess_moments), None where not recorded; baselines: the selected run's val_baselines
    (name -> metrics) or None."""
    chosen = [c for c in candidates if c["selected"]]
    if len(chosen) != 1:
        raise ValueError(f"{len(chosen)} candidates are marked selected; expected exactly one")
    sel = chosen[0]
    report = {"selected": sel["source"], "val_score": sel["val_score"], "val_return": sel["val_return"],
              "val_sharpe": sel["val_sharpe"], "val_sharpe_vs_lending": sel.get("val_sharpe_vs_lending"),
              "models_tried": len(candidates)}

    lending = (baselines or {}).get(CASH_PLUS_LENDING)
    report["cash_plus_lending"] = None if lending is None else {
        "avg_return": lending["avg_return"], "avg_sharpe": lending["avg_sharpe"],
        "avg_sharpe_vs_lending": lending.get("avg_sharpe_vs_lending")}
    trials = [(excess.get(c["source"]) or {}).get("sharpe") for c in candidates]
    v = verdict(sel["val_return"], None if lending is None else lending["avg_return"], excess.get(sel["source"]),
                trials, window=f"{sel['source']} on the validation window")
    report["beats_cash_plus_lending"] = v["beats_cash_plus_lending"]
    report["verdict"] = v["text"]
    report["verdict_block"] = v

    # the same comparison against every baseline, on return and on Sharpe (strictly better): the Sharpe in
    # excess of the lending rate where both recorded it, else the plain one (results of older versions)
    def sharpes(m: dict) -> tuple[float | None, float | None]:
        if sel.get("val_sharpe_vs_lending") is not None and m.get("avg_sharpe_vs_lending") is not None:
            return sel["val_sharpe_vs_lending"], m["avg_sharpe_vs_lending"]
        return sel["val_sharpe"], m.get("avg_sharpe")

    report["beats_baselines"] = {}
    for name, m in (baselines or {}).items():
        own, theirs = sharpes(m)
        if sel["val_return"] is not None and own is not None and theirs is not None:
            report["beats_baselines"][name] = {"return": sel["val_return"] > m["avg_return"], "sharpe": own > theirs}
    report["deflated_sharpe"] = {"value": v["deflated_sharpe"], "trials": v["models_tried"],
                                 "expected_max_sharpe_per_bar": v["expected_max_sharpe_per_bar"],
                                 "trials_sharpe_variance": v["trials_sharpe_variance"],
                                 "of": "the per-bar Sharpe in excess of lending",
                                 **({"reason": v["deflated_sharpe_reason"]} if v["deflated_sharpe"] is None else {})}
    return report


def final_lines(summary: dict) -> list[str]:
    """The train command's last lines: the winner and the guide's score that selected it, its validation
    return beside cash plus lending's, and, last, the verdict in words (nexlify.verdict.verdict_text)."""
    s = summary.get("selection")
    if not s:
        return []
    excess = s.get("val_sharpe_vs_lending")
    lines = [f"winner: {s['selected']}, selected by the guide's score {s['val_score']:.3f} among "
             f"{s['models_tried']} models tried (a selection score, not a return)",
             f"validation return {s['val_return']:.3f} %, plain Sharpe {s['val_sharpe']:.3f} (rf = 0)"
             + ("" if excess is None else f", {excess:.3f} in excess of the lending rate (per pair)")]
    cpl = s.get("cash_plus_lending")
    if cpl is not None:
        lines.append(f"cash plus lending, same window: return {cpl['avg_return']:.3f} %")
    lines.append(s["verdict"])
    return lines


# The units of the summary's numbers, by field name (the same names wherever they appear: a run's
# val_metrics, a baseline's averages, a per-pair table, the verdict).
SUMMARY_UNITS = {
    "avg_return": "percent of the starting equity over the window (1.5 = +1.5 %)",
    "total_return": "percent of the starting equity over the window",
    "val_return": "percent of the starting equity over the validation window",
    "return_pct": "percent of the starting equity over the window",
    "cash_plus_lending_return_pct": "percent of the starting equity over the window",
    "avg_drawdown": "percent, positive (largest fall from a peak of equity)",
    "max_drawdown": "percent, positive",
    "avg_win_rate": "fraction of closed trades that gained, 0..1",
    "win_rate": "fraction of closed trades that gained, 0..1",
    "exposure": "fraction of bars with a spot position, 0..1",
    "exposure_any": "fraction of bars with any position or strategy book, 0..1",
    "turnover": "traded notional divided by mean equity (times)",
    "fees_paid": "quote currency (USDT)",
    "pnl_breakdown": "quote currency (USDT)",
    "avg_sharpe": "annualised Sharpe of hourly returns, risk-free 0 (sqrt(8760) x mean / std)",
    "val_sharpe": "annualised Sharpe of hourly returns, risk-free 0",
    "avg_sharpe_vs_lending": "annualised Sharpe of hourly returns in excess of lending's, averaged over pairs",
    "sharpe_vs_lending": "annualised Sharpe of the book's hourly return in excess of lending's",
    "sharpe_vs_lending_per_bar": "the same per bar (not annualised): what the deflated Sharpe takes",
    "deflated_sharpe": "probability, 0..1, that the excess Sharpe beats the best of that many skill-less models",
    "score": "the guide's selection score (0.4 x return % + 3 x Sharpe + 20 x win rate - 0.1 x drawdown %): "
             "it ranks models; it is not a return",
    "val_score": "the guide's selection score (not a return)",
    "best_initial_score": "the guide's selection score (not a return)",
    "final_best_score": "the guide's selection score (not a return)",
    "improvement_pct": "percent change of the guide's selection score against the best before (not a return)",
    "total_improvement_pct": "percent change of the guide's selection score from the best initial run to the "
                             "final model (not a return)",
    "timings": "seconds",
    "bars": "hourly candles",
}
