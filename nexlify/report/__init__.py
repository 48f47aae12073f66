"""The report: what the agent did (nexlify.report.trace), tear-sheet figures (nexlify.report.metrics) and
the self-contained page (nexlify.report.page). `evaluation` is the one path from a model and its windows
to the evaluation section's data; the pipeline's report (controller.report) and `nexlify evaluate
--report` both use it.

Baselines: each window carries `baselines` as {pair: {name: {"equity": [per bar], "total_return": %,
"sharpe": ..., ...}}}. Cash and buy-and-hold (no fees) are drawn from the trace's own prices; baselines
the evaluation reports (`extra_baselines`, same shape, e.g. stepped through the environment) are added
beside them and drawn the same way.
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


def evaluation_page(path: str, result: dict, model: torch.nn.Module, tensors: MarketTensors, window: tuple[int, int],
                    cfg: TrainConfig) -> None:
    """`nexlify evaluate --report FILE.html`: the evaluation section for `result` (evaluate_checkpoint's) alone.
    Baselines the evaluation reports per pair with their curves ({"baselines": {pair: {name: {"equity": ...}}}})
    are drawn beside the agent."""
    from nexlify.errors import InputError

    extra = result.get("baselines")
    extra = {"window": extra} if isinstance(extra, dict) and all(isinstance(v, dict) for v in extra.values()) else None
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
