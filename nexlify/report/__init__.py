"""The report: what the agent did (nexlify.report.trace), tear-sheet figures (nexlify.report.metrics) and
the self-contained page (nexlify.report.page). `evaluation` is the one path from a model and its windows
to the evaluation section's data; the pipeline's report (controller.report) and `nexlify evaluate
--report` both use it.

Baselines: each window carries `baselines` as {pair: {name: {"equity": [per bar], "total_return": %,
"sharpe": ..., ...}}}: the evaluation's baselines, stepped through the same environment (flat, cash plus
lending, buy-and-hold full and sized, MA crossover, random valid; nexlify.evaluation), with their
recorded curves, and buy-and-hold without fees drawn from the trace's own prices as a yardstick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nexlify.config import TrainConfig

if TYPE_CHECKING:  # this package stays torch-free: the controller draws pages (render) without torch
    import torch

    from nexlify.env.market import MarketTensors


def evaluation(model: torch.nn.Module, tensors: MarketTensors, windows: dict[str, tuple[int, int]], cfg: TrainConfig,
               evaluated: dict[str, dict] | None = None, title: str = "The final model",
               traces: dict[str, dict] | None = None, stored_baselines=None) -> dict:
    """{"title", "windows": {name: ...}} for each named window (e.g. validation, test): the trace of what the
    agent did bar by bar (nexlify.report.trace), with the metrics of the evaluation itself
    (nexlify.evaluation.evaluate_with_baselines: the agent's, and every baseline's with its per-bar curve).
    The trace is recorded in the pass that gives those metrics (trace_with_baselines): the agent is stepped
    once. `evaluated`: that evaluation's result per window when the caller already has it (with its curves),
    then with its trace in `traces` (`nexlify evaluate --report` records it in its pass); `traces`: what the
    agent did per window, its metrics included (also a paper session's replayed journal,
    controller.paper.report). A window given `evaluated` without a trace is stepped again for the trace.
    `stored_baselines`: the pipeline's stored baselines (nexlify.evaluation.BaselineStore), reused when there."""
    from nexlify.report.trace import buy_and_hold_curves, trace_policy, trace_with_baselines

    out = {}
    for name, window in windows.items():
        ev = (evaluated or {}).get(name)
        trace = (traces or {}).get(name)
        if ev is None and trace is None:
            ev, trace = trace_with_baselines(model, tensors, window, cfg.env, cfg.risk, cfg.strategy_params(),
                                             margin=cfg.agent.hold_margin, baselines=stored_baselines)
            trace["trace_metrics"] = trace["metrics"]  # the trace's stepping is the evaluation's own
        elif ev is None:
            from nexlify.evaluation import evaluate_with_baselines

            ev = evaluate_with_baselines(model, tensors, window, cfg.env, cfg.risk, cfg.strategy_params(),
                                         margin=cfg.agent.hold_margin, record=True)
        elif trace is None:
            trace = trace_policy(model, tensors, window, cfg.env, cfg.risk, cfg.strategy_params(),
                                 margin=cfg.agent.hold_margin)
            trace["trace_metrics"] = trace.pop("metrics")
            trace["metrics"] = ev["agent"]  # the evaluation's numbers, as the summary and `nexlify evaluate` give them
        baselines = per_pair_baselines(ev.get("baselines"), list(tensors.pairs), ev.get("curves"))
        for pair, table in buy_and_hold_curves(trace, float(cfg.env.initial_equity)).items():
            baselines.setdefault(pair, {}).update(table)
        trace["baselines"] = baselines
        trace["baseline_notes"] = ev.get("baseline_notes") or {}
        out[name] = trace
    return {"title": title, "windows": out}


def per_pair_baselines(baselines: dict | None, pairs: list[str], curves: dict | None = None) -> dict[str, dict]:
    """Baselines as the evaluation reports them, {name: metrics} (averages with a "per_pair" table), and
    their recorded curves ({name: {"equity": {pair: [...]}}}), as the report's {pair: {name: metrics with
    "equity"}}. A baseline without a per-pair table applies to every pair."""
    out: dict[str, dict] = {pair: {} for pair in pairs}
    for name, metrics in (baselines or {}).items():
        if not isinstance(metrics, dict):
            continue
        table = metrics.get("per_pair")
        curve = ((curves or {}).get(name) or {}).get("equity") or {}
        for pair in pairs:
            entry = table.get(pair) if isinstance(table, dict) else None
            m = _plain_metrics(entry if isinstance(entry, dict) else metrics)
            if pair in curve:
                m["equity"] = list(curve[pair])
            out[pair][name] = m
    return {pair: table for pair, table in out.items() if table}


def _plain_metrics(m: dict) -> dict:
    """A pair's metrics under the report's names (total_return, sharpe, max_drawdown), averages accepted."""
    out = {k: v for k, v in m.items() if k != "per_pair"}
    for name, avg in (("total_return", "avg_return"), ("sharpe", "avg_sharpe"), ("max_drawdown", "avg_drawdown")):
        if name not in out and avg in out:
            out[name] = out[avg]
    return out


def render(data: dict) -> str:
    from nexlify.report.page import render as render_page

    return render_page(data)


def evaluation_page(path: str, result: dict, model: torch.nn.Module, tensors: MarketTensors, window: tuple[int, int],
                    cfg: TrainConfig, trace: dict | None = None) -> None:
    """`nexlify evaluate --report FILE.html`: the evaluation section for `result` (evaluate_checkpoint's, with
    its curves: record=True) alone; `trace`: the agent's trace recorded in the same pass (evaluate_checkpoint's
    trace=True; None: stepped again)."""
    from nexlify.errors import InputError

    w = result["window"]
    traces = None
    if trace is not None:
        trace["trace_metrics"] = trace["metrics"]
        traces = {"window": trace}
    data = {"title": f"nexlify evaluation of {result['model']}",
            "evaluation": evaluation(model, tensors, {"window": window}, cfg, {"window": result},
                                     title=f"{result['model']} on {w['start']} .. {w['end']}", traces=traces)}
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(render(data))
    except OSError as exc:
        raise InputError(f"--report {path}: cannot be written ({exc.strerror or exc}); accepted: a writable file "
                         "path") from None
