"""kill -9 of `nexlify train` at several points, then the same command again: the pipeline must end with
the summary (and the very same model files) an uninterrupted run writes.

One output folder is stopped five times in a row, each time at a different point:
  1. during the initial runs, once a run has written its resume.pt (an outside SIGKILL);
  2. between phases: right after SELECTED is written, before any retraining starts;
  3. during retraining iteration 1, once it has written its resume.pt (an outside SIGKILL);
  4. during retraining iteration 2, by Ctrl-C (SIGINT to the process group, as a terminal sends it);
  5. right after DONE is written, before the summary is (the summary is written last).
Points 2 and 5 are hit by a wrapper around the real CLI that SIGKILLs its own process right after the
state of that phase is written (tests.pipeline_support.KILL_AT_PHASE_PROGRAM): no poller can hit a
window that short. After every outside kill, each worker child must exit by itself (PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

from nexlify.tb import EVENTS_FILE, read_scalars
from tests.pipeline_support import (
    REPO,
    Reference,
    alive,
    comparable,
    finish,
    folder_tree,
    log_events,
    read_json,
    sigkill_pipeline,
    start_cli,
    tail,
    train_args,
    wait_until,
    workers,
)

SUMMARY = "complete_training_summary.json"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return Reference.get(tmp_path_factory)


def phase(out: Path) -> str | None:
    try:
        return read_json(out / "pipeline_state.json").get("phase")
    except (FileNotFoundError, ValueError):  # not written yet
        return None


def events_of(log_path: Path, start_offset: int) -> list[dict]:
    """The JSON events a log gained after start_offset bytes (one invocation's share of a shared log)."""
    part = log_path.with_suffix(".part")
    part.write_bytes(log_path.read_bytes()[start_offset:])
    return log_events(part)


def pause_after_resume_env(tmp_path: Path, seconds: float) -> dict:
    """Environment for a child whose workers sleep `seconds` after each resume.pt they write (sitecustomize)."""
    hooks = tmp_path / "pause_hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('NEXLIFY_TEST_PAUSE_AFTER_RESUME'):\n"
        "    from controller import worker\n"
        "    original = worker.RunOutputs.save_torch\n"
        "    def save_torch(self, key, obj):\n"
        "        digest = original(self, key, obj)\n"
        "        if key == worker.RESUME:\n"
        "            time.sleep(float(os.environ['NEXLIFY_TEST_PAUSE_AFTER_RESUME']))\n"
        "        return digest\n"
        "    worker.RunOutputs.save_torch = save_torch\n")
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(hooks)]), "NEXLIFY_TEST_PAUSE_AFTER_RESUME": str(seconds)}


def test_stopped_at_five_points_and_resumed_ends_like_an_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "out"
    log_path = tmp_path / "train.log"
    args = train_args(str(out))
    temp_files_before = set(Path(tempfile.gettempdir()).glob("nexlify-training-*"))

    # 1. during the initial runs, after a resume checkpoint exists ---------------------------------
    proc = start_cli(args, log_path)
    resume_files = [out / f"initial_runs/run_{i}/resume.pt" for i in (1, 2)]
    wait_until(lambda: any(p.exists() for p in resume_files), proc, log_path, "an initial run's resume.pt")
    assert not (out / SUMMARY).exists()
    killed = sigkill_pipeline(proc)
    assert len(killed) == 2, f"expected two worker processes, saw {killed}"
    assert phase(out) == "INITIAL_RUNNING" and not (out / SUMMARY).exists()
    unfinished = [i for i in (1, 2) if not (out / f"initial_runs/run_{i}/result.json").exists()]
    assert unfinished, "both runs finished before the kill: the test did not interrupt anything"
    # a run cut short in its 2nd round keeps its resume checkpoint (saved again on PDEATHSIG's SIGTERM);
    # one cut short in its 1st round has none and starts over
    with_resume = [i for i in unfinished if (out / f"initial_runs/run_{i}/resume.pt").exists()]

    # 2. between phases: killed right after SELECTED is written -----------------------------------
    offset = log_path.stat().st_size
    proc = start_cli(args, log_path, kill_at_phase="SELECTED")
    assert finish(proc, log_path) == -signal.SIGKILL, tail(log_path)
    events = events_of(log_path, offset)
    resumed = {e["run"] for e in events if e["event"] == "run_resumed"}
    adopted = {e["run"] for e in events if e["event"] == "run_adopted"}
    assert resumed == {f"init-{i}" for i in with_resume}, "a cut-short run continues from its resume.pt"
    assert adopted == {f"init-{i}" for i in (1, 2) if i not in unfinished}, "finished runs are not redone"
    assert phase(out) == "SELECTED" and not (out / SUMMARY).exists()
    assert not list((out / "initial_runs").rglob("resume.pt"))  # finished runs drop their resume.pt
    assert not (out / "retraining").exists()

    # 3. during retraining iteration 1, after its resume checkpoint exists ----------------------------
    offset = log_path.stat().st_size
    proc = start_cli(args, log_path)
    resume_1 = out / "retraining/iteration_1/resume.pt"
    wait_until(resume_1.exists, proc, log_path, "retraining iteration 1's resume.pt")
    assert not (out / SUMMARY).exists()
    killed = sigkill_pipeline(proc)
    assert len(killed) == 1
    events = events_of(log_path, offset)
    assert not [e for e in events if e["event"] == "run_started" and e.get("phase") == "initial"]
    state = read_json(out / "pipeline_state.json")
    assert state["phase"] == "RETRAINING" and state["iteration"] == 1 and state["retraining"] == []

    # 4. Ctrl-C during retraining iteration 2, after its resume checkpoint exists ----------------------
    offset = log_path.stat().st_size
    # the worker pauses after writing a resume checkpoint (a test hook), so that Ctrl-C reaches it mid-run
    # on a loaded machine too, instead of after the iteration (and the pipeline) already finished
    proc = start_cli(args, log_path, own_session=True, env=pause_after_resume_env(tmp_path, seconds=3))
    resume_2 = out / "retraining/iteration_2/resume.pt"
    wait_until(resume_2.exists, proc, log_path, "retraining iteration 2's resume.pt")
    running = workers(proc.pid)
    assert len(running) == 1
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground process group
    assert finish(proc, log_path) == 130, tail(log_path)
    assert not any(alive(pid) for pid in running)  # the controller waited for its worker to stop
    events = events_of(log_path, offset)
    assert "retrain-1" in {e["run"] for e in events if e["event"] == "run_resumed"}
    assert (out / "retraining/iteration_1/result.json").exists() and not resume_1.exists()
    assert resume_2.exists() and not (out / "retraining/iteration_2/result.json").exists()
    state = read_json(out / "pipeline_state.json")
    assert state["phase"] == "RETRAINING" and state["iteration"] == 2 and len(state["retraining"]) == 1
    # the worker saved on SIGTERM and said so; training.log was published with that on the way out
    published = log_events(out / "training.log")
    assert [e for e in published if e["event"] == "run_preempted" and e.get("run") == "retrain-2"]
    assert [e for e in published if e["event"] == "run_stopped" and e.get("run") == "retrain-2"]

    # 5. killed right after DONE is written, before the summary ----------------------------------------
    offset = log_path.stat().st_size
    proc = start_cli(args, log_path, kill_at_phase="DONE")
    assert finish(proc, log_path) == -signal.SIGKILL, tail(log_path)
    events = events_of(log_path, offset)
    assert "retrain-2" in {e["run"] for e in events if e["event"] == "run_resumed"}
    assert (out / "retraining/iteration_2/result.json").exists() and not resume_2.exists()
    assert phase(out) == "DONE" and not (out / SUMMARY).exists()  # the summary is written last

    # 6. the last start only writes the summary --------------------------------------------------------
    offset = log_path.stat().st_size
    proc = start_cli(args, log_path)
    assert finish(proc, log_path) == 0, tail(log_path)
    events = events_of(log_path, offset)
    assert not [e for e in events if e["event"] == "run_started"], "nothing is trained again"

    summary = read_json(out / SUMMARY)
    expected = read_json(reference / SUMMARY)
    assert comparable(summary) == comparable(expected)
    # the very same models, bit for bit, and the same files (less logs, state and per-run timings)
    got_tree, want_tree = folder_tree(out), folder_tree(reference)
    assert sorted(got_tree) == sorted(want_tree)
    for name, digest in want_tree.items():
        if name.endswith((".pt", ".csv.gz")):
            assert got_tree[name] == digest, name
        elif name.endswith("result.json"):
            got, want = read_json(out / name), read_json(reference / name)
            for r in (got, want):
                r.pop("timings"), r.pop("model_url"), r.pop("init_from")
            assert got == want, name
        elif name.endswith(EVENTS_FILE):  # the curves continue from the resume checkpoint: no gap, no repeat
            assert read_scalars([(out / name).read_bytes()]) == read_scalars([(reference / name).read_bytes()]), name
    # training.log holds every start's events, appended
    log_events_all = [e["event"] for e in log_events(out / "training.log")]
    assert log_events_all.count("pipeline_resumed") == 5
    assert log_events_all.count("pipeline_complete") == 1
    # five killed or stopped starts left no temporary log files behind (the log's buffer is anonymous)
    assert set(Path(tempfile.gettempdir()).glob("nexlify-training-*")) <= temp_files_before


def test_sigterm_stops_the_workers_saves_their_progress_and_publishes_the_log(tmp_path):
    out = tmp_path / "out"
    log_path = tmp_path / "train.log"
    proc = start_cli(train_args(str(out), "--max-iterations", "0"), log_path)
    resume_files = [out / f"initial_runs/run_{i}/resume.pt" for i in (1, 2)]
    wait_until(lambda: any(p.exists() for p in resume_files), proc, log_path, "an initial run's resume.pt")
    running = workers(proc.pid)
    assert len(running) == 2
    os.kill(proc.pid, signal.SIGTERM)  # what `kill <pid>` and a Kubernetes pod deletion send
    assert finish(proc, log_path) == 143, tail(log_path)
    assert not any(alive(pid) for pid in running)
    assert "terminated" in tail(log_path).splitlines()[-1]
    published = log_events(out / "training.log")
    stopped = {e["run"] for e in published if e["event"] == "run_stopped"}
    preempted = {e["run"]: e["saved"] for e in published if e["event"] == "run_preempted"}
    unfinished = {f"init-{i}" for i in (1, 2) if not (out / f"initial_runs/run_{i}/result.json").exists()}
    assert unfinished and unfinished <= stopped <= {"init-1", "init-2"} and set(preempted) <= stopped
    assert any(preempted.values())  # at least the run whose resume.pt we saw was in its 2nd round
    for run, saved in preempted.items():  # a run stopped in its 2nd round kept its resume checkpoint
        assert (out / f"initial_runs/run_{run[-1]}/resume.pt").exists() == saved
    assert not (out / SUMMARY).exists() and phase(out) == "INITIAL_RUNNING"
