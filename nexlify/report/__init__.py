"""The report: what the agent did (nexlify.report.trace), tear-sheet figures (nexlify.report.metrics) and
the self-contained page (nexlify.report.page). `evaluation` is the one path from a model and its windows
to the evaluation section's data; the pipeline's report (controller.report) and `nexlify evaluate
--report` both use it.

Baselines: each window carries `baselines` as {pair: {name: {"equity": [per bar], "total_return": %,
"sharpe": ..., ...}}}. Cash and buy-and-hold (no fees) are drawn from the trace's own prices; baselines
the evaluation reports ({name: metrics}, turned into that shape by `per_pair_baselines`, e.g. stepped
through the environment) are added beside them: their metrics in the table, their curves in the chart
when they carry one.
"""

from __future__ import annotations

import torch

from nexlify.config import TrainConfig
from nexlify.env.market import MarketTensors
from nexlify.report.trace import buy_and_hold_curves, trace_policy


def evaluation(model: torch.nn.Module, tensors: MarketTensors, windows: dict[str, tuple[int, int]], cfg: TrainConfig,
               extra_baselines: dict[str, dict] | None = None, title: str = "The final model") -> dict:
    """{"title", "windows": {name: trace + "baselines"}} for each named window (e.g. validation, test)."""
    out = {}
    for name, window in windows.items():
        trace = trace_policy(model, tensors, window, cfg.env, cfg.risk, cfg.strategy_params())
        baselines = buy_and_hold_curves(trace, float(cfg.env.initial_equity))
        for pair, table in ((extra_baselines or {}).get(name) or {}).items():
            baselines.setdefault(pair, {}).update(table)
        trace["baselines"] = baselines
        out[name] = trace
    return {"title": title, "windows": out}


def render(data: dict) -> str:
    from nexlify.report.page import render as render_page

    return render_page(data)


def per_pair_baselines(baselines: dict | None, pairs: list[str]) -> dict[str, dict]:
    """Baselines as an evaluation reports them, {name: metrics}, where metrics may hold a per-bar "equity"
    curve and a "per_pair" table (each pair's metrics, with its own "equity" when recorded), turned into the
    report's {pair: {name: metrics}}. A baseline without a per-pair table applies to every pair."""
    out: dict[str, dict] = {pair: {} for pair in pairs}
    for name, metrics in (baselines or {}).items():
        if not isinstance(metrics, dict):
            continue
        table = metrics.get("per_pair")
        for pair in pairs:
            entry = table.get(pair) if isinstance(table, dict) else None
            out[pair][name] = _plain_metrics(entry if isinstance(entry, dict) else metrics)
    return {pair: table for pair, table in out.items() if table}


def _plain_metrics(m: dict) -> dict:
    """A pair's metrics under the report's names (total_return, sharpe, max_drawdown), averages accepted."""
    out = {k: v for k, v in m.items() if k != "per_pair"}
    for name, avg in (("total_return", "avg_return"), ("sharpe", "avg_sharpe"), ("max_drawdown", "avg_drawdown")):
        if name not in out and avg in out:
            out[name] = out[avg]
    return out


def evaluation_page(path: str, result: dict, model: torch.nn.Module, tensors: MarketTensors, window: tuple[int, int],
                    cfg: TrainConfig) -> None:
    """`nexlify evaluate --report FILE.html`: the evaluation section for `result` (evaluate_checkpoint's) alone.
    Baselines the evaluation reports per pair with their curves ({"baselines": {pair: {name: {"equity": ...}}}})
    are drawn beside the agent."""
    from nexlify.errors import InputError

    extra = {"window": per_pair_baselines(result.get("baselines"), list(tensors.pairs))}
    w = result["window"]
    data = {"title": f"nexlify evaluation of {result['model']}",
            "evaluation": evaluation(model, tensors, {"window": window}, cfg, extra,
                                     title=f"{result['model']} on {w['start']} .. {w['end']}")}
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(render(data))
    except OSError as exc:
        raise InputError(f"--report {path}: cannot be written ({exc.strerror or exc}); accepted: a writable file "
                         "path") from None
