"""report.html of a pipeline output (a folder or s3://): written after the summary, and rebuilt by
`nexlify report OUTPUT`. An output holding a paper session (`nexlify paper`'s session.json) gets the same
page for the session: its verdict, the agent's equity from the journal beside the baselines over the same
bars (controller.paper.report, in a child process like the final model's evaluation).

Everything comes from the output itself, through its store: the summary and the state (runs, scores,
decisions), each run's TensorBoard event file (training curves), and the final model and the data
snapshot, with which the final model is stepped through the validation (and test) window again
(nexlify.report.evaluation: the same greedy evaluation the run's validation was, bar by bar). That
stepping needs torch and runs in a child process (nexlify.report.final_model): the controller stays torch-free.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import structlog

from controller.scratch import scratch_dir, sha256_file
from controller.state import initial_run_key, retrain_run_key
from controller.stores import StoreKeyMissing
from controller.stores.base import Store
from nexlify.errors import InputError, PermanentError

log = structlog.get_logger("nexlify.report")

REPORT_KEY = "report.html"
SUMMARY_KEY = "complete_training_summary.json"  # controller.pipeline's keys (it imports this module lazily)
STATE_KEY = "pipeline_state.json"
PAPER_HEADER_KEY = "session.json"  # controller.paper.journal.HEADER_KEY (that module imports torch)
BASELINES_FOLDER = "baselines"  # nexlify.report.final_model's (that module imports torch)
BASELINES_DIR = "baselines"  # the pipeline's stored baselines (controller.pipeline.BASELINES_PREFIX)
REPORT_SCRATCH_PREFIX = "nexlify-report-"  # + <pid>-: the model and data copies, removed by the next report if left


def _json(store: Store, key: str) -> dict | None:
    """The JSON object at key (None if absent); DamagedSummary naming the file if it is not one."""
    try:
        blob = store.read_bytes(key)
    except StoreKeyMissing:
        return None
    try:
        data = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        what = "empty" if not blob.strip() else f"not valid JSON ({str(exc).splitlines()[0]})"
        raise DamagedSummary(store.url(key), what) from None
    if not isinstance(data, dict):
        raise DamagedSummary(store.url(key), f"a JSON {type(data).__name__}, not an object")
    return data


class DamagedSummary(PermanentError):
    """A file of a finished output that exists but cannot be drawn: one line naming the file and the field.
    Exit code 1 (a damaged output, like a damaged state), not 2: the output given was a finished one."""

    def __init__(self, url: str, what: str) -> None:
        super().__init__(f"{url} is damaged: {what}; run `nexlify train` with the same settings and output to "
                         "write it again from the pipeline's state, or restore it")


_NUMBER = (int, float)


def _field(where: str, value: object, kinds: tuple, url: str, *, finite: bool = False) -> None:
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
                 bool: "true/false"}
        wanted = " or ".join(dict.fromkeys(names[k] for k in kinds))
        got = "missing" if value is None else f"{type(value).__name__} {value!r:.60}"
        raise DamagedSummary(url, f"field '{where}' is {got}; expected {wanted}")
    if finite and not math.isfinite(value):
        raise DamagedSummary(url, f"field '{where}' is {value!r}; expected a finite number")


def check_summary(summary: dict, url: str) -> None:
    """What the report draws, checked before it draws anything: a finished pipeline's summary with the
    fields and types it needs, finite scores, a selection report, and a final model that is one of its runs.
    DamagedSummary naming the first bad field."""
    if summary.get("pipeline_complete") is not True:
        raise DamagedSummary(url, f"field 'pipeline_complete' is {summary.get('pipeline_complete')!r:.60}; "
                             "a finished pipeline's summary says true")
    for name, kinds in (("pipeline_id", (str,)), ("stop_reason", (str,)), ("initial_runs", (list,)),
                        ("retraining_iterations", (list,)), ("best_initial_run", (int,)),
                        ("final_model_path", (str,)), ("config", (dict,)), ("data", (dict,)),
                        ("selection", (dict,))):
        _field(name, summary.get(name), kinds, url)
    for name in ("best_initial_score", "final_best_score", "total_improvement_pct"):
        _field(name, summary.get(name), _NUMBER, url, finite=True)
    _check_runs(summary, url)
    for name in ("improvement_threshold", "patience", "max_iterations"):
        _field(f"config.{name}", summary["config"].get(name), _NUMBER, url, finite=True)
    _field("data.files", summary["data"].get("files"), (list,), url)
    for i, f in enumerate(summary["data"]["files"]):
        _field(f"data.files[{i}]", f, (dict,), url)
        _field(f"data.files[{i}].key", f.get("key"), (str,), url)
    final = summary.get("final_model_key") or summary["final_model_path"]
    models = [r["model_path"] for r in summary["initial_runs"]] + [
        it["model_path"] for it in summary["retraining_iterations"]]
    if final not in models:
        name = "final_model_key" if summary.get("final_model_key") else "final_model_path"
        raise DamagedSummary(url, f"field '{name}' is {final!r:.200}, which names none of its runs' models")


def _check_runs(summary: dict, url: str) -> None:
    if not summary["initial_runs"]:
        raise DamagedSummary(url, "field 'initial_runs' is an empty list; expected one entry per initial run")
    for i, run in enumerate(summary["initial_runs"]):
        where = f"initial_runs[{i}]"
        _field(where, run, (dict,), url)
        for name, kinds in (("run_id", (int,)), ("seed", (int,)), ("model_path", (str,)), ("val_metrics", (dict,))):
            _field(f"{where}.{name}", run.get(name), kinds, url)
        for name in ("val_score", "train_return"):
            _field(f"{where}.{name}", run.get(name), _NUMBER, url, finite=True)
        for name in ("avg_return", "avg_sharpe"):
            _field(f"{where}.val_metrics.{name}", run["val_metrics"].get(name), _NUMBER, url, finite=True)
    for i, it in enumerate(summary["retraining_iterations"]):
        where = f"retraining_iterations[{i}]"
        _field(where, it, (dict,), url)
        for name, kinds in (("iteration", (int,)), ("seed", (int,)), ("model_path", (str,)), ("metrics", (dict,)),
                            ("new_best", (bool,))):
            _field(f"{where}.{name}", it.get(name), kinds, url)
        for name in ("score", "train_return", "improvement_pct"):
            _field(f"{where}.{name}", it.get(name), _NUMBER, url, finite=True)
        for name in ("avg_return", "avg_sharpe"):
            _field(f"{where}.metrics.{name}", it["metrics"].get(name), _NUMBER, url, finite=True)


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


def _child(module: str, args: list[str], what: str, launcher=None) -> dict:
    """Run `python -m module *args OUT_JSON` (a torch process of the report), relay its events and return its
    JSON; its error as ours (exit code 2: InputError). `what` names it in an error without a cause. With a
    launcher (a pipeline's workers', controller.executors.prefork), the process is forked from it, its
    imports already done."""
    with scratch_dir(REPORT_SCRATCH_PREFIX) as tmp:
        out_path = os.path.join(tmp, "out.json")
        forked = None
        if launcher is not None:
            try:
                forked = launcher.spawn([*args, out_path], main=f"{module}:main")
            except OSError as exc:  # the launcher died: a fresh process does the same
                log.warning("worker_launcher_unavailable", reason=str(exc), fallback="a fresh process")
        if forked is not None:
            with forked.stderr:
                stderr = forked.stderr.read()
            returncode = forked.wait()
        else:
            child = subprocess.run([sys.executable, "-m", module, *args, out_path], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            stderr, returncode = child.stderr, child.returncode
        cause = _relay_events(stderr, module)
        if returncode != 0:
            error = InputError if returncode == 2 else PermanentError
            raise error(cause or f"{what} failed (exit code {returncode})")
        with open(out_path, encoding="utf-8") as fh:
            return json.load(fh)


def paper_data(store: Store) -> dict:
    """The page's data for the paper session in the output (controller.paper.report)."""
    root = store.url(PAPER_HEADER_KEY)[:-len(PAPER_HEADER_KEY)].rstrip("/")
    return _child("controller.paper.report", [root], "the paper session's replay")


def final_model_evaluation(store: Store, summary: dict, launcher=None) -> dict:
    """The final model stepped through the pipeline's validation and test windows, on the output's own data
    snapshot and with the model's own config and normaliser. The stepping needs torch, so it runs in a
    process of its own (nexlify.report.final_model); the controller reads its JSON and relays its events."""
    with scratch_dir(REPORT_SCRATCH_PREFIX) as tmp:
        data_dir = os.path.join(tmp, "data")
        os.mkdir(data_dir)
        for f in summary["data"]["files"]:
            local = os.path.join(data_dir, os.path.basename(f["key"]))
            _download_checked(store, f["key"], local, f.get("sha256"), "the summary's data snapshot")
        model_path = os.path.join(tmp, "model.pt")
        _download_checked(store, model_key(summary), model_path, summary.get("final_model_sha256"), "the summary")
        # the baselines the runs stored beside the snapshot: the child reuses them and adds those it computes,
        # which go back into the output, so the next report reads them too
        stored = os.path.join(data_dir, BASELINES_FOLDER)
        os.mkdir(stored)
        had = set()
        for key in store.list(f"{BASELINES_DIR}/"):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                store.download_file(key, os.path.join(stored, name))
                had.add(name)
        out = _child("nexlify.report.final_model", ["--name", store.url(model_key(summary)), model_path, data_dir],
                     "the final model's evaluation", launcher)
        for name in sorted(set(os.listdir(stored)) - had):
            with open(os.path.join(stored, name), "rb") as fh:
                blob = fh.read()
            try:
                store.write_bytes(f"{BASELINES_DIR}/{name}", blob)
            except OSError as exc:  # a read-only output still gets its report; the next one computes them again
                log.warning("baselines_not_stored", url=store.url(f"{BASELINES_DIR}/{name}"), error=str(exc))
        return out


def _download_checked(store: Store, key: str, local: str, want: str | None, recorded_in: str) -> None:
    """Copy an output's file to a scratch path and check it against its recorded sha256: a damaged file is
    named by its place in the output, never by the scratch copy (which is gone once the report fails)."""
    try:
        store.download_file(key, local)
    except StoreKeyMissing:
        raise PermanentError(f"{store.url(key)} is missing (named in {recorded_in}); restore it, or run "
                             "`nexlify train` on this output to train it again") from None
    if want is None:
        return
    got = sha256_file(local)
    if got != want:
        raise PermanentError(f"{store.url(key)} is damaged: its sha256 {got[:16]} ({os.path.getsize(local)} bytes) "
                             f"is not the {want[:16]} recorded in {recorded_in}; restore it, or run `nexlify "
                             "train --force` on this output to train it again")


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


def read_summary(store: Store) -> dict | None:
    """The output's summary, checked (check_summary); None for a paper session (drawn from its journal);
    InputError (exit 2) if there is neither: not the output of a finished pipeline; DamagedSummary (exit 1)
    if it cannot be drawn."""
    summary = _json(store, SUMMARY_KEY)
    if summary is None and store.exists(PAPER_HEADER_KEY):
        return None
    if summary is None:
        raise InputError(f"{store.url(SUMMARY_KEY)} does not exist: the pipeline there has not finished; accepted: "
                         "the output folder or s3:// prefix of a finished pipeline, or of a paper session "
                         f"(with {PAPER_HEADER_KEY})")
    check_summary(summary, store.url(SUMMARY_KEY))
    return summary


def build(store: Store, launcher=None) -> dict:
    """The page's data. launcher: where the final model's evaluation process is forked from (a pipeline's
    controller.executors.prefork.Launcher), else it is a fresh process."""
    summary = read_summary(store)
    if summary is None:
        return paper_data(store)
    try:
        state = _json(store, STATE_KEY)
    except DamagedSummary:  # the state only adds each iteration's patience count: drawn without it
        state = None
    p = pipeline_data(summary, state)
    return {"title": f"nexlify pipeline {summary['pipeline_id']}", "verdict": summary_verdict(summary), "pipeline": p,
            "evaluation": final_model_evaluation(store, summary, launcher), "training": training_curves(store, p["runs"])}


def write_report(store: Store, launcher=None) -> str:
    """Build report.html from the output and write it there; returns its URL. launcher: as build's."""
    from nexlify.report import render

    store.write_bytes(REPORT_KEY, render(build(store, launcher)).encode())
    return store.url(REPORT_KEY)
