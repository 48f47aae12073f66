"""`nexlify worker train`: one training run, wherever it executes (a local process or a pod).

It reads its config, data snapshot and starting checkpoint through URLs (a folder or s3://), trains,
and writes its checkpoints and `result.json` under its output URL. It is idempotent: a run whose
result.json says succeeded is not redone, and a run with a resume checkpoint continues from it.

Exit codes: 0 done; 2 invalid input and 3 a non-finite reward, observation, loss or weight (result.json
says "failed" with the reason): the Kubernetes Job fails at once, no retry; 143 stopped by SIGTERM after
saving its resume checkpoint (preemption: a replacement pod continues from it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, fields

import structlog
import torch

import nexlify
from nexlify import checkpoint, finite
from nexlify.agent.forecast import ForecastAgent
from nexlify.config import TrainConfig
from nexlify.configtools import apply_mapping, leaf_index, load_yaml, to_dict, validate_tree
from nexlify.data.candles import candle_filename
from nexlify.data.second_venue import second_venue_pair
from nexlify.device import resolve_device
from nexlify.errors import InputError, NonFiniteError
from nexlify.logs import bar_format
from nexlify.tb import EVENTS_FILE, RunBoard
from nexlify.training import Preempted, prepare_data, train_run

from controller.scratch import SCRATCH_PREFIX, clean_stale_scratch  # noqa: F401 (re-exported)
from controller.stores import StoreKeyMissing, open_store

log = structlog.get_logger("nexlify.worker")

RESULT = "result.json"
RESUME = "resume.pt"
TB_KEY = "tensorboard_events"  # the run's event file up to the resume point, in its resume checkpoint
EXIT_PREEMPTED = 143
PROGRESS_SECONDS = float(os.environ.get("NEXLIFY_PROGRESS_SECONDS", "30"))


def versions() -> dict:
    return {"nexlify": nexlify.__version__, "python": platform.python_version(), "torch": str(torch.__version__)}


def load_train_config(config_url: str | None, overrides: dict) -> TrainConfig:
    """Defaults, then the config file (JSON or YAML, a PipelineConfig's file works too), then flags."""
    cfg = TrainConfig()
    if config_url:
        text = _read_url_text(config_url)
        data = _parse_mapping(text, config_url)
        data = {k: v for k, v in data.items() if _is_train_key(k)}
        apply_mapping(cfg, data, config_url)
    apply_mapping(cfg, overrides, "flags")
    validate_tree(cfg)
    return cfg


def _is_train_key(key: str) -> bool:
    sections = {f.name for f in fields(TrainConfig) if f.metadata.get("section")}
    return key in sections or key in leaf_index(TrainConfig)


def _parse_mapping(text: str, source: str) -> dict:
    data = load_yaml(text, source) or {}
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _read_url_text(url: str) -> str:
    store, key = _split(url)
    try:
        return store.read_bytes(key).decode()
    except StoreKeyMissing:
        raise InputError(f"config {url} does not exist") from None


def _split(url: str):
    """(store of the parent folder, object name) for a file URL."""
    url = url.rstrip("/")
    parent, _, name = url.rpartition("/")
    return open_store(parent or "/"), name


class RunOutputs:
    """The run's output folder (local or s3://), through a store."""

    def __init__(self, out_url: str) -> None:
        self.url = out_url.rstrip("/")
        self.store = open_store(self.url)

    def result(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(RESULT))
        except StoreKeyMissing:
            return None

    def write_json(self, key: str, data: dict) -> None:
        self.store.write_bytes(key, json.dumps(data, indent=2, sort_keys=False).encode())

    def save_torch(self, key: str, obj: dict) -> str:
        """Write the checkpoint; returns the sha256 of its bytes (result.json records the model's)."""
        blob = checkpoint.to_bytes(obj)
        self.store.write_bytes(key, blob)
        return hashlib.sha256(blob).hexdigest()

    def load_resume(self, device: torch.device) -> dict | None:
        """The run's resume checkpoint, or None. A damaged or hostile one (truncated, not a torch file, a
        pickle with code in it: weights_only refuses it) is set aside as resume.pt.damaged-<time>, with a
        warning naming it, and the run starts again from its last good point (the beginning)."""
        try:
            blob = self.store.read_bytes(RESUME)
        except StoreKeyMissing:
            return None
        try:
            state = checkpoint.safe_torch_load(io.BytesIO(blob), map_location=device)
            if not isinstance(state, dict) or "episodes_done" not in state:
                raise ValueError("not a resume checkpoint (no episodes_done)")
            return state
        except Exception as exc:  # noqa: BLE001 - whatever torch says, the file is unusable
            aside = f"{RESUME}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            self.store.write_bytes(aside, blob)
            self.store.delete(RESUME)
            log.warning("resume_damaged", file=self.store.url(RESUME), set_aside=self.store.url(aside),
                        reason=checkpoint.load_failure(exc), action="the run starts again from its beginning")
            return None


def fetch_snapshot(data_url: str, cfg: TrainConfig, into: str) -> str:
    """Copy the pipeline's candle snapshot (one file per pair, and with arbitrage on the second venue's
    file per pair where the pipeline had one) into a local folder."""
    store = open_store(data_url.rstrip("/"))
    for pair in cfg.data.pairs:
        name = candle_filename(cfg.data.exchange, pair, cfg.data.timeframe)
        try:
            store.download_file(name, os.path.join(into, name))
        except StoreKeyMissing:
            raise InputError(f"data snapshot {data_url} has no {name} for {pair}") from None
    if "arbitrage" in cfg.env.strategies:
        a = cfg.arbitrage
        for pair in cfg.data.pairs:
            name = candle_filename(a.second_exchange, second_venue_pair(pair, a.second_quote), cfg.data.timeframe)
            try:
                store.download_file(name, os.path.join(into, name))
            except StoreKeyMissing:  # the pipeline found none: arbitrage is masked for this pair
                log.warning("second_venue_not_in_snapshot", file=name, pair=pair)
    return into


BASELINES_PREFIX = "baselines"  # in the pipeline's output, beside data/ (controller.pipeline.BASELINES_PREFIX)


class SnapshotBaselines:
    """The baselines of a pipeline's windows, kept in its output beside its data snapshot
    (baselines/<key>.json, key: nexlify.evaluation.baselines_key): the first run that validates on a window
    computes them, every other run and the report read them. The output is the snapshot folder's parent
    (data_url is <output>/data). An object that cannot be read as JSON counts as absent (computed again)."""

    def __init__(self, data_url: str) -> None:
        self.store = open_store(data_url.rstrip("/").rsplit("/", 1)[0] or "/")

    def get(self, key: str) -> dict | None:
        try:
            value = json.loads(self.store.read_bytes(f"{BASELINES_PREFIX}/{key}.json"))
        except (StoreKeyMissing, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict) -> None:
        self.store.write_bytes(f"{BASELINES_PREFIX}/{key}.json", json.dumps(value).encode())
        log.info("baselines_stored", key=key, url=self.store.url(f"{BASELINES_PREFIX}/{key}.json"))


def run_worker(*, run_key: str, seed: int, episodes: int, out_url: str, config_url: str | None = None,
               overrides: dict | None = None, data_url: str | None = None, init_from: str | None = None,
               checkpoint_every: int) -> int:
    structlog.contextvars.bind_contextvars(run=run_key, seed=seed)
    cfg = load_train_config(config_url, overrides or {})
    outputs = RunOutputs(out_url)
    done = outputs.result()
    if done and done.get("status") == "succeeded":
        log.info("run_already_finished", val_score=done.get("val_score"))
        return 0
    device = resolve_device(cfg.device)

    stop = {"requested": False}

    def on_sigterm(signum, _frame):
        stop["requested"] = True

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        clean_stale_scratch()
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as tmp:
            data_dir = fetch_snapshot(data_url, cfg, tmp) if data_url else None
            market, windows = prepare_data(cfg, data_dir)
            init = None
            if init_from:
                init_path = os.path.join(tmp, "init.pt")
                store, key = _split(init_from)
                try:
                    store.download_file(key, init_path)
                except StoreKeyMissing:
                    raise InputError(f"--init-from {init_from} does not exist") from None
                init = checkpoint.load(init_path, map_location=device, name=f"--init-from {init_from}")
            identity = _resume_identity(cfg, seed, episodes)
            resume = outputs.load_resume(device)
            if resume is not None and resume.get("run_identity") != identity:
                log.warning("resume_ignored", reason="the resume checkpoint belongs to another seed, episode "
                            "count or config")
                resume = None
            if resume is not None:
                log.info("run_resumed", episodes_done=int(resume["episodes_done"]))
            log.info("run_started", algorithm=cfg.agent.algorithm,
                     episodes=episodes if cfg.agent.algorithm == "dqn" else None, pairs=cfg.data.pairs, device=str(device),
                     init_from=init_from, train_bars=windows.train[1] - windows.train[0],
                     val_bars=windows.val[1] - windows.val[0])
            progress = _Progress(episodes, cfg.agent.algorithm)
            # the run's TensorBoard curves: written here, uploaded into the run's folder with its checkpoints
            board = RunBoard(os.path.join(tmp, "tensorboard"), _events_of(resume))

            def with_events(state: dict) -> dict:
                events = board.blob()
                outputs.store.write_bytes(EVENTS_FILE, events)
                carried = torch.frombuffer(bytearray(events), dtype=torch.uint8)
                return {**state, "run_identity": identity, TB_KEY: carried}

            def on_round(info: dict) -> None:
                progress.round(info)
                board.round(info)

            try:
                output = train_run(
                    cfg, market, windows, seed=seed, episodes=episodes, init=init, resume=resume,
                    checkpoint_every=checkpoint_every,
                    on_checkpoint=lambda state: (outputs.save_torch(RESUME, with_events(state)),
                                                 log.info("checkpoint_saved", episodes_done=state["episodes_done"])),
                    on_round=on_round, on_step=progress.step, should_stop=lambda: stop["requested"],
                    baselines=SnapshotBaselines(data_url) if data_url else None,
                )
            except Preempted as exc:
                if exc.state is not None:
                    outputs.save_torch(RESUME, with_events(exc.state))
                log.warning("run_preempted", saved=exc.state is not None,
                            episodes_done=exc.state["episodes_done"] if exc.state else 0)
                return EXIT_PREEMPTED
            finally:
                progress.close()
            previous_episodes = int(init["episodes_trained"]) if init else 0
            finite.check_metrics(_plain(output.val_metrics), "validation")  # never a NaN score in a result
            metrics = {"val": _plain(output.val_metrics)}
            if output.test_metrics is not None:
                metrics["test"] = _plain(output.test_metrics)
            ckpt = checkpoint.build_checkpoint(
                output.agent.state_dict(), config=to_dict(cfg), normalizer=output.normalizer.to_dict(),
                episodes_trained=previous_episodes + output.episodes_trained, seed=seed, metrics=metrics,
                extra={"run_key": run_key, "versions": versions()},
            )
            model_name = checkpoint.checkpoint_name(output.val_metrics["avg_return"])
            model_sha256 = outputs.save_torch(model_name, ckpt)
            board.metrics("val", output.val_metrics, output.episodes_trained)
            board.metrics("test", output.test_metrics, output.episodes_trained)
            board.close()
            outputs.store.write_bytes(EVENTS_FILE, board.blob())
            val = output.val_metrics
            result = {
                "status": "succeeded",
                "run_key": run_key,
                "seed": seed,
                "val_score": val["score"],
                "val_metrics": _plain(val),
                "test_metrics": _plain(output.test_metrics) if output.test_metrics is not None else None,
                # the baselines on the same windows in the same environment (nexlify.baselines)
                "val_baselines": _plain(output.val_baselines),
                "test_baselines": _plain(output.test_baselines),
                "baseline_notes": _plain(output.baseline_notes),
                "train_return": output.train_return,
                "model_file": model_name,
                "model_url": f"{outputs.url}/{model_name}",
                "model_sha256": model_sha256,  # the pipeline checks the model against it before using it
                "init_from": init_from,
                "episodes_trained": output.episodes_trained,
                "episodes_total": previous_episodes + output.episodes_trained,
                "timings": output.timings,
                # the forecast learner's fit: its steps, and its holdout loss beside forecasting zero's
                "forecast_fit": asdict(output.agent.fit) if isinstance(output.agent, ForecastAgent) else None,
                "device": str(device),
                "versions": versions(),
            }
            outputs.write_json(RESULT, result)
            outputs.store.delete(RESUME)
            log.info("run_finished", val_score=round(val["score"], 4), val_return=round(val["avg_return"], 3),
                     train_return=round(output.train_return, 3), model=model_name,
                     seconds=output.timings["total_s"])
            return 0
    except NonFiniteError as exc:
        # the run stops for good: result.json says why (the pipeline reports it and never selects the run);
        # no checkpoint holds the non-finite value (nexlify.checkpoint refuses to write one)
        error = NonFiniteError(f"run {run_key}: {exc}", **{**exc.details, "run": run_key})
        outputs.write_json(RESULT, {"status": "failed", "error": "non_finite", "reason": str(error),
                                    "run_key": run_key, "seed": seed, "details": _plain(error.details),
                                    "versions": versions()})
        log.error("run_non_finite", reason=str(exc), **{k: v for k, v in exc.details.items() if k != "seed"})
        raise error from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _events_of(resume: dict | None) -> bytes | None:
    if resume is None or TB_KEY not in resume:
        return None
    return resume[TB_KEY].cpu().numpy().tobytes()


def _resume_identity(cfg: TrainConfig, seed: int, episodes: int) -> dict:
    """What a resume checkpoint must match to be continued: the seed, the episode count and the
    config (less the device and thread count, which may change between a crash and the resume). A
    stale resume.pt (another seed, or an output reused with --force) is ignored instead of mixed in."""
    config = to_dict(cfg)
    for key in ("device", "threads"):
        config.pop(key, None)
    return {"seed": int(seed), "episodes": int(episodes), "config": config}


def _plain(metrics: dict | None) -> dict | None:
    return json.loads(json.dumps(metrics)) if metrics is not None else None


class _Progress:
    """A tqdm bar on a terminal (episodes done, ETA, the last round's mean episode return); otherwise a
    `training_progress` event every NEXLIFY_PROGRESS_SECONDS with the same numbers (the local executor
    draws its bar per run from them). The forecast learner runs no episodes: its share is that of its fit's
    gradient steps, given in the same units (episodes_done of the run's episodes) so that one bar serves both,
    drawn without the episode count (nexlify.logs.bar_format)."""

    def __init__(self, episodes: int, algorithm: str = "dqn") -> None:
        self.bar = None
        self.episodes = episodes
        self.last_return: float | None = None
        self.last = time.monotonic()
        self.ended = False  # the last step's event went out
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=episodes, desc="training", unit="ep", leave=False, bar_format=bar_format(algorithm))

    def step(self, done: int, total: int) -> None:
        episodes_done = round(self.episodes * done / max(total, 1), 1)
        if self.bar is not None:
            self.bar.update(max(0.0, episodes_done - self.bar.n))
        elif (done >= total and not self.ended) or (done < total and time.monotonic() - self.last >= PROGRESS_SECONDS):
            self.last = time.monotonic()  # the end always reaches the bar, once
            self.ended = done >= total
            log.info("training_progress", percent=round(100.0 * done / max(total, 1), 1),
                     episodes_done=episodes_done, episodes=self.episodes, last_return=self.last_return)

    def round(self, info: dict) -> None:
        self.last_return = round(info["mean_return"], 3)
        if self.bar is not None:
            self.bar.set_postfix_str(f"last return {self.last_return:+.2f} %", refresh=False)
            self.bar.update(max(0.0, info["episodes_done"] - self.bar.n))
        log.info("episodes_finished", episode=info["episodes_done"], round=info["round"], rounds=info["rounds"],
                 epsilon=round(info["epsilon"], 3), mean_return=round(info["mean_return"], 3))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

