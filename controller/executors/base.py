"""The executor interface and the run contract shared by every executor.

One run = one invocation of `nexlify worker train` described by a RunSpec. The same RunSpec becomes
the argument list of a local process and the container args of a Kubernetes Job, so the two cannot
drift. A run's outcome reaches the pipeline only through `<output>/result.json` in the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class RunSpec:
    run_key: str  # "init-1", "retrain-3": unique within a pipeline, stable across restarts
    phase: str  # "initial" | "retrain"
    seed: int
    episodes: int
    config_url: str  # URL of the resolved TrainConfig (JSON) the pipeline wrote to its store
    data_url: str  # URL of the pipeline's data snapshot folder (data/<exchange>_<pair>_<tf>.csv.gz)
    output_url: str  # URL of the run's folder: checkpoints and result.json land here
    init_from: str | None = None  # URL of a checkpoint to continue from (weights and optimizer)
    # episodes between resume checkpoints (0 = none before the end); no default here: the pipeline passes
    # PipelineConfig.checkpoint_every, the setting's one home
    checkpoint_every: int = field(kw_only=True)

    def worker_args(self) -> list[str]:
        """Arguments after the `nexlify` executable: identical for a local process and a pod."""
        args = [
            "worker", "train",
            "--run-key", self.run_key,
            "--seed", str(self.seed),
            "--episodes", str(self.episodes),
            "--config", self.config_url,
            "--data-snapshot", self.data_url,
            "--out", self.output_url,
            "--checkpoint-every", str(self.checkpoint_every),
        ]
        if self.init_from:
            args += ["--init-from", self.init_from]
        return args


@dataclass
class RunOutcome:
    run_key: str
    succeeded: bool
    reason: str | None = None  # one line a user can act on, when not succeeded
    details: dict = field(default_factory=dict)  # executor specifics: exit code, pod reasons, log tail


class Executor(Protocol):
    def start(self, spec: RunSpec) -> object:
        """Start a run and return a handle. Idempotent: starting a run that already exists adopts it."""

    def wait(self, handles: list[object]) -> list[RunOutcome]:
        """Block until every handle is terminal; return their outcomes in the same order."""

    def close(self) -> None:
        """Release resources (stop watching, kill nothing that should go on)."""
