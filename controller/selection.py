"""Selection honesty: what the summary says about the candidates and the model it selected, as pure
functions of recorded numbers (each run's result.json, through the pipeline state).

- Every candidate (each initial run, each retraining iteration) with its validation return and Sharpe
  beside the guide's score, which alone decides the selection (controller.rules).
- For the selected model: the deflated Sharpe ratio (nexlify.metrics.deflated_sharpe; Bailey & Lopez de
  Prado 2014) for the number of models tried, from the per-bar return moments of each candidate's
  validation book (the pairs' portfolios added up); a candidate whose validation returns never varied
  counts as a trial with Sharpe 0.
- A plain flag, `beats_cash_plus_lending`, and a sentence: does the selected model's validation return
  beat the cash-plus-lending baseline's on the same window, in the same environment? `beats_baselines`
  makes the comparison with every baseline, on return and on Sharpe in excess of what cash plus lending
  earns (`avg_sharpe_vs_lending`, nexlify.metrics.sharpe_vs_lending: cash plus lending, riskless, has 0;
  with rf = 0 its near-constant returns make the plain Sharpe meaningless); the plain Sharpe (rf = 0), the
  score's, is reported beside.
"""

from __future__ import annotations

from nexlify.metrics import deflated_sharpe

CASH_PLUS_LENDING = "cash_plus_lending"  # nexlify.baselines.CASH_PLUS_LENDING (the controller imports no torch)


def candidate(source: str, seed: int, val_score: float, val_metrics: dict, *, selected: bool) -> dict:
    """One row of the summary's candidate table."""
    return {"source": source, "seed": seed, "val_score": val_score, "val_return": val_metrics.get("avg_return"),
            "val_sharpe": val_metrics.get("avg_sharpe"),
            "val_sharpe_vs_lending": val_metrics.get("avg_sharpe_vs_lending"), "selected": selected}


def selection_report(candidates: list[dict], moments: dict[str, dict | None], baselines: dict | None) -> dict:
    """The summary's `selection`: the selected candidate (exactly one has selected=True), its validation
    return and Sharpe beside cash plus lending's, the flag and its sentence, and the deflated Sharpe ratio.

    moments: source -> the return moments of its validation book (nexlify.metrics.return_moments), None
    where not recorded; baselines: the selected run's val_baselines (name -> metrics) or None."""
    chosen = [c for c in candidates if c["selected"]]
    if len(chosen) != 1:
        raise ValueError(f"{len(chosen)} candidates are marked selected; expected exactly one")
    sel = chosen[0]
    report = {"selected": sel["source"], "val_score": sel["val_score"], "val_return": sel["val_return"],
              "val_sharpe": sel["val_sharpe"], "val_sharpe_vs_lending": sel.get("val_sharpe_vs_lending"),
              "models_tried": len(candidates)}

    lending = (baselines or {}).get(CASH_PLUS_LENDING)
    if lending is None or sel["val_return"] is None:
        report.update(cash_plus_lending=None, beats_cash_plus_lending=None,
                      verdict=f"{sel['source']} was selected; no cash-plus-lending baseline was recorded for it, "
                              "so whether it beats lending idle cash is unknown.")
    else:
        beats = sel["val_return"] > lending["avg_return"]
        report["cash_plus_lending"] = {"avg_return": lending["avg_return"], "avg_sharpe": lending["avg_sharpe"],
                                       "avg_sharpe_vs_lending": lending.get("avg_sharpe_vs_lending")}
        report["beats_cash_plus_lending"] = beats
        report["verdict"] = (
            f"{sel['source']} {'beats' if beats else 'does not beat'} cash plus lending on the validation window: "
            f"return {sel['val_return']:.3f} % against {lending['avg_return']:.3f} % from lending idle cash at the "
            "modelled Aave rate" + ("." if beats else "; holding cash in Aave would have done better."))

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
    report["deflated_sharpe"] = _deflated(sel["source"], candidates, moments)
    return report


def _deflated(selected: str, candidates: list[dict], moments: dict[str, dict | None]) -> dict:
    own = moments.get(selected)
    recorded = [moments.get(c["source"]) for c in candidates]
    trials = [float(m["sharpe"]) if m.get("sharpe") is not None else 0.0 for m in recorded if m is not None]
    if own is None:
        return {"value": None, "trials": len(trials),
                "reason": "the selected run recorded no return moments (a result.json from an older version)"}
    if own.get("sharpe") is None:
        return {"value": None, "trials": len(trials),
                "reason": "the selected model's validation returns never varied: it has no Sharpe ratio to deflate"}
    try:
        out = deflated_sharpe(float(own["sharpe"]), int(own["n"]), float(own["skew"]), float(own["kurtosis"]), trials)
    except ValueError as exc:
        return {"value": None, "trials": len(trials), "reason": str(exc)}
    out["note"] = (f"probability that the selected model's true per-bar Sharpe ({out['sharpe']:.4f}) exceeds the "
                   f"expected best of {out['trials']} skill-less trials ({out['expected_max_sharpe']:.4f})")
    return out


def final_lines(summary: dict) -> list[str]:
    """The train command's last lines: the winner, its validation return and Sharpe against cash plus
    lending, the deflated Sharpe ratio, and the flag."""
    s = summary.get("selection")
    if not s:
        return []
    excess = s.get("val_sharpe_vs_lending")
    lines = [f"winner: {s['selected']}  validation return {s['val_return']:.3f} %, Sharpe {s['val_sharpe']:.3f}"
             + ("" if excess is None else f" ({excess:.3f} in excess of the lending rate)")
             + f", score {s['val_score']:.3f} ({s['models_tried']} models tried)"]
    cpl = s.get("cash_plus_lending")
    if cpl is not None:
        lines.append(f"cash plus lending, same window: return {cpl['avg_return']:.3f} %, "
                     f"Sharpe {cpl['avg_sharpe']:.3f}")
    d = s["deflated_sharpe"]
    if d.get("value") is not None:
        lines.append(f"deflated Sharpe ratio: {d['value']:.3f} ({d['note']})")
    else:
        lines.append(f"deflated Sharpe ratio: none ({d['reason']})")
    flag = s.get("beats_cash_plus_lending")
    lines.append(f"beats_cash_plus_lending: {'unknown' if flag is None else str(flag).lower()}: {s['verdict']}")
    return lines
