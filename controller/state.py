"""The pipeline's state, as typed records: what `pipeline_state.json` holds after every transition.

    PLANNED -> INITIAL_RUNNING -> SELECTED -> RETRAINING(k) -> DONE(stop_reason)

`PipelineState.to_dict()` writes the JSON format the pipeline has always written, and `from_dict` reads
any such file back, so a pipeline started by an earlier version resumes:
- keys in the order the pipeline adds them;
- a top-level field that is None is left out (as it was absent until set: `"best" not in state` before
  SELECTED); `stop_reason` absent and null read the same;
- keys this version does not know are kept (`extra`) and written back unchanged.
The metric tables inside a run (`val_metrics`, `per_pair`, `timings`, ...) stay plain dicts: they are
the run's result.json numbers, passed through to the summary as recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

STATE_VERSION = 1


def initial_run_key(run_id: int) -> str:
    """The run key of initial run `run_id` (1-based): unique within a pipeline, stable across restarts, and
    the `source` of whatever it trained in the summary, the report and the walk-forward."""
    return f"init-{run_id}"


def retrain_run_key(iteration: int) -> str:
    """The run key of retraining iteration `iteration` (1-based)."""
    return f"retrain-{iteration}"


# A run's digests, written only once known, so that a state written before they existed (or by a run
# without them) writes back byte for byte.
_DIGESTS = ("result_sha256", "model_sha256")


class _Record:
    """to_dict / from_dict for a flat record: its fields in declaration order, then the keys it did not
    know (`extra`)."""

    extra: dict[str, Any]

    @property
    def excess_moments(self) -> dict | None:
        """A run's per-bar validation return moments in excess of lending's (the verdict, nexlify.verdict): kept
        under `extra` so that a state written before they existed writes back byte for byte; None there."""
        return self.extra.get("excess_moments")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)  # type: ignore[arg-type]
               if f.name != "extra" and not (f.name in _DIGESTS and getattr(self, f.name) is None)}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls) if f.name != "extra"}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


@dataclass
class Best(_Record):
    """The best model so far: the one retraining continues from, and the summary's final model."""

    score: float  # its validation score (controller.rules.score of its run)
    model_key: str  # its checkpoint, relative to the output ("initial_runs/run_2/model_return3.1.pt")
    source: str  # the run that trained it: "init-2", "retrain-1"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class InitialRun(_Record):
    """One initial run, as its result.json reported it (controller.pipeline._run_entry)."""

    run_id: int  # 1..initial_runs; also its key in PipelineState.initial_runs (as a string)
    seed: int  # controller.rules.initial_seed(seed, run_id)
    val_score: float  # the selection score on the validation window
    train_return: float  # mean return % of the last training round's (exploring) episodes (forecast: its holdout days)
    val_metrics: dict  # the validation averages (pipeline._avg_metrics of the result's val_metrics)
    per_pair: dict | None  # validation metrics per pair
    model_key: str  # the run's model, relative to the output
    model_path: str  # the same key (the summary's name for it)
    test_metrics: dict | None  # the held-out test window's metrics, when one is configured
    timings: dict | None  # seconds and env steps of the run (result.json)
    device: str | None = None  # what the run trained on ("cpu", "cuda:0")
    versions: dict | None = None  # the worker's nexlify, python and torch
    return_moments: dict | None = None  # per-bar validation return moments (selection honesty); None from an old run
    val_baselines: dict | None = None  # the baselines' averages on the validation window; None from an old run
    result_sha256: str | None = None  # sha256 of its result.json as the pipeline read it (checked on every start)
    model_sha256: str | None = None  # sha256 of its model as the worker wrote it (checked on every start)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Iteration(_Record):
    """One retraining iteration: its run, scored against the best so far (controller.rules.decide)."""

    iteration: int  # k = 1, 2, ...
    seed: int  # controller.rules.retrain_seed(seed, initial_runs, k)
    score: float  # its validation score
    improvement_pct: float  # against the best score before it, %
    metrics: dict  # the validation averages
    per_pair: dict | None  # validation metrics per pair
    model_path: str  # its model, relative to the output
    train_return: float  # mean return % of its last training round
    new_best: bool  # whether it became the best
    patience_count: int  # iterations without improvement after it
    continued_from: str | None  # the model it started from (the best's model_key then); None: fitted afresh (forecast)
    test_metrics: dict | None  # the test window's metrics, when configured
    timings: dict | None  # seconds and env steps of the run
    device: str | None = None  # what the run trained on
    versions: dict | None = None  # the worker's nexlify, python and torch
    return_moments: dict | None = None  # per-bar validation return moments; None from an old run
    val_baselines: dict | None = None  # the baselines' averages on the validation window; None from an old run
    result_sha256: str | None = None  # sha256 of its result.json as the pipeline read it (checked on every start)
    model_sha256: str | None = None  # sha256 of its model as the worker wrote it (checked on every start)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSnapshot(_Record):
    """The candles the runs train on, written into the output once (data/...), with their windows."""

    exchange: str
    pairs: list[str]
    timeframe: str
    start: str  # first bar, ISO UTC
    end: str  # end of the last bar, ISO UTC
    bars: int
    train: dict  # {"start", "end", "bars"} of each window
    validation: dict
    test: dict | None  # None without --test-days
    # {"pair", "key", "rows", "sha256", "source", "gaps"} per file; the second venue's (arbitrage) have
    # "venue": "second" and "for_pair" in place of "gaps". The sha256 is checked on every resume.
    files: list[dict]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure(_Record):
    """A run that failed (the pipeline stops with a PermanentError naming it)."""

    run: str  # its run key ("init-1", "retrain-2")
    reason: str  # one line: the worker's own account where it gave one
    details: dict  # the executor's details (exit code, log tail, ...)
    extra: dict[str, Any] = field(default_factory=dict)


# Fields written only once set (absent before: a reader tells "not yet" by the key's absence).
_OPTIONAL = ("phase", "updated_at", "data", "runs", "failures", "best", "best_initial_run", "best_initial_score",
             "patience_count", "iteration", "stop_reason")


@dataclass
class PipelineState:
    """Everything a pipeline has decided, in the order it decided it."""

    state_version: int = STATE_VERSION
    pipeline_id: str = ""  # controller.config.pipeline_id: the config and the output
    config_hash: str = ""  # controller.config.pipeline_hash: another config's output is refused
    started_at: str = ""  # ISO UTC, when the pipeline was planned
    initial_runs: dict[str, InitialRun] = field(default_factory=dict)  # by run id as a string ("1": a JSON key)
    retraining: list[Iteration] = field(default_factory=list)  # in order
    timings: dict[str, float] = field(default_factory=dict)  # "initial_s", "retraining_s": seconds, summed over starts
    phase: str | None = None  # PLANNED, INITIAL_RUNNING, SELECTED, RETRAINING, DONE
    updated_at: str | None = None  # ISO UTC of the last transition
    data: DataSnapshot | None = None  # the snapshot, once written
    runs: int | None = None  # the initial runs planned (INITIAL_RUNNING)
    failures: list[Failure] | None = None  # runs that failed, once one has
    best: Best | None = None  # from SELECTED on
    best_initial_run: int | None = None  # the selected initial run's id
    best_initial_score: float | None = None
    patience_count: int | None = None  # iterations since the last improvement
    iteration: int | None = None  # the retraining iteration under way (RETRAINING)
    stop_reason: str | None = None  # controller.rules' reason, once retraining stops
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "state_version": self.state_version, "pipeline_id": self.pipeline_id, "config_hash": self.config_hash,
            "started_at": self.started_at,
            "initial_runs": {k: e.to_dict() for k, e in self.initial_runs.items()},
            "retraining": [e.to_dict() for e in self.retraining],
            "timings": dict(self.timings),
        }
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, _Record):
                value = value.to_dict()
            elif name == "failures":
                value = [f.to_dict() for f in value]
            out[name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PipelineState:
        known = {f.name for f in fields(cls)} - {"extra"}
        plain = {k: v for k, v in data.items() if k in known}
        plain["initial_runs"] = {k: InitialRun.from_dict(e) for k, e in data.get("initial_runs", {}).items()}
        plain["retraining"] = [Iteration.from_dict(e) for e in data.get("retraining", [])]
        if data.get("data") is not None:
            plain["data"] = DataSnapshot.from_dict(data["data"])
        if data.get("best") is not None:
            plain["best"] = Best.from_dict(data["best"])
        if data.get("failures") is not None:
            plain["failures"] = [Failure.from_dict(f) for f in data["failures"]]
        return cls(**plain, extra={k: v for k, v in data.items() if k not in known})
