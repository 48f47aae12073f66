"""`nexlify backtest --walk-forward`: each fold is a whole pipeline run, then a test on the window after it.

    <output>/fold_<k>/                  a complete pipeline output (data snapshot, runs, summary, training.log)
    <output>/fold_<k>/test_result.json  the fold's window, its pipeline's final model and the test evaluation
    <output>/walk_forward.json          the table rows and the aggregate (rewritten after every fold)

With --seeds s1 s2 ..., the whole walk-forward runs once per seed (the pipeline's --seed), each in
<output>/seed_<s>/ with the layout above, and <output>/walk_forward.json combines them
(controller.backtest.combine_seeds: fold-seeds won against each baseline).

A fold's pipeline is controller.run.run_pipeline with the walk-forward's PipelineConfig, only its data window
moved (data.start / data.end = the fold's training window, no held-out test_days: the fold's test window is
the test), so it runs through the same executor (local workers or Kubernetes Jobs) and store (folder or S3).
Rerunning the same command skips folds whose test_result.json matches their config hash and window, and an
interrupted fold's pipeline resumes itself. The fold rules (dates, rows, aggregate) are controller.backtest.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace

import structlog

from controller.backtest import Fold, WalkForwardConfig, aggregate, combine_seeds, fold_row, plan_folds
from controller.config import PipelineConfig, pipeline_hash
from controller.lease import LeaseHeld, acquire_output_lease
from controller.pipeline import SUMMARY_KEY
from controller.state import initial_run_key, retrain_run_key
from nexlify.configtools import add_flags, config_hash, flags_to_mapping, to_dict
from nexlify.data.timeframes import parse_utc_ms
from nexlify.errors import InputError, NexlifyError, PermanentError

log = structlog.get_logger("nexlify.backtest")

WALK_FORWARD_KEY = "walk_forward.json"
TEST_RESULT = "test_result.json"


def fold_prefix(k: int) -> str:
    return f"fold_{k}"


def seed_prefix(seed: int) -> str:
    return f"seed_{seed}"


def fold_config(cfg: PipelineConfig, fold: Fold, output: str) -> PipelineConfig:
    """The pipeline config of one fold: the walk-forward's, trained on [train_start, test_start) only."""
    out = copy.deepcopy(cfg)
    out.train.data.start = fold.train_start
    out.train.data.end = fold.train_end
    out.train.data.test_days = 0
    out.output = output
    return out


def fold_layout(wf: WalkForwardConfig) -> dict:
    """The fold settings of one seed's walk-forward (--seeds is the combination's: left out, so that a
    walk-forward keeps its hash whether run alone or as one of several seeds)."""
    return {k: v for k, v in to_dict(wf).items() if k != "seeds"}


def walk_forward_hash(cfg: PipelineConfig, wf: WalkForwardConfig) -> str:
    """What the folds compute: the pipeline's config hash (runtime settings excluded) and the fold layout."""
    return config_hash({"pipeline": pipeline_hash(cfg), "walk_forward": fold_layout(wf)})


# ------------------------------------------------------------------------------------------- running


def seed_config(cfg: PipelineConfig, seed: int, output: str) -> PipelineConfig:
    """The walk-forward's pipeline config with another --seed, writing to `output`."""
    out = copy.deepcopy(cfg)
    out.seed = seed
    out.output = output
    return out


def seeds_hash(cfg: PipelineConfig, wf: WalkForwardConfig) -> str:
    """What a --seeds walk-forward computes: each seed's walk-forward (its own hash, as if run alone)."""
    return config_hash({"seeds": [walk_forward_hash(seed_config(cfg, s, cfg.output), wf) for s in wf.seeds]})


def _claim(store, whash: str, force: bool) -> None:
    """Refuse an output whose walk_forward.json was written by another walk-forward (unless --force)."""
    previous = _read_json(store, WALK_FORWARD_KEY)
    if previous is not None and previous.get("config_hash") != whash and not force:
        raise InputError(f"{store.url(WALK_FORWARD_KEY)} belongs to a walk-forward with another config, fold "
                         f"layout or seeds (hash {previous.get('config_hash')}, this one {whash}); use another "
                         "--output, or --force to discard its folds and start over")


def run_walk_forward_seeds(cfg: PipelineConfig, wf: WalkForwardConfig, *, force: bool = False) -> dict:
    """`--seeds`: the whole walk-forward once per seed, in <output>/seed_<s>/ (each resumable and adoptable on
    its own: a walk-forward run alone with --seed s and --output <output>/seed_<s> is the same), then the
    fold-seeds combined (controller.backtest.combine_seeds) in <output>/walk_forward.json."""
    from controller.stores import open_store

    store = open_store(cfg.output)
    whash = seeds_hash(cfg, wf)
    _claim(store, whash, force)
    report = {"complete": False, "config_hash": whash, "seeds": list(wf.seeds), "settings": to_dict(wf),
              "output": store.root_url, "outputs": {}, "per_seed": {}, "combined": None}
    reports = {}
    for seed in wf.seeds:
        scfg = seed_config(cfg, seed, store.url(seed_prefix(seed)))
        log.info("seed_started", seed=seed, output=scfg.output)
        reports[seed] = run_walk_forward(scfg, replace(wf, seeds=[]), force=force)
        report["outputs"][str(seed)] = reports[seed]["output"]
        report["per_seed"][str(seed)] = reports[seed]["aggregate"]
        report["combined"] = combine_seeds({s: r["folds"] for s, r in reports.items()})
        _write_json(store, WALK_FORWARD_KEY, report)
    report["complete"] = True
    _write_json(store, WALK_FORWARD_KEY, report)
    report["reports"] = reports  # for the CLI's tables; not written (each seed's walk_forward.json has it)
    return report


def run_walk_forward(cfg: PipelineConfig, wf: WalkForwardConfig, *, force: bool = False) -> dict:
    """Run (or resume) every fold; return walk_forward.json's content."""
    from controller.stores import open_store

    d = cfg.train.data
    folds = plan_folds(d.start, d.end, wf, val_days=d.val_days)
    store = open_store(cfg.output)
    whash = walk_forward_hash(cfg, wf)
    _claim(store, whash, force)
    report = {
        "complete": False, "config_hash": whash, "pipeline_config_hash": pipeline_hash(cfg),
        "settings": fold_layout(wf), "data": {"start": d.start, "end": d.end, "val_days": d.val_days},
        "output": store.root_url, "folds": [], "aggregate": None,
    }
    for fold in folds:
        row = _run_fold(cfg, fold, store, force=force)
        report["folds"].append(row)
        report["aggregate"] = aggregate(report["folds"])
        _write_json(store, WALK_FORWARD_KEY, report)
    report["complete"] = True
    _write_json(store, WALK_FORWARD_KEY, report)
    log.info("walk_forward_complete", folds=len(folds), output=store.root_url,
             mean_return=report["aggregate"]["agent"]["mean_return"])
    return report


def _run_fold(cfg: PipelineConfig, fold: Fold, store, *, force: bool) -> dict:
    from controller.run import run_pipeline

    k = fold.index
    key = f"{fold_prefix(k)}/{TEST_RESULT}"
    fcfg = fold_config(cfg, fold, store.url(fold_prefix(k)))
    fhash = pipeline_hash(fcfg)
    done = _read_json(store, key)
    if done is not None and done.get("config_hash") == fhash and done.get("window") == fold.as_dict():
        log.info("fold_adopted", fold=k, test_start=fold.test_start, test_end=fold.test_end)
        if "candidates" not in done["row"]:  # tested before the candidates were: test them now, once
            summary = _read_json(store, f"{fold_prefix(k)}/{SUMMARY_KEY}")
            if summary is not None and summary.get("candidates"):
                done["candidates"] = evaluate_candidates(summary, fcfg, fold, store, fold_prefix(k))
                done["row"] = fold_row(fold, done["evaluation"], done["candidates"])
                _write_json(store, key, done)
        return done["row"]
    what = f"fold {k} (train {fold.train_start} .. {fold.train_end}, test {fold.test_start} .. {fold.test_end})"
    log.info("fold_started", fold=k, train_start=fold.train_start, train_end=fold.train_end,
             test_start=fold.test_start, test_end=fold.test_end, output=fcfg.output)
    t0 = time.perf_counter()
    try:
        summary = run_pipeline(fcfg, force=force)
    except LeaseHeld:  # another writer on the fold's output: exit 2 naming it
        raise
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from exc
    except NexlifyError as exc:
        raise PermanentError(f"{what}: its pipeline failed: {exc}") from exc
    trained_to = summary["data"]["validation"]["end"]
    if parse_utc_ms(trained_to) > parse_utc_ms(fold.test_start):  # the rule, checked on what really ran
        raise PermanentError(f"{what}: its pipeline's data ends at {trained_to}, after the test window starts")
    try:
        evaluation = evaluate_final_model(summary["final_model_url"], fcfg, fold)
    except NexlifyError as exc:
        raise PermanentError(f"{what}: testing its final model {summary['final_model_url']} failed: {exc}") from exc
    candidates = evaluate_candidates(summary, fcfg, fold, store, fold_prefix(k))
    row = fold_row(fold, evaluation, candidates)
    _write_json(store, key, {
        "fold": k, "config_hash": fhash, "window": fold.as_dict(),
        "pipeline": {k2: summary.get(k2) for k2 in ("pipeline_id", "stop_reason", "final_best_score",
                                                    "final_model_path", "final_model_url")}
        | {"train": summary["data"]["train"], "validation": summary["data"]["validation"]},
        "evaluation": evaluation, "candidates": candidates, "row": row,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    log.info("fold_finished", fold=k, agent_return=round(row["agent"]["return"], 3),
             agent_sharpe=round(row["agent"]["sharpe"], 3), seconds=round(time.perf_counter() - t0, 1))
    return row


def evaluate_final_model(model_url: str, cfg: PipelineConfig, fold: Fold) -> dict:
    """The fold's final model, greedy on its test window, beside the baselines."""
    from nexlify.evaluate_cmd import evaluate_checkpoint

    d = cfg.train.data
    with _local_copies([model_url]) as (path,):
        result = evaluate_checkpoint(path, pairs=d.pairs, exchange=d.exchange, data_dir=d.data_dir,
                                     start=fold.test_start, end=fold.test_end, device=cfg.train.device)
    window = result["window"]
    if parse_utc_ms(window["start"]) != parse_utc_ms(fold.test_start) or \
            parse_utc_ms(window["end"]) != parse_utc_ms(fold.test_end):
        raise PermanentError(f"the candles cover {window['start']} .. {window['end']} of the test window "
                             f"{fold.test_start} .. {fold.test_end}; accepted: data up to --end {d.end}")
    result["model"] = model_url
    return result


def evaluate_candidates(summary: dict, cfg: PipelineConfig, fold: Fold, store, prefix: str) -> list[dict]:
    """Every model the fold's pipeline tried (the summary's candidates: initial runs, then iterations), greedy
    alone on the fold's test window, in the summary's order: {"source", "val_score", "selected", "model",
    "test_return", "test_sharpe" (in excess of lending), "trades"}. The same numbers `nexlify evaluate`
    gives each model on that window."""
    from nexlify.evaluate_cmd import evaluate_models

    keys = candidate_models(summary)
    urls = [store.url(f"{prefix}/{keys[c['source']]}") for c in summary["candidates"]]
    with _local_copies(urls) as paths:
        tested = evaluate_models(list(paths), start=fold.test_start, end=fold.test_end,
                                 data_dir=cfg.train.data.data_dir, device=cfg.train.device)
    return [{"source": c["source"], "val_score": c["val_score"], "selected": c["selected"], "model": url,
             "test_return": t["agent"]["avg_return"],
             "test_sharpe": t["agent"].get("avg_sharpe_vs_lending", t["agent"]["avg_sharpe"]),
             "test_excess_sharpe": (t["agent"].get("excess_return_moments") or {}).get("sharpe"),
             "trades": t["agent"]["total_trades"]}
            for c, url, t in zip(summary["candidates"], urls, tested)]


def candidate_models(summary: dict) -> dict[str, str]:
    """A pipeline summary's candidates by source ("init-1", "retrain-3") -> the model file, relative to its output."""
    keys = {initial_run_key(e["run_id"]): e["model_path"] for e in summary["initial_runs"]}
    keys |= {retrain_run_key(e["iteration"]): e["model_path"] for e in summary["retraining_iterations"]}
    return keys


@contextmanager
def _local_copies(urls: list[str]):
    """Local paths of the models at `urls`: folders as they are, s3:// objects downloaded for the block."""
    from controller.stores import download_url, is_s3_url

    with tempfile.TemporaryDirectory(prefix="nexlify-fold-") as tmp:
        paths = []
        for i, url in enumerate(urls):
            if is_s3_url(url):
                local = os.path.join(tmp, f"{i}-{os.path.basename(url)}")
                download_url(url, local)
                url = local
            paths.append(url)
        yield tuple(paths)


def _read_json(store, key: str) -> dict | None:
    from controller.stores import StoreKeyMissing

    try:
        return json.loads(store.read_bytes(key))
    except StoreKeyMissing:
        return None


def _write_json(store, key: str, data: dict) -> None:
    store.write_bytes(key, json.dumps(data, indent=2).encode())


# ----------------------------------------------------------------------------------------------- CLI


def add_parser(sub, add_pipeline_args) -> None:
    """`nexlify backtest --walk-forward`: the pipeline's flags (add_pipeline_args) plus the fold layout."""
    bt = sub.add_parser("backtest", help="walk-forward: each fold trains the pipeline on the past only and "
                                         "tests on the window after it")
    bt.add_argument("--walk-forward", action="store_true",
                    help="train and test fold by fold (the only backtest mode; required)")
    add_pipeline_args(bt)
    add_flags(bt, WalkForwardConfig)
    bt.set_defaults(handler=cmd_backtest)


def resolve_walk_forward(args) -> WalkForwardConfig:
    from nexlify.cli import build_config

    return build_config(WalkForwardConfig, None, None, flags_to_mapping(args, WalkForwardConfig))


def check_inputs(cfg: PipelineConfig, wf: WalkForwardConfig) -> list[Fold]:
    """Before any fold runs: the fold dates fit the data window, the candles reach the last test window's
    end, and the first fold has enough training data for its validation split (InputError, one line)."""
    from nexlify.data.prepare import prepare_data

    d = cfg.train.data
    folds = plan_folds(d.start, d.end, wf, val_days=d.val_days)
    market, _ = prepare_data(cfg.train)
    close = int(market.timestamps[-1]) + market.timeframe_ms
    if close < parse_utc_ms(d.end, "--end"):
        raise InputError(f"the candles end at {market.end_iso}, before --end {d.end} where the last fold's test "
                         "window ends; accepted: an --end within the data")
    try:
        prepare_data(fold_config(cfg, folds[0], cfg.output).train)
    except InputError as exc:
        raise InputError(f"fold 1 (train {folds[0].train_start} .. {folds[0].train_end}): {exc}") from None
    return folds


def cmd_backtest(args) -> int:
    from controller.cli import _raise_terminated, resolve_pipeline_config
    from controller.preflight import preflight, show_table
    from controller.stores import open_store

    if not args.walk_forward:
        raise InputError("backtest needs --walk-forward; accepted: nexlify backtest --walk-forward [flags]")
    cfg = resolve_pipeline_config(args)
    wf = resolve_walk_forward(args)
    plan_folds(cfg.train.data.start, cfg.train.data.end, wf, val_days=cfg.train.data.val_days)
    ok, rows, first_error = preflight(cfg)
    show_table(rows)
    if not ok:  # the table, then the one line (an `error:` line, or the `failed` event in JSON mode)
        raise InputError(f"preflight failed: {first_error}")
    check_inputs(cfg, wf)
    signal.signal(signal.SIGTERM, _raise_terminated)  # stop like Ctrl-C: workers save, training.log is published
    with acquire_output_lease(open_store(cfg.output), command="backtest"):  # one writer per output
        return _backtest(cfg, wf, args.force)


def _backtest(cfg: PipelineConfig, wf: WalkForwardConfig, force: bool) -> int:
    from controller.backtest import render_seeds, render_table

    if wf.seeds:
        combined = run_walk_forward_seeds(cfg, wf, force=force)
        for seed, report in combined["reports"].items():
            print(f"seed {seed}:")
            print(render_table(report["folds"], report["aggregate"]))
            print()
        print(render_seeds(combined["combined"]))
        root = combined["output"].rstrip("/")
        print(f"walk-forward tables: {root}/{WALK_FORWARD_KEY} (the seeds combined) and {root}/seed_<s>/"
              f"{WALK_FORWARD_KEY} (each seed's)")
        return 0
    report = run_walk_forward(cfg, wf, force=force)
    print(render_table(report["folds"], report["aggregate"]))
    print(f"walk-forward table: {report['output'].rstrip('/')}/{WALK_FORWARD_KEY}")
    return 0
