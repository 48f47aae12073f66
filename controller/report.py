"""report.html of a pipeline output (a folder or s3://): written after the summary, and rebuilt by
`nexlify report OUTPUT`. An output holding a paper session (`nexlify paper`'s session.json) gets the same
page for the session: its verdict, the agent's equity from the journal beside the baselines over the same
bars (nexlify.report.paper, in a child process like the final model's evaluation).

Everything comes from the output itself, through its store: the summary and the state (runs, scores,
decisions), each run's TensorBoard event file (training curves), and the final model and the data
snapshot, with which the final model is stepped through the validation (and test) window again
(nexlify.report.evaluation: the same greedy evaluation the run's validation was, bar by bar). That
stepping needs torch and runs in a child process (nexlify.report.final_model): the controller stays torch-free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import structlog

from controller.state import initial_run_key, retrain_run_key
from controller.stores import StoreKeyMissing
from controller.stores.base import Store
from nexlify.errors import InputError, PermanentError

log = structlog.get_logger("nexlify.report")

REPORT_KEY = "report.html"
SUMMARY_KEY = "complete_training_summary.json"  # controller.pipeline's keys (it imports this module lazily)
STATE_KEY = "pipeline_state.json"
PAPER_HEADER_KEY = "session.json"  # nexlify.paper.journal.HEADER_KEY (that module imports torch)


def _json(store: Store, key: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(key))
    except StoreKeyMissing:
        return None


def model_key(summary: dict) -> str:
    """The final model's key in the output (final_model_path is its full URL; older summaries had the key
    there)."""
    return summary.get("final_model_key") or summary["final_model_path"]


def pipeline_data(summary: dict, state: dict | None) -> dict:
    """The at-a-glance section's numbers, as the summary (and, for each iteration's patience, the state)
    recorded them."""
    cfg = summary["config"]
    runs = []
    for r in summary["initial_runs"]:
        m = r["val_metrics"]
        runs.append({"key": initial_run_key(r["run_id"]), "phase": "initial", "seed": r["seed"],
                     "val_return": m["avg_return"],
                     "val_sharpe": m["avg_sharpe"], "score": r["val_score"], "train_return": r["train_return"],
                     "model_path": r["model_path"], "folder": f"initial_runs/run_{r['run_id']}",
                     "improvement_pct": None, "new_best": None,
                     "decision": "selected" if r["run_id"] == summary["best_initial_run"] else "not selected"})
    recorded = {e["iteration"]: e for e in (state or {}).get("retraining", [])}
    for it in summary["retraining_iterations"]:
        k = it["iteration"]
        count = recorded.get(k, {}).get("patience_count")
        decision = "new best" if it["new_best"] else (f"patience {count}/{cfg['patience']}" if count is not None
                                                      else "no improvement")
        m = it["metrics"]
        runs.append({"key": retrain_run_key(k), "phase": "retrain", "seed": it["seed"], "val_return": m["avg_return"],
                     "val_sharpe": m["avg_sharpe"], "score": it["score"], "train_return": it["train_return"],
                     "model_path": it["model_path"], "folder": f"retraining/iteration_{k}",
                     "improvement_pct": it["improvement_pct"], "new_best": it["new_best"], "patience_count": count,
                     "decision": decision})
    final_key = model_key(summary)
    winner = next(r for r in runs if r["model_path"] == final_key)
    return {
        "pipeline_id": summary["pipeline_id"], "stop_reason": summary["stop_reason"], "runs": runs,
        "winner": {"key": winner["key"], "score": summary["final_best_score"],
                   "model_path": final_key, "url": summary["final_model_path"]},
        "best_initial_score": summary["best_initial_score"], "final_best_score": summary["final_best_score"],
        "total_improvement_pct": summary["total_improvement_pct"],
        "final_test_metrics": summary.get("final_test_metrics"),
        "rule": {"improvement_threshold": cfg["improvement_threshold"], "patience": cfg["patience"],
                 "max_iterations": cfg["max_iterations"]},
        "data": summary["data"], "config": cfg,
    }


def summary_verdict(summary: dict) -> dict:
    """The summary's verdict block (nexlify.verdict); from a summary of an older version, which had none, a
    block that says so in words (its selection sentence when it has one)."""
    v = summary.get("verdict")
    if isinstance(v, dict) and isinstance(v.get("text"), str):
        return v
    said = (summary.get("selection") or {}).get("verdict")
    return {"text": "Verdict: not recorded by the version that wrote this summary"
                    + (f" (it said: {said})" if isinstance(said, str) else "."),
            "beats_cash_plus_lending": (summary.get("selection") or {}).get("beats_cash_plus_lending")}


def training_curves(store: Store, runs: list[dict]) -> dict:
    """{run key: {tag: [[step, value], ...]}} from each run's event file (runs without one are left out)."""
    from nexlify.tb import EVENTS_FILE, read_scalars

    out = {}
    for r in runs:
        try:
            blob = store.read_bytes(f"{r['folder']}/{EVENTS_FILE}")
        except StoreKeyMissing:
            continue
        out[r["key"]] = {tag: [[s, v] for s, v in values] for tag, values in read_scalars([blob]).items()}
    return out


def _child(module: str, args: list[str], what: str) -> dict:
    """Run `python -m module *args OUT_JSON` (a torch process of the report), relay its events and return its
    JSON; its error as ours (exit code 2: InputError)."""
    with tempfile.TemporaryDirectory(prefix="nexlify-report-") as tmp:
        out_path = os.path.join(tmp, "out.json")
        child = subprocess.run([sys.executable, "-m", module, *args, out_path], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        cause = _relay_events(child.stderr, module)
        if child.returncode != 0:
            error = InputError if child.returncode == 2 else PermanentError
            raise error(cause or f"{what} failed (exit code {child.returncode})")
        with open(out_path, encoding="utf-8") as fh:
            return json.load(fh)


def paper_data(store: Store) -> dict:
    """The page's data for the paper session in the output (nexlify.report.paper)."""
    root = store.url(PAPER_HEADER_KEY)[:-len(PAPER_HEADER_KEY)].rstrip("/")
    return _child("nexlify.report.paper", [root], "the paper session's replay")


def final_model_evaluation(store: Store, summary: dict) -> dict:
    """The final model stepped through the pipeline's validation and test windows, on the output's own data
    snapshot and with the model's own config and normaliser. The stepping needs torch, so it runs in a
    process of its own (nexlify.report.final_model); the controller reads its JSON and relays its events."""
    with tempfile.TemporaryDirectory(prefix="nexlify-report-") as tmp:
        data_dir = os.path.join(tmp, "data")
        os.mkdir(data_dir)
        for f in summary["data"]["files"]:
            store.download_file(f["key"], os.path.join(data_dir, os.path.basename(f["key"])))
        model_path = os.path.join(tmp, "model.pt")
        store.download_file(model_key(summary), model_path)
        out_path = os.path.join(tmp, "evaluation.json")
        child = subprocess.run([sys.executable, "-m", "nexlify.report.final_model", model_path, data_dir, out_path,
                                "--name", store.url(model_key(summary))],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        cause = _relay_events(child.stderr)
        if child.returncode != 0:
            error = InputError if child.returncode == 2 else PermanentError
            raise error(cause or f"the final model's evaluation failed (exit code {child.returncode})")
        with open(out_path, encoding="utf-8") as fh:
            return json.load(fh)


def _relay_events(stderr: str, process: str = "nexlify.report.final_model") -> str | None:
    """Log the evaluation process's JSON events as ours; return its error: the `failed` event's, or the
    last line of a traceback."""
    cause = None
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip():
                log.info("report_output", line=line)
                cause = line.strip()
            continue
        if not isinstance(event, dict):
            continue
        name = event.pop("event", "report_event")
        if name == "failed" and event.get("error"):
            cause = str(event["error"])  # raised by the caller: one error line, not two
            continue
        level = event.pop("level", "info")
        event.pop("timestamp", None)
        event.setdefault("process", process)
        getattr(log, level if level in ("debug", "info", "warning", "error") else "info")(name, **event)
    return cause


def build(store: Store) -> dict:
    summary = _json(store, SUMMARY_KEY)
    if summary is None and store.exists(PAPER_HEADER_KEY):
        return paper_data(store)
    if summary is None:
        raise InputError(f"{store.url(SUMMARY_KEY)} does not exist: the pipeline there has not finished; accepted: "
                         "the output folder or s3:// prefix of a finished pipeline, or of a paper session "
                         f"(with {PAPER_HEADER_KEY})")
    p = pipeline_data(summary, _json(store, STATE_KEY))
    return {"title": f"nexlify pipeline {summary['pipeline_id']}", "verdict": summary_verdict(summary), "pipeline": p,
            "evaluation": final_model_evaluation(store, summary), "training": training_curves(store, p["runs"])}


def write_report(store: Store) -> str:
    """Build report.html from the output and write it there; returns its URL."""
    from nexlify.report import render

    store.write_bytes(REPORT_KEY, render(build(store)).encode())
    return store.url(REPORT_KEY)
