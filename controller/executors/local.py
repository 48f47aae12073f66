"""The embedded default: each run is a `nexlify worker train` process on this machine, forked from a warm
launcher that has imported the worker's modules already (controller.executors.prefork; a fresh
`python -m controller` process where the launcher cannot run: not Linux, or a machine with a GPU).

At most `parallel` workers run at once. Workers log JSON lines on stderr; the executor relays each
event through the controller's logger (so it lands in the terminal and training.log alike) and turns
their progress events into one progress bar per run on a terminal. Workers get SIGTERM if the
controller dies (Linux PDEATHSIG, through the launcher), which makes them save a resume checkpoint and
exit, so a re-run of the pipeline never finds an orphan still writing to the same run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import structlog

from controller.executors.base import RunOutcome, RunSpec
from controller.executors.prefork import Launcher, die_with_parent
from controller.executors.prefork import shared as shared_launcher
from controller.executors.prefork import supported as can_prefork

log = structlog.get_logger("nexlify.executor.local")

_TRACEBACK_LAST = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")
STOP_GRACE_S = 60.0  # how long close() lets workers save their resume checkpoint after SIGTERM


def worker_command() -> list[str]:
    """How to start `nexlify` with the interpreter running us (works in any venv, no PATH lookup)."""
    return [sys.executable, "-m", "controller"]


def default_parallel() -> int:
    """One run per CUDA device where there are any, else one per CPU this process may use (its affinity, capped by
    its cgroup's CPU quota: a container under a CPU limit counts its limit, not the machine's cores). The devices are counted by a child
    process (nexlify.probe): the controller imports no torch."""
    from nexlify.errors import NexlifyError
    from nexlify.probe import cuda_devices

    try:
        gpus = cuda_devices()
    except NexlifyError:  # torch unusable here: the workers will say so; size by the cores meanwhile
        gpus = 0
    if gpus > 0:
        return gpus
    from nexlify.cpus import available_cpus  # affinity capped by the cgroup's CPU quota (a container's limit)

    return available_cpus()


@dataclass
class _Run:
    spec: RunSpec
    process: subprocess.Popen | None = None
    relay: threading.Thread | None = None
    tail: list[str] = field(default_factory=list)
    bar: object | None = None
    cause: str | None = None  # the worker's own one-line error (its `failed` event), when it gave one


class LocalExecutor:
    def __init__(self, parallel: int = 0, *, extra_env: dict | None = None, progress: bool | None = None,
                 algorithm: str = "dqn", prefork: bool = True) -> None:
        """prefork: fork the workers from a launcher that has imported their modules already
        (controller.executors.prefork; Linux without a GPU), started here so that its imports overlap the
        controller's start, and kept for this process's next executor (the folds of a walk-forward; it ends
        with the process); False, or where it cannot run, each worker is a fresh `python -m controller` process."""
        self.algorithm = algorithm  # the runs' learner: their bars count episodes, or a fit's share
        self.extra_env = dict(extra_env or {})
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._runs: dict[str, _Run] = {}
        self._launcher = shared_launcher(self._worker_env()) if prefork and can_prefork() else None
        self.parallel = parallel or default_parallel()  # after the launcher: its imports overlap the device probe

    @property
    def launcher(self) -> Launcher | None:
        """The warm launcher, once its imports are done (None without one, or if it failed: then say so)."""
        if self._launcher is not None and not self._launcher.ready():
            self._drop_launcher(self._launcher.error)
        return self._launcher

    def _drop_launcher(self, reason: str | None) -> None:
        assert self._launcher is not None
        log.warning("worker_launcher_unavailable", reason=reason, fallback="each worker starts as a fresh process")
        self._launcher.close()
        self._launcher = None

    def start(self, spec: RunSpec) -> str:
        """Register a run; processes start in wait(), at most `parallel` at a time. Idempotent by run key."""
        self._runs.setdefault(spec.run_key, _Run(spec))
        return spec.run_key

    def wait(self, handles: list[str]) -> list[RunOutcome]:
        pending = [self._runs[h] for h in handles]
        running: list[_Run] = []
        outcomes: dict[str, RunOutcome] = {}
        position = 0
        while pending or running:
            while pending and len(running) < self.parallel:
                run = pending.pop(0)
                self._launch(run, position)
                position += 1
                running.append(run)
            finished = self._wait_any(running)
            running.remove(finished)
            outcomes[finished.spec.run_key] = self._outcome(finished)
        return [outcomes[h] for h in handles]

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop runs still going (Ctrl-C, an error in the controller): SIGTERM makes a worker save its
        resume checkpoint and exit; wait for that, so a pipeline started again right away never meets a
        worker of the old one still writing. A worker that does not stop in `grace_s` is killed."""
        running = [run for run in self._runs.values() if run.process is not None and run.process.poll() is None]
        for run in running:
            run.process.terminate()
        deadline = time.monotonic() + grace_s
        for run in running:
            try:
                run.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("run_killed", run=run.spec.run_key, reason=f"did not stop within {grace_s:g} s of SIGTERM")
                run.process.kill()
                run.process.wait()
            if run.relay is not None:
                run.relay.join(timeout=5)
            log.info("run_stopped", run=run.spec.run_key, exit_code=run.process.returncode)

    # -----------------------------------------------------------------------------------------------

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["NEXLIFY_LOG_FORMAT"] = "json"
        env["NEXLIFY_PROGRESS_SECONDS"] = "1" if self.progress else env.get("NEXLIFY_PROGRESS_SECONDS", "30")
        return env

    def _launch(self, run: _Run, position: int) -> None:
        if self.progress:  # the bar first: the first run's may wait for the launcher's imports
            from tqdm import tqdm

            from nexlify.logs import bar_format

            run.bar = tqdm(total=run.spec.episodes, desc=run.spec.run_key, unit="ep", leave=False,
                           position=position % self.parallel, bar_format=bar_format(self.algorithm))
        launcher = self.launcher
        if launcher is not None:
            try:
                run.process = launcher.spawn(run.spec.worker_args())
            except OSError as error:  # the launcher died (killed, out of memory): fresh processes from now on
                self._drop_launcher(str(error))
                launcher = None
        if launcher is None:
            # A session of its own: Ctrl-C on the terminal reaches only the controller, which then stops each
            # worker with SIGTERM (a worker saves its resume checkpoint on SIGTERM, not on SIGINT).
            run.process = subprocess.Popen(worker_command() + run.spec.worker_args(), env=self._worker_env(),
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True, start_new_session=True,
                                           preexec_fn=functools.partial(die_with_parent, os.getpid()))
        run.relay = threading.Thread(target=self._relay, args=(run,), daemon=True)
        run.relay.start()
        log.info("run_started", run=run.spec.run_key, seed=run.spec.seed, phase=run.spec.phase,
                 episodes=run.spec.episodes, pid=run.process.pid)

    def _relay(self, run: _Run) -> None:
        assert run.process is not None and run.process.stderr is not None
        for line in run.process.stderr:
            line = line.rstrip("\n")
            run.tail = (run.tail + [line])[-20:]
            try:
                event = json.loads(line)
            except ValueError:
                log.info("worker_output", run=run.spec.run_key, line=line)
                if _TRACEBACK_LAST.match(line):  # the last line of an unexpected traceback names the exception
                    run.cause = line
                continue
            name = event.pop("event", "worker_event")
            if name == "failed" and event.get("error"):
                run.cause = str(event["error"])
            if run.bar is not None and name in ("training_progress", "episodes_finished"):
                _advance_bar(run.bar, event)
                if name == "training_progress":
                    continue
            level = event.pop("level", "info")
            event.pop("timestamp", None)
            event.setdefault("run", run.spec.run_key)
            getattr(log, level if level in ("debug", "info", "warning", "error") else "info")(name, **event)

    def _wait_any(self, running: list[_Run]) -> _Run:
        while True:
            for run in running:
                assert run.process is not None
                try:
                    run.process.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    continue
                if run.relay is not None:
                    run.relay.join(timeout=5)
                if run.bar is not None:
                    run.bar.close()
                return run

    @staticmethod
    def _outcome(run: _Run) -> RunOutcome:
        assert run.process is not None
        code = run.process.returncode
        if code == 0:
            return RunOutcome(run.spec.run_key, True, details={"exit_code": 0})
        reason = {2: "invalid input", 3: "a non-finite value (its result.json says which)",
                  143: "terminated (SIGTERM)", -15: "terminated (SIGTERM)",
                  -9: "killed (SIGKILL, out of memory?)"}.get(code, f"exit code {code}")
        if run.cause:  # what the worker said went wrong (a full disk, a missing --init-from), not just its code
            reason = f"{run.cause} ({reason})"
        return RunOutcome(run.spec.run_key, False, reason=f"worker failed: {reason}",
                          details={"exit_code": code, "log_tail": run.tail[-10:]})


def _advance_bar(bar, event: dict) -> None:
    """A run's bar from its worker's events: episodes done (update(), not n =, so tqdm's rate and ETA
    follow) and the last round's mean episode return."""
    done = event.get("episodes_done", event.get("episode"))
    last = event.get("last_return", event.get("mean_return"))
    if last is not None:
        bar.set_postfix_str(f"last return {last:+.2f} %", refresh=False)
    if done is not None:
        bar.update(max(0.0, float(done) - bar.n))
    else:
        bar.refresh()
