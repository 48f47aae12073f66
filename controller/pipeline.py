"""The pipeline as an explicit state machine whose state lives in the output store.

    PLANNED -> INITIAL_RUNNING -> SELECTED -> RETRAINING(k) -> DONE(stop_reason)

After every transition `pipeline_state.json` is written (atomically); its records are controller.state's. On start the state is read back:
finished runs are taken from their result.json, missing ones are (re)started (a worker continues from
its own resume checkpoint), and every decision is a pure function of recorded scores (controller.rules),
so a pipeline killed at any moment and started again ends with the summary an uninterrupted one writes.
The summary is written last, so a reader never sees a summary pointing at files that are not there.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import structlog

import nexlify
from controller import rules, selection
from controller.config import PipelineConfig, pipeline_hash, pipeline_id
from controller.executors.base import Executor, RunSpec
from controller.state import (
    Best, DataSnapshot, Failure, InitialRun, Iteration, PipelineState, initial_run_key, retrain_run_key,
)
from controller.stores import StoreKeyMissing
from controller.stores.base import Store
from nexlify.configtools import to_dict
from nexlify.data.candles import candle_filename, read_candles, write_candles
from nexlify.data.timeframes import iso_utc
from nexlify.errors import InputError, PermanentError
from nexlify.data.prepare import prepare_data

log = structlog.get_logger("nexlify.pipeline")

STATE_KEY = "pipeline_state.json"
SUMMARY_KEY = "complete_training_summary.json"
REPORT_KEY = "report.html"  # written after the summary (controller.report)
CONFIG_KEY = "pipeline_config.json"
DATA_PREFIX = "data"
LOG_KEY = "training.log"  # controller.run publishes it
REPLACED_PREFIX = ".replaced-"  # --force moves another pipeline's results here until a new model exists
BASELINES_PREFIX = "baselines"  # the runs' stored baselines (controller.worker.SnapshotBaselines)
LAYOUT_PREFIXES = (f"{DATA_PREFIX}/", f"{BASELINES_PREFIX}/", "initial_runs/", "retraining/")  # what a pipeline writes besides its files


class Pipeline:
    def __init__(self, cfg: PipelineConfig, store: Store, executor: Executor, *, force: bool = False) -> None:
        self.cfg = cfg
        self.store = store
        self.executor = executor
        self.force = force
        self.hash = pipeline_hash(cfg)
        self.pipeline_id = pipeline_id(cfg, store.root_url)
        self.lease = None  # controller.lease: checked at every transition (a lost S3 lease stops the pipeline)
        self.state = PipelineState()
        self._outputs: dict[str, str] = {}  # run key -> store key of its folder
        self.on_transition = None  # called after every state transition (publishes training.log)
        self._replaced: str | None = None  # where --force moved another pipeline's results (.replaced-<time>)

    # ------------------------------------------------------------------------------------ state i/o

    def _write_json(self, key: str, data: dict) -> None:
        self.store.write_bytes(key, json.dumps(data, indent=2).encode())

    def _read_json(self, key: str) -> dict | None:
        """The JSON object at key, None if absent; DamagedFile (naming the file) if it cannot be parsed."""
        try:
            blob = self.store.read_bytes(key)
        except StoreKeyMissing:
            return None
        try:
            data = json.loads(blob)
        except (ValueError, UnicodeDecodeError) as exc:
            what = "empty" if not blob.strip() else f"not valid JSON ({str(exc).splitlines()[0]})"
            raise DamagedFile(self.store.url(key), what) from None
        if not isinstance(data, dict):
            raise DamagedFile(self.store.url(key), f"a JSON {type(data).__name__}, not an object")
        return data

    def _read_state(self) -> tuple[dict | None, DamagedFile | None]:
        try:
            return self._read_json(STATE_KEY), None
        except DamagedFile as damaged:
            return None, damaged

    def _write_state(self) -> None:
        self._write_json(STATE_KEY, self.state.to_dict())

    def _transition(self, phase: str, **fields) -> None:
        """Enter `phase`, setting the given PipelineState fields, and write the state."""
        if self.lease is not None:
            self.lease.check()
        self._drop_replaced()
        self.state.phase = phase
        for name, value in fields.items():
            if not hasattr(self.state, name):
                raise AttributeError(f"PipelineState has no field {name!r}")
            setattr(self.state, name, value)
        self.state.updated_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write_state()
        log.info("phase_changed", pipeline=self.pipeline_id, phase=phase,
                 **{k: v for k, v in fields.items() if isinstance(v, (int, float, str)) or v is None})
        if self.on_transition is not None:
            self.on_transition()

    def check_output(self) -> bool:
        """Refuse an output that holds another config's pipeline (InputError, nothing written), unless
        --force. True when --force will discard that other pipeline's files."""
        existing, damaged = self._read_state()
        if damaged is not None:
            if not self.force:
                raise PermanentError(f"{damaged}; nothing was changed: use --force to start this output over "
                                     "(its runs, data and summary are discarded), or another --output")
            return True
        if existing is None or existing.get("config_hash") == self.hash:
            return False
        if not self.force:
            raise InputError(
                f"{self.store.url(STATE_KEY)} belongs to a pipeline with another config "
                f"(hash {existing.get('config_hash')}, this one {self.hash}); use another --output, "
                "or --force to discard that pipeline's files there and start over")
        return True

    def _discard_previous(self, previous_hash: str | None) -> None:
        """--force on another config's output: its summary, report, runs, data, config and log are moved
        aside to `.replaced-<time>/` (nothing is deleted), the state last; they are deleted only once the new
        pipeline has written its first model (`_drop_replaced`), so a new config that fails in its workers
        costs nothing of the old results.

        Moving the state last keeps a crash in the middle safe: the next start still finds the other
        config's state and asks for --force again, so no run of the old config is ever adopted."""
        aside = f"{REPLACED_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        log.warning("pipeline_forced", pipeline=self.pipeline_id, previous_hash=previous_hash,
                    moved_aside=self.store.url(aside),
                    until="the new pipeline has written its first model; then it is deleted")
        keys = [SUMMARY_KEY, REPORT_KEY, LOG_KEY]
        keys += [k for prefix in LAYOUT_PREFIXES for k in self.store.list(prefix)]
        for key in [*keys, CONFIG_KEY, STATE_KEY]:
            if self.store.exists(key):
                self.store.move(key, f"{aside}/{key}")
        self._replaced = aside

    def _drop_replaced(self) -> None:
        """The results a --force set aside, deleted once this pipeline has a model of its own (a start that
        died while moving them leaves them there: they go at the same point of the next start)."""
        aside = self.store.list(REPLACED_PREFIX)
        if not aside or not any(k.endswith(".pt") for k in self.store.list("initial_runs/")):
            return
        for key in aside:
            self.store.delete(key)
        root = getattr(self.store, "root", None)  # a folder: its emptied sub-folders too
        for folder in {k.split("/", 1)[0] for k in aside} if root else ():
            shutil.rmtree(Path(root) / folder, ignore_errors=True)
        self.state.extra.pop("replaced", None)
        log.info("replaced_results_deleted", pipeline=self.pipeline_id,
                 folders=sorted({self.store.url(k.split("/", 1)[0]) for k in aside}))

    def load_or_plan(self) -> None:
        """Adopt the state in the store, or plan a new pipeline. Refuses another config's output."""
        existing, _ = self._read_state()
        if self.check_output():
            self._discard_previous(existing.get("config_hash") if existing else "unreadable state")
        elif existing is not None:
            self.state = PipelineState.from_dict(existing)
            self._publish_config()
            log.info("pipeline_resumed", pipeline=self.pipeline_id, phase=self.state.phase)
            return
        self.state = PipelineState(pipeline_id=self.pipeline_id, config_hash=self.hash,
                                   started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if self._replaced:  # named in the state until deleted: a crash before then still deletes it later
            self.state.extra["replaced"] = self._replaced
        self._publish_config()
        self._transition("PLANNED")

    def _publish_config(self) -> None:
        """Write the config the workers read. A resumed pipeline has the same hash, but its runtime-only
        settings (device, threads, ...) may differ from the first start's: the workers must use this
        start's, so a pipeline begun on a GPU can be finished with --device cpu. Unchanged: not rewritten."""
        blob = json.dumps(to_dict(self.cfg), indent=2).encode()
        try:
            if self.store.read_bytes(CONFIG_KEY) == blob:
                return
        except StoreKeyMissing:
            pass
        self.store.write_bytes(CONFIG_KEY, blob)

    # ------------------------------------------------------------------------------------------ data

    def snapshot_data(self) -> None:
        """Resolve the candles once, write them into the output, record their sha256."""
        if self.state.data is not None:
            for entry in self.state.data.files:
                blob = self.store.read_bytes(entry["key"])
                if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                    raise PermanentError(f"data snapshot {self.store.url(entry['key'])} changed since the pipeline "
                                         "started (sha256 differs); use a new --output")
            return
        train_cfg = self.cfg.train
        market, windows = prepare_data(train_cfg)
        d = train_cfg.data
        files = []
        for pair in market.pairs:
            source = market.sources[pair]["file"]
            frame = read_candles(source)
            ts0, ts1 = int(market.timestamps[0]), int(market.timestamps[-1])
            frame = frame[(frame["timestamp"] >= ts0) & (frame["timestamp"] <= ts1)]
            blob = _gzip_csv(frame)
            key = f"{DATA_PREFIX}/{candle_filename(d.exchange, pair, d.timeframe)}"
            self.store.write_bytes(key, blob)
            files.append({"pair": pair, "key": key, "rows": int(len(frame)), "sha256": hashlib.sha256(blob).hexdigest(),
                          "source": source, "gaps": market.gaps[pair].as_dict()})
        files += self._snapshot_second_venue(market)
        ts = market.timestamps
        self.state.data = DataSnapshot(
            exchange=d.exchange, pairs=list(market.pairs), timeframe=d.timeframe,
            start=market.start_iso, end=market.end_iso, bars=market.n_bars,
            train=_window(ts, windows.train, market.timeframe_ms),
            validation=_window(ts, windows.val, market.timeframe_ms),
            test=_window(ts, windows.test, market.timeframe_ms) if windows.test else None, files=files,
            extra=window_clipped(d.start, d.end, market.start_iso, market.end_iso),
        )
        if self.state.data.extra:  # never silent: the window typed is not the window used
            log.warning("window_clipped", pipeline=self.pipeline_id, message=self.state.data.extra["window_note"])
        self._write_state()
        log.info("data_snapshot_written", pipeline=self.pipeline_id, bars=market.n_bars, pairs=market.pairs,
                 train=self.state.data.train, validation=self.state.data.validation)

    def _snapshot_second_venue(self, market) -> list[dict]:
        """With arbitrage on, the second venue's candles over the same bars (data/coinbase_BTC-USD_1h.csv.gz);
        a pair the second venue has no file for is left out (the runs mask arbitrage there)."""
        venue = market.second_venue
        if venue is None:
            return []
        ts0, ts1 = int(market.timestamps[0]), int(market.timestamps[-1])
        files = []
        for pair, symbol in zip(market.pairs, venue.pairs):
            if pair not in venue.sources:
                continue
            source = venue.sources[pair]["file"]
            frame = read_candles(source)
            frame = frame[(frame["timestamp"] >= ts0) & (frame["timestamp"] <= ts1)]
            if frame.empty:
                continue
            blob = _gzip_csv(frame)
            key = f"{DATA_PREFIX}/{candle_filename(venue.exchange, symbol, market.timeframe)}"
            self.store.write_bytes(key, blob)
            files.append({"pair": symbol, "key": key, "rows": int(len(frame)), "sha256": hashlib.sha256(blob).hexdigest(),
                          "source": source, "venue": "second", "for_pair": pair})
        return files

    # ------------------------------------------------------------------------------------------ runs

    def _spec(self, key: str, phase: str, seed: int, episodes: int, output: str, init_from: str | None) -> RunSpec:
        self._outputs[key] = output
        return RunSpec(run_key=key, phase=phase, seed=seed, episodes=episodes,
                       config_url=self.store.url(CONFIG_KEY), data_url=self.store.url(DATA_PREFIX),
                       output_url=self.store.url(output), init_from=init_from,
                       checkpoint_every=self.cfg.checkpoint_every)

    def _run_all(self, specs: list[RunSpec]) -> dict[str, dict]:
        """Run the specs whose result.json is missing; return every spec's result."""
        results: dict[str, dict] = {}
        todo = []
        for spec in specs:
            result = self._result(spec)
            if result is not None:
                results[spec.run_key] = result
                log.info("run_adopted", pipeline=self.pipeline_id, run=spec.run_key, val_score=result["val_score"])
            else:
                todo.append(spec)
        if todo:
            handles = [self.executor.start(spec) for spec in todo]
            outcomes = self.executor.wait(handles)
            failed = []
            for spec, outcome in zip(todo, outcomes):
                result = self._result(spec) if outcome.succeeded else None
                if result is None:
                    reason = outcome.reason or "result.json is missing after the run reported success"
                    recorded = self._read_json(f"{self._outputs[spec.run_key]}/result.json")
                    if recorded is not None and recorded.get("status") == "failed" and recorded.get("reason"):
                        reason = str(recorded["reason"])  # the worker's own account (e.g. a non-finite reward)
                        reason = reason.removeprefix(f"run {spec.run_key}: ")  # the line names the run once
                    elif recorded is not None and recorded.get("status") == "succeeded":
                        reason = f"non-finite val_score {recorded.get('val_score')!r} in result.json: not selectable"
                    failed.append(f"{spec.run_key}: {reason}")
                    if self.state.failures is None:
                        self.state.failures = []
                    self.state.failures.append(Failure(run=spec.run_key, reason=reason, details=outcome.details))
                    log.error("run_failed", pipeline=self.pipeline_id, run=spec.run_key, reason=reason,
                              **{k: v for k, v in outcome.details.items() if k != "log_tail"})
                    continue
                results[spec.run_key] = result
            if failed:
                self._write_state()
                raise PermanentError("runs failed: " + "; ".join(failed))
        return results

    def _result(self, spec: RunSpec) -> dict | None:
        """The run's result if it succeeded with a finite score: only such a run can be selected. Its
        model is checked against the sha256 the worker recorded (a mismatch is named, never trained on);
        the digests of both go into the state (`digests`), which checks them on every later start."""
        key = f"{self._outputs[spec.run_key]}/result.json"
        result = self._read_json(key)
        if result is None or result.get("status") != "succeeded" or not _finite(result.get("val_score")):
            return None
        model = f"{self._outputs[spec.run_key]}/{result['model_file']}"
        want = result.get("model_sha256")
        if want is not None:
            self._check_digest(model, want, "its run's result.json")
        result["digests"] = {"result_sha256": hashlib.sha256(self.store.read_bytes(key)).hexdigest(),
                             "model_sha256": want}
        return result

    def _check_digest(self, key: str, want: str, recorded_in: str) -> None:
        """PermanentError naming the file when it is missing or its sha256 is not the recorded one."""
        try:
            blob = self.store.read_bytes(key)
        except StoreKeyMissing:
            raise PermanentError(f"{self.store.url(key)} is missing (recorded in {recorded_in}); restore it, or "
                                 "use --force to train this output again") from None
        got = hashlib.sha256(blob).hexdigest()
        if got != want:
            what = "empty" if not blob else f"{len(blob)} bytes"
            raise PermanentError(f"{self.store.url(key)} is damaged: its sha256 {got[:16]} ({what}) is not the "
                                 f"{want[:16]} recorded in {recorded_in}; restore it, or use --force to train "
                                 "this output again")

    def verify_recorded(self) -> list[str]:
        """Every file the state names, checked against the sha256 recorded when it was written (cheap:
        digests, no weights loaded): each run's result.json and model, and the data snapshot. Returns one
        line per problem (missing or changed)."""
        st = self.state
        files: list[tuple[str, str | None, str]] = []
        for k in sorted(st.initial_runs, key=int):
            e = st.initial_runs[k]
            folder = f"initial_runs/run_{e.run_id}"
            files += [(f"{folder}/result.json", e.result_sha256, "the state"), (e.model_key, e.model_sha256, "the state")]
        for e in st.retraining:
            folder = f"retraining/iteration_{e.iteration}"
            files += [(f"{folder}/result.json", e.result_sha256, "the state"),
                      (e.model_path, e.model_sha256, "the state")]
        for f in (st.data.files if st.data is not None else []):
            files.append((f["key"], f.get("sha256"), "the state's data snapshot"))
        problems = []
        for key, want, where in files:
            try:
                if want is None:
                    if not self.store.exists(key):
                        problems.append(f"{self.store.url(key)} is missing")
                else:
                    self._check_digest(key, want, where)
            except PermanentError as exc:
                problems.append(str(exc).split("; restore it")[0])
        return problems

    # ---------------------------------------------------------------------------------------- phases

    def run(self) -> dict:
        t0 = time.perf_counter()
        self.load_or_plan()
        if self.state.phase == "DONE":
            try:
                done = self._read_json(SUMMARY_KEY)
            except DamagedFile as damaged:
                log.warning("summary_rewritten", reason=str(damaged))
                done = None
            want = self.state.extra.get("summary_sha256")
            if done is not None and want and hashlib.sha256(self.store.read_bytes(SUMMARY_KEY)).hexdigest() != want:
                log.warning("summary_rewritten", reason=f"{self.store.url(SUMMARY_KEY)} is not the summary this "
                            "pipeline wrote (sha256 differs); it is written again from the state")
                done = None
            missing = self.verify_recorded()  # "<url> is missing", "<url> is damaged: ..."
            for url in self._missing_files(done) if done is not None else []:
                if not any(p.startswith(f"{url} ") for p in missing):
                    missing.append(f"{url} is missing")
            if done is not None and not missing:
                log.info("pipeline_already_done", pipeline=self.pipeline_id, final_best_score=done["final_best_score"])
                if not self.store.exists(REPORT_KEY):  # the last step, resumed like the others
                    self._write_report()
                return done
            if missing and not self.force:
                raise PermanentError(
                    f"the pipeline at {self.store.root_url} finished, but {len(missing)} file(s) its summary names "
                    f"are missing or damaged: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; restore "
                    "them, or use --force to train this output again")
            if missing:
                self._discard_previous(self.hash)
                self.load_or_plan()
        elif self.state.phase not in (None, "PLANNED"):
            damaged = self.verify_recorded()
            if damaged and not self.force:
                raise PermanentError(
                    f"the pipeline at {self.store.root_url} cannot resume: {len(damaged)} file(s) it recorded are "
                    f"missing or damaged: {', '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''}; restore "
                    "them, or use --force to train this output again")
            if damaged:
                self._discard_previous(self.hash)
                self.load_or_plan()
        self.snapshot_data()
        self._initial_phase()
        self._retraining_phase()
        summary = self._summary()
        self._transition("DONE", stop_reason=self.state.stop_reason)
        self._write_json(SUMMARY_KEY, summary)
        self.state.extra["summary_sha256"] = hashlib.sha256(self.store.read_bytes(SUMMARY_KEY)).hexdigest()
        self._write_state()
        self._write_report()
        log.info("pipeline_complete", pipeline=self.pipeline_id, stop_reason=self.state.stop_reason,
                 best_initial_score=summary["best_initial_score"], final_best_score=summary["final_best_score"],
                 total_improvement_pct=summary["total_improvement_pct"], final_model=summary["final_model_path"],
                 winner=summary["selection"]["selected"], val_return=summary["selection"]["val_return"],
                 beats_cash_plus_lending=summary["selection"]["beats_cash_plus_lending"],
                 deflated_sharpe=summary["selection"]["deflated_sharpe"].get("value"),
                 seconds=round(time.perf_counter() - t0, 1))
        return summary

    def _missing_files(self, summary: dict) -> list[str]:
        """A finished pipeline answers "done" only while the files its summary names are there."""
        keys = [summary.get("final_model_key") or summary.get("final_model_path")]
        keys += [e["model_path"] for e in summary.get("initial_runs", []) + summary.get("retraining_iterations", [])]
        keys += [f["key"] for f in (summary.get("data") or {}).get("files", [])]
        return [self.store.url(k) for k in dict.fromkeys(keys) if k and not self.store.exists(k)]

    def _write_report(self) -> None:
        """report.html after the summary. A report that cannot be drawn costs the page, never the trained
        models: it is logged as an error and `nexlify report OUTPUT` draws it again."""
        from controller.report import write_report

        t0 = time.perf_counter()
        try:
            # the local executor's warm launcher (its imports done) forks the final model's evaluation
            url = write_report(self.store, launcher=getattr(self.executor, "launcher", None))
        except Exception as exc:  # noqa: BLE001 - the summary is written; say what failed and go on
            log.error("report_failed", pipeline=self.pipeline_id, error=f"{type(exc).__name__}: {exc}")
            return
        log.info("report_written", pipeline=self.pipeline_id, url=url, seconds=round(time.perf_counter() - t0, 1))

    def _initial_phase(self) -> None:
        cfg = self.cfg
        if self.state.phase not in ("PLANNED", "INITIAL_RUNNING"):
            return
        self._transition("INITIAL_RUNNING", runs=cfg.initial_runs)
        t0 = time.perf_counter()
        specs = [self._spec(initial_run_key(i), "initial", rules.initial_seed(cfg.seed, i), cfg.initial_episodes,
                            f"initial_runs/run_{i}", None) for i in range(1, cfg.initial_runs + 1)]
        results = self._run_all(specs)
        runs = self.state.initial_runs
        for i, spec in enumerate(specs, start=1):
            runs[str(i)] = _run_entry(i, spec, results[spec.run_key], f"initial_runs/run_{i}")
        best_id = rules.select_best([(int(k), v.val_score) for k, v in runs.items()],
                                    {int(k): _trails(v.val_metrics, v.val_baselines) for k, v in runs.items()})
        for i, spec in enumerate(specs, start=1):
            e = runs[str(i)]
            m = e.val_metrics
            log.info("run_finished", pipeline=self.pipeline_id, phase="initial", run=spec.run_key, seed=spec.seed,
                     val_return=round(m["avg_return"], 3), val_sharpe=round(m["avg_sharpe"], 3),
                     val_score=round(e.val_score, 4), train_return=round(e.train_return, 3),
                     decision="selected" if i == best_id else "not selected")
        best = runs[str(best_id)]
        timings = self.state.timings
        timings["initial_s"] = timings.get("initial_s", 0.0) + round(time.perf_counter() - t0, 3)
        self._transition("SELECTED", best=Best(score=best.val_score, model_key=best.model_key,
                                               source=initial_run_key(best_id)),
                         best_initial_run=best_id, best_initial_score=best.val_score, patience_count=0)

    def _retraining_phase(self) -> None:
        cfg = self.cfg
        st = self.state
        if st.phase == "SELECTED" and cfg.max_iterations == 0:
            st.stop_reason = rules.MAX_ITERATIONS
            return
        if st.phase not in ("SELECTED", "RETRAINING"):
            return
        t0 = time.perf_counter()
        while st.stop_reason is None:
            k = len(st.retraining) + 1
            best = st.best
            seed = rules.retrain_seed(cfg.seed, cfg.initial_runs, k)
            output = f"retraining/iteration_{k}"
            # the Q-learner continues from the best model; the forecast learner fits afresh from the iteration's
            # seed (continuing from a model refitted on its holdout would make its holdout gate in-sample)
            init_from = self.store.url(best.model_key) if cfg.train.agent.algorithm == "dqn" else None
            spec = self._spec(retrain_run_key(k), "retrain", seed, cfg.retrain_episodes, output, init_from)
            self._transition("RETRAINING", iteration=k)
            result = self._run_all([spec])[spec.run_key]
            score = result["val_score"]
            decision = rules.decide(score, best.score, st.patience_count, k,
                                    threshold=cfg.improvement_threshold, patience=cfg.patience,
                                    max_iterations=cfg.max_iterations,
                                    trails=_trails(_avg_metrics(result["val_metrics"]), result.get("val_baselines")),
                                    best_trails=self._best_trails())
            entry = Iteration(
                iteration=k, seed=seed, score=score, improvement_pct=decision.improvement_pct,
                metrics=_avg_metrics(result["val_metrics"]), per_pair=result["val_metrics"].get("per_pair"),
                model_path=f"{output}/{result['model_file']}", train_return=result["train_return"],
                new_best=decision.new_best, patience_count=decision.patience_count,
                continued_from=best.model_key if init_from else None, test_metrics=result.get("test_metrics"),
                timings=result.get("timings"), device=result.get("device"), versions=result.get("versions"),
                **_honesty_fields(result), **result.get("digests", {}),
            )
            st.retraining.append(entry)
            if decision.new_best:
                st.best = Best(score=score, model_key=entry.model_path, source=spec.run_key)
            st.patience_count = decision.patience_count
            st.stop_reason = decision.stop_reason
            self._write_state()
            m = entry.metrics
            log.info("iteration_finished", pipeline=self.pipeline_id, iteration=k, seed=seed,
                     val_return=round(m["avg_return"], 3), val_sharpe=round(m["avg_sharpe"], 3), score=round(score, 4),
                     improvement_pct=round(decision.improvement_pct, 3), new_best=decision.new_best,
                     patience=decision.patience_count, decision=rules.describe(decision, cfg.patience),
                     stop_reason=decision.stop_reason)
        st.timings["retraining_s"] = st.timings.get("retraining_s", 0.0) + round(time.perf_counter() - t0, 3)

    def _best_trails(self) -> bool:
        """Whether the best model so far trails cash plus lending on validation (its recorded entry)."""
        st = self.state
        for e in st.initial_runs.values():
            if e.model_key == st.best.model_key:
                return _trails(e.val_metrics, e.val_baselines)
        for it in st.retraining:
            if it.model_path == st.best.model_key:
                return _trails(it.metrics, it.val_baselines)
        return False

    # --------------------------------------------------------------------------------------- summary

    def _summary(self) -> dict:
        st = self.state
        initial = [st.initial_runs[k] for k in sorted(st.initial_runs, key=int)]
        best_initial = st.best_initial_score
        final = st.best.score
        final_key = st.best.model_key
        final_entry: InitialRun | Iteration = next((e for e in initial if e.model_key == final_key), None) or \
            next(e for e in st.retraining if e.model_path == final_key)
        entries: list[InitialRun | Iteration] = [*initial, *st.retraining]
        devices = sorted({e.device for e in entries if e.device})
        run_versions = final_entry.versions or {}
        # every candidate's validation return and Sharpe beside its score; the selected one's honesty report
        sources = [(initial_run_key(e.run_id), e.seed, e.val_score, e.val_metrics, e.model_key) for e in initial]
        sources += [(retrain_run_key(e.iteration), e.seed, e.score, e.metrics, e.model_path) for e in st.retraining]
        candidates = [selection.candidate(src, seed, score, metrics, selected=key == final_key)
                      for src, seed, score, metrics, key in sources]
        excess = {src: e.excess_moments for (src, *_), e in zip(sources, entries)}
        report = selection.selection_report(candidates, excess, final_entry.val_baselines)
        verdict = report.pop("verdict_block")

        return {
            "pipeline_complete": True,
            "pipeline_id": self.pipeline_id,
            # the one verdict (nexlify.verdict): beats cash plus lending or not, the Sharpe in excess of
            # lending, its deflated Sharpe for the models tried, and the sentence every surface shows
            "verdict": verdict,
            "units": selection.SUMMARY_UNITS,
            "stop_reason": st.stop_reason,
            "initial_runs": [{k: getattr(e, k) for k in ("run_id", "seed", "val_score", "train_return", "val_metrics",
                                                         "model_path", "per_pair", "test_metrics", "timings",
                                                         "result_sha256", "model_sha256")}
                             for e in initial],
            "best_initial_run": st.best_initial_run,
            "retraining_iterations": [{k: getattr(e, k) for k in ("iteration", "seed", "score", "improvement_pct",
                                                                  "metrics", "model_path", "new_best", "train_return",
                                                                  "per_pair", "test_metrics", "timings",
                                                                  "result_sha256", "model_sha256")}
                                      for e in st.retraining],
            "best_initial_score": best_initial,
            "final_best_score": final,
            "total_improvement_pct": rules.improvement_pct(final, best_initial),
            # usable from where the command ran (an absolute path or an s3:// URL): `nexlify evaluate --model`
            "final_model_path": self.store.url(final_key),
            "final_model_key": final_key,  # the same file relative to the output
            "final_model_url": self.store.url(final_key),
            "final_model_sha256": final_entry.model_sha256,  # checked by `nexlify report` before the model is used
            "final_test_metrics": final_entry.test_metrics,
            "candidates": candidates,
            "selection": report,
            "final_val_baselines": final_entry.val_baselines,
            "config": to_dict(self.cfg),
            "config_hash": self.hash,
            "data": st.data.to_dict(),
            # the trainer's versions as the final model's run recorded them (the controller needs no torch)
            "versions": {"nexlify": nexlify.__version__, "python": platform.python_version(),
                         "torch": run_versions.get("torch"), "worker_nexlify": run_versions.get("nexlify"),
                         "worker_python": run_versions.get("python")},
            "device": ", ".join(devices) or None,  # what the runs used ("cpu", "cuda:0")
            "device_requested": self.cfg.train.device,
            "timings": st.timings,
            "failures": [f.to_dict() for f in st.failures or []],
        }


class DamagedFile(PermanentError):
    """A pipeline file that exists but cannot be read (truncated, empty, not JSON)."""

    def __init__(self, url: str, what: str) -> None:
        super().__init__(f"{url} is damaged: {what}")
        self.url = url


def _trails(val_metrics: dict, val_baselines: dict | None) -> bool:
    """controller.rules.trails_lending of a run's validation averages and baselines."""
    return rules.trails_lending(val_metrics.get("avg_return"), val_baselines)


def _run_entry(run_id: int, spec: RunSpec, result: dict, output: str) -> InitialRun:
    return InitialRun(
        run_id=run_id, seed=spec.seed, val_score=result["val_score"],
        train_return=result["train_return"], val_metrics=_avg_metrics(result["val_metrics"]),
        per_pair=result["val_metrics"].get("per_pair"), model_key=f"{output}/{result['model_file']}",
        model_path=f"{output}/{result['model_file']}", test_metrics=result.get("test_metrics"),
        timings=result.get("timings"), device=result.get("device"), versions=result.get("versions"),
        **_honesty_fields(result), **result.get("digests", {}),
    )


def _honesty_fields(result: dict) -> dict:
    """What selection honesty needs from a run's result.json: the per-bar return moments of its validation
    book and the baselines' averages on the same window (None from a result.json that predates them)."""
    val = result["val_metrics"]
    baselines = result.get("val_baselines")
    excess = val.get("excess_return_moments")
    return {"return_moments": val.get("return_moments"),
            "val_baselines": {name: _avg_metrics(m) for name, m in baselines.items()} if baselines else None,
            "extra": {} if excess is None else {"excess_moments": excess}}


def _avg_metrics(val: dict) -> dict:
    out = {k: val[k] for k in ("avg_return", "avg_sharpe", "avg_win_rate", "avg_drawdown", "total_trades", "score")}
    for key in ("avg_sharpe_vs_lending", "exposure", "exposure_any", "turnover", "fees_paid"):  # absent from older results
        if key in val:
            out[key] = val[key]
    if val.get("pnl_breakdown") is not None:  # PnL by source, averaged over pairs (quote currency)
        out["pnl_breakdown"] = val["pnl_breakdown"]
    return out


def window_clipped(start: str, end: str, first: str, end_of_data: str) -> dict:
    """When the data covers less than the window asked for ([start, end)), what the summary's `data` records
    beside the window used (its start and end): the window asked for and a sentence naming both; else {}."""
    from nexlify.data.timeframes import parse_utc_ms

    early = parse_utc_ms(first) > parse_utc_ms(start)
    late = parse_utc_ms(end_of_data) < parse_utc_ms(end)
    if not (early or late):
        return {}
    return {"window_requested": {"start": start, "end": end},
            "window_note": f"the window asked for, {start} .. {end}, is clipped to the candles there are: "
                           f"{first} .. {end_of_data}; the runs train and validate on the latter"}


def _window(ts, window: tuple[int, int], bar_ms: int) -> dict:
    i0, i1 = window
    return {"start": iso_utc(int(ts[i0])), "end": iso_utc(int(ts[i1 - 1]) + bar_ms), "bars": i1 - i0}


def _gzip_csv(frame) -> bytes:
    """The same format as the bundled files (gzip with mtime 0: identical bytes for identical rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snapshot.csv.gz"
        write_candles(frame, path)
        return path.read_bytes()


def _finite(value: object) -> bool:
    """A recorded score that is a finite number (json reads NaN and Infinity as floats)."""
    return isinstance(value, (int, float)) and math.isfinite(value)
