"""Helpers for the pipeline tests: the tiny pipeline's flags, running `nexlify train` as a real process,
killing it with SIGKILL at chosen points, and watching its worker children through /proc.

The pipeline always runs as `python -m controller train ...` (the CLI users type), never in-process,
so a SIGKILL is a real one and the PDEATHSIG of its workers is exercised for real.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A pipeline small enough to finish in ~20 s on 2 cores, big enough that every mechanism happens: two
# rounds per run (so a resume.pt exists mid-run), learning that changes the weights (learning starts
# early), a validation and a test window, exactly two retraining iterations.
TINY = [
    "--pairs", "BTC/USDT", "--start", "2024-11-01", "--end", "2025-06-01", "--val-days", "30", "--test-days", "15",
    "--initial-runs", "2", "--initial-episodes", "8", "--retrain-episodes", "8", "--num-envs", "4",
    "--episode-bars", "300", "--max-iterations", "2", "--checkpoint-every", "4",
    "--learning-starts", "256", "--batch-size", "64",
    # the Q-learner: its runs train in rounds, so a run can be stopped and resumed in the middle (the forecast
    # learner's pipeline: tests/test_pipeline_cli.py's quick test)
    "--algorithm", "dqn",
    # spot only: the layout checks below list the primary's files; the second venue's snapshot (arbitrage)
    # is checked in tests/test_strategies_env.py
    "--strategies", "spot",
    "--improvement-threshold", "0",  # with patience 3, no rule stops before iteration 2: both always run
]

PIPELINE_TIMEOUT_S = 180.0
CHILD_EXIT_TIMEOUT_S = 30.0

# `python -c` program: the real CLI, with Pipeline._transition wrapped so that the process SIGKILLs
# itself right after writing the state of one phase: a kill -9 at a moment no outside poller can hit.
KILL_AT_PHASE_PROGRAM = """
import os, signal, sys
import controller.pipeline as pipeline
phase_to_die_at = os.environ["NEXLIFY_TEST_KILL_AT_PHASE"]
original = pipeline.Pipeline._transition
def transition(self, phase, **fields):
    original(self, phase, **fields)
    if phase == phase_to_die_at:
        os.kill(os.getpid(), signal.SIGKILL)
pipeline.Pipeline._transition = transition
from controller.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("NEXLIFY_LOG_FORMAT", None)
    env.update(extra or {})
    return env


def train_args(output: str, *extra: str) -> list[str]:
    return ["train", *TINY, "--output", output, "--log-format", "json", *extra]


def start_cli(args: list[str], log_path: Path, *, kill_at_phase: str | None = None,
              env: dict | None = None, own_session: bool = False) -> subprocess.Popen:
    """Start `nexlify <args>` (stdout and stderr into log_path); optionally dying at a phase, optionally
    in a session of its own (like a command typed in a terminal: os.killpg(pid, SIGINT) is Ctrl-C)."""
    extra = dict(env or {})
    if kill_at_phase is not None:
        argv = [sys.executable, "-c", KILL_AT_PHASE_PROGRAM, *args]
        extra["NEXLIFY_TEST_KILL_AT_PHASE"] = kill_at_phase
    else:
        argv = [sys.executable, "-m", "controller", *args]
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, cwd=str(REPO), env=child_env(extra), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=own_session,
                                preexec_fn=_default_sigint if own_session else None)
    finally:
        log.close()


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C raises KeyboardInterrupt, as in a command typed in a terminal. A test run
    started in the background of a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored, and Python
    keeps an ignored SIGINT ignored: without this the Ctrl-C stage would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(args: list[str], *, timeout: float = PIPELINE_TIMEOUT_S, env: dict | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `nexlify <args>` to the end; stdout and stderr captured separately."""
    return subprocess.run([sys.executable, "-m", "controller", *args], cwd=cwd or str(REPO), env=child_env(env),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float = PIPELINE_TIMEOUT_S) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"pipeline did not finish in {timeout} s; log tail:\n{tail(log_path)}") from None


def tail(log_path: Path, chars: int = 4000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else "(no log)"


def log_events(log_path: Path) -> list[dict]:
    """The JSON events of a log (lines that are not JSON, like the preflight table, are skipped)."""
    return log_events_text(log_path.read_text(errors="replace"))


def log_events_text(text: str) -> list[dict]:
    """The JSON events among lines of text (a log file's, a process's stderr)."""
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, log_path: Path, what: str,
               timeout: float = PIPELINE_TIMEOUT_S, poll_s: float = 0.03) -> None:
    """Poll until condition() holds; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the pipeline exited ({proc.returncode}) before {what}; log tail:\n{tail(log_path)}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}; log tail:\n{tail(log_path)}")


# ---------------------------------------------------------------------------------------- /proc


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
    return text[text.rindex(")") + 2:].split()


def children(pid: int) -> list[int]:
    """Live processes whose parent is pid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.append(int(entry))
    return sorted(out)


def descendants(pid: int) -> list[int]:
    """Live processes under pid: its children, theirs, and so on."""
    out, todo = [], children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children(child))
    return sorted(out)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def workers(pid: int) -> list[int]:
    """The worker processes of the controller pid: the children of its warm launcher
    (controller.executors.prefork), or its own children where it starts them as fresh processes."""
    out = []
    for child in children(pid):
        out.extend(children(child) if "controller.executors.prefork" in _cmdline(child) else [child])
    return sorted(out)


def alive(pid: int) -> bool:
    """True while pid runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def sigkill_pipeline(proc: subprocess.Popen) -> list[int]:
    """kill -9 the controller; then every process under it (the workers and their launcher) must exit by
    itself (PDEATHSIG) in time. Returns the workers."""
    running = workers(proc.pid)
    under = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    deadline = time.monotonic() + CHILD_EXIT_TIMEOUT_S
    while time.monotonic() < deadline and any(alive(pid) for pid in under):
        time.sleep(0.05)
    survivors = [pid for pid in under if alive(pid)]
    for pid in survivors:  # clean up before failing, so a broken PDEATHSIG does not leak processes
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes {survivors} kept running after the controller was killed"
    return running


# ---------------------------------------------------------------------------------------- summaries


def comparable(summary: dict) -> dict:
    """The summary less what legitimately differs between two runs of one pipeline: timings (and the
    digests of the result.json files that hold them), and where the output lives (the config's output, the final model's absolute path or URL, and the pipeline id,
    which covers the output so that one config run to two outputs never shares a Kubernetes Job)."""
    s = copy.deepcopy(summary)
    s.pop("timings", None)
    s.pop("final_model_url", None)
    s.pop("final_model_path", None)
    s.pop("pipeline_id", None)
    s["config"].pop("output", None)
    for entry in s["initial_runs"] + s["retraining_iterations"]:
        entry.pop("timings", None)
        entry.pop("result_sha256", None)  # the digest of a result.json, which holds the timings and the output
    return s


def error_lines(stderr: str) -> list[str]:
    """The one-line errors of a command, as `error: ...`: printed so on a terminal, or as the JSON `failed`
    event when the command logs JSON (every line of JSON mode is JSON; stderr is not a terminal here)."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("error:"):
            out.append(line)
        elif line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "failed" and "error" in event:
                out.append(f"error: {event['error']}")
    return out


def non_json_lines(stderr: str) -> list[str]:
    bad = []
    for line in stderr.splitlines():
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    return bad


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (for 'nothing changed' checks)."""
    return {str(p.relative_to(root)): sha256(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


class Reference:
    """One uninterrupted tiny pipeline in a local folder, run once per test session and shared (by every worker
    of a `pytest -n N` session too: the first to need it runs it under a lock, the others wait and read it)."""

    _cache: dict[str, object] = {}

    @classmethod
    def get(cls, tmp_path_factory) -> Path:
        if "out" not in cls._cache:
            with once_per_session(tmp_path_factory, "reference") as (base, done):
                out = base / "out"
                log_path = base / "train.log"
                if not done.exists():
                    rc = finish(start_cli(train_args(str(out)), log_path), log_path)
                    done.write_text(str(rc))
                rc = int(done.read_text())
            cls._cache["out"] = out
            cls._cache["error"] = None if rc == 0 else f"reference pipeline failed ({rc}):\n{tail(log_path)}"
        if cls._cache["error"]:  # failed once: every user fails at once, without running it again
            raise AssertionError(cls._cache["error"])
        return cls._cache["out"]  # type: ignore[return-value]


@contextlib.contextmanager
def once_per_session(tmp_path_factory, name: str) -> Iterator[tuple[Path, Path]]:
    """A folder for work done once per test session, and the file that marks it done: (folder, marker).

    In a plain session, a fresh temporary folder. Under pytest-xdist every worker is a process of its own with
    its own temporary folder, all inside one folder of the session: there the folder is shared (locked_once)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        base = tmp_path_factory.mktemp(name)
        yield base, base / ".done"
        return
    with locked_once(tmp_path_factory.getbasetemp().parent, name) as held:
        yield held


@contextlib.contextmanager
def locked_once(shared: Path, name: str, wait: bool = True) -> Iterator:
    """(shared/name, its marker file), held under an exclusive lock while the caller works in it: the first
    process does the work and writes the marker, the others find it when they get the lock. wait=False: None
    instead of waiting when another process holds it."""
    base = shared / name
    base.mkdir(exist_ok=True)
    with open(shared / f"{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            yield base, base / ".done"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
