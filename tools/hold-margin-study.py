"""The study behind agent.hold_margin's default: every model each fold of a walk-forward output tried, on
its validation window (the 90 days its pipeline selected on) and on the fold's test window, greedy with
several hold margins (nexlify.evaluation.greedy_policy), all margins stepped as one batch in the same
environment. Prints one JSON object per model, then per margin the mean return over all models on
validation and on test, how many beat cash plus lending on test, and the selected models' test returns.

Usage (from the repository root; a study, it reads ../shared/data):
    PYTHONPATH=. python tools/hold-margin-study.py OUTPUT [--data-dir ../shared/data] [--margins 0 0.01 0.02 0.05 0.1]
The selected models are those the pipelines chose with their own margin; with another margin they would
have chosen differently (rerun the walk-forward with --config to see that).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from controller.backtest_run import candidate_models
from nexlify import checkpoint
from nexlify.evaluate_cmd import _greedy_model, _market_window
from nexlify.evaluation import Group, _simulate, greedy_policy, riskless_total_return

TIE = 1e-6  # percentage points: a model that never trades earns lending's return to rounding, not more


def model_rows(fold: int, fold_dir: str, margins: list[float], data_dir: str):
    with open(os.path.join(fold_dir, "test_result.json")) as f:
        window = json.load(f)["window"]
    with open(os.path.join(fold_dir, "complete_training_summary.json")) as f:
        summary = json.load(f)
    keys = candidate_models(summary)
    candles = {}  # window name -> (market, span, raw features): read once, every model of one pipeline shares them
    for c in summary["candidates"]:
        path = os.path.join(fold_dir, keys[c["source"]])
        ckpt = checkpoint.load(path)
        cfg = checkpoint.train_config(ckpt, path)
        row = {"fold": fold, "source": c["source"], "selected": c["selected"], "val_score": c["val_score"]}
        # no dates: the checkpoint's own validation window, as `nexlify evaluate` takes it
        for name, (start, end) in {"val": (None, None), "test": (window["test_start"], window["test_end"])}.items():
            if name not in candles:
                candles[name] = _market_window(cfg, None, cfg.data.exchange, data_dir, start, end)
            market, span, raw = candles[name]
            tensors, net = _greedy_model(ckpt, cfg, market, torch.device("cpu"), raw)
            params = cfg.strategy_params()
            groups = [Group(str(m), greedy_policy(net, m)) for m in margins]
            with torch.no_grad():
                results = _simulate(tensors, span, cfg.env, cfg.risk, params, groups, False)["results"]
            row[name] = {m: results[m]["avg_return"] for m in results}
            row[name + "_trades"] = {m: results[m]["total_trades"] for m in results}
            row[name + "_lending"] = riskless_total_return(tensors, span, params)
        yield row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("output")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--margins", nargs="+", type=float, default=[0.0, 0.01, 0.02, 0.05, 0.1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, k = [], 1
    while os.path.exists(os.path.join(fold_dir := os.path.join(args.output, f"fold_{k}"), "test_result.json")):
        for row in model_rows(k, fold_dir, args.margins, args.data_dir):
            print(json.dumps(row), flush=True)
            rows.append(row)
        k += 1
    for m in map(str, args.margins):
        test = [r["test"][m] for r in rows]
        print(json.dumps({
            "margin": float(m), "models": len(rows),
            "val_mean_return": statistics.mean(r["val"][m] for r in rows),
            "test_mean_return": statistics.mean(test),
            "test_beat_lending": sum(r["test"][m] > r["test_lending"] + TIE for r in rows),
            "selected_test_returns": [r["test"][m] for r in rows if r["selected"]],
        }), flush=True)


if __name__ == "__main__":
    main()
