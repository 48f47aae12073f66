"""Faults injected end to end, as a user or an operator meets them: nothing may go silently wrong.

- a concurrent start: two controllers on one output (a folder, a bucket prefix): one runs, the other
  exits 2 naming the holder, and every checkpoint was trained with the config the summary names;
- a collision between two outputs: one config run to two prefixes in one namespace never shares a
  Kubernetes Job, and a Job of another pipeline is refused by name, not adopted;
- a damaged state file: one line naming it, nothing changed; --force starts over;
- a damaged checkpoint: a truncated or hostile resume.pt is set aside and the run starts again; a
  hostile --init-from fails the run with a reason naming the file;
- a finished pipeline whose final model was deleted says what is missing instead of "done";
- workers killed with -9 leave snapshot copies in /tmp: the next worker removes them;
- --force moves the old results aside until the new pipeline has a model, and a config naming a missing
  file is refused before it touches anything;
- integrity by digest: a truncated or flipped model, result.json or data snapshot of a finished (or a
  resuming) output is named, never answered "done";
- the report is a resumable step; on a damaged summary it is one line naming the file and the field;
- one lease per output, whatever the command (train, backtest, report).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from controller.config import pipeline_id
from controller.executors.base import RunSpec
from controller.executors.kubernetes import KubernetesExecutor, job_name
from controller.executors.local import LocalExecutor
from controller.lease import LEASE_KEY, S3Lease, new_holder
from controller.stores import S3Store
from controller.worker import clean_stale_scratch
from nexlify.data import bundled_dir
from nexlify.errors import PermanentError
from tests.pipeline_support import (
    REPO, Reference, error_lines, finish, folder_tree, log_events, log_events_text, non_json_lines, read_json, run_cli,
    start_cli,
    train_args,
)
from tests.test_kubernetes_executor import (  # noqa: F401 - make_cluster is a fixture used below
    FAST_BACKOFF, dummy_spec, exit_map, k8s_settings, make_cluster, pipeline_config,
)

SUMMARY = "complete_training_summary.json"
STATE = "pipeline_state.json"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return Reference.get(tmp_path_factory)


def copy_of(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


# ---- concurrent start ----------------------------------------------------------------------------


def test_concurrent_start_on_a_fresh_folder_one_runs_the_other_exits_2(tmp_path):
    """Formerly: two controllers with different configs on one fresh output both finished, the summary
    naming config B while every checkpoint was trained with config A. Now B exits 2 and A alone trains."""
    out = tmp_path / "out"
    log_a = tmp_path / "a.log"
    a = start_cli(train_args(str(out), "--stop-loss", "0.02", "--max-iterations", "0"), log_a)
    deadline = time.monotonic() + 60
    while not (out / LEASE_KEY).exists():  # A holds the lock (it takes it before writing anything)
        assert a.poll() is None and time.monotonic() < deadline, log_a.read_text()[-3000:]
        time.sleep(0.05)
    b = run_cli(train_args(str(out), "--stop-loss", "0.03", "--max-iterations", "0"), timeout=120)
    assert finish(a, log_a) == 0, log_a.read_text()[-3000:]

    assert b.returncode == 2, b.stderr[-3000:]
    [line] = error_lines(b.stderr)
    # refused by the lock (naming A) or, if A already wrote its state, by the other-config check
    assert (f"in use by another pipeline controller (pid {a.pid} on host" in line) or ("another config" in line)
    assert non_json_lines(b.stderr) == []
    summary = read_json(out / SUMMARY)
    assert summary["config"]["risk"]["stop_loss"] == 0.02
    for run in summary["initial_runs"]:
        ckpt = torch.load(out / run["model_path"], weights_only=True)
        assert ckpt["config"]["risk"]["stop_loss"] == 0.02
    # each run executed once: one run_started per run key in A's log, none from B
    started = [e["run"] for e in log_events(log_a) if e.get("event") == "run_started" and "pid" in e]
    assert sorted(started) == ["init-1", "init-2"]
    assert not (out / LEASE_KEY).exists()  # released at the end


def test_concurrent_start_with_the_same_config_is_refused_naming_the_holder(tmp_path):
    """The same config: without the lock every run would execute twice. The second controller meets a
    live holder (a process holding the lock), exits 2 naming it, and writes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom controller.lease import LocalLease\n"
         "LocalLease(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n", str(out)],
        cwd=str(REPO), stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = folder_tree(out)
        got = run_cli(train_args(str(out)), timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert got.returncode == 2
    [line] = error_lines(got.stderr)
    assert f"output {out} is in use by another pipeline controller (pid {holder.pid} on host " in line
    assert "use another --output" in line
    assert folder_tree(out) == before  # only the holder's lease file: no config, no state, no runs


def test_concurrent_start_on_a_bucket_prefix_is_refused_by_the_lease_object(seaweed, s3_env):
    store = S3Store(seaweed.bucket, f"{s3_env}/out")
    lease = S3Lease(store, dict(new_holder(job="nexlify-train-0123abcd"), pid=4242, host="controller-pod-7"))
    lease.acquire()  # another controller (a pod of another Job) holds the prefix
    try:
        got = run_cli(train_args(f"s3://{seaweed.bucket}/{s3_env}/out"), timeout=120)
    finally:
        lease.release()
    assert got.returncode == 2, got.stderr[-3000:]
    [line] = error_lines(got.stderr)
    assert f"output s3://{seaweed.bucket}/{s3_env}/out is in use by another pipeline controller (pid 4242 on host controller-pod-7" in line
    assert "Job nexlify-train-0123abcd" in line and "expires in" in line
    assert store.list() == []  # the lease is gone (released), and the refused controller wrote nothing


# ---- a collision between two outputs --------------------------------------------------------------


def test_one_config_to_two_outputs_gives_two_job_names():
    cfg = pipeline_config("--pairs", "BTC/USDT")
    first, second = pipeline_id(cfg, "s3://bucket/run-a"), pipeline_id(cfg, "s3://bucket/run-b")
    assert first != second and len(first) == len(second) == 8
    assert pipeline_id(cfg, "s3://bucket/run-a/") == first  # a trailing slash is the same output
    assert job_name("nexlify", first, "init-1") != job_name("nexlify", second, "init-1")


def test_a_job_of_another_pipeline_is_refused_not_adopted(make_cluster):
    """Same name (a hash collision, or a Job created by hand), another output: the restarted controller
    must not take its result for its own."""
    make_cluster(image_command_map=exit_map(0, "done"))
    mine = dummy_spec()
    theirs = RunSpec(**{**mine.__dict__, "output_url": "s3://bucket/other-prefix/initial_runs/run_1"})
    other = KubernetesExecutor(k8s_settings(), pipeline_id="c0111de5", config_hash="aaaaaaaaaaaa",
                               backoff=FAST_BACKOFF)
    handle = other.start(theirs)
    assert other.wait([handle])[0].succeeded
    for spec, config_hash, says in ((mine, "aaaaaaaaaaaa", "output s3://bucket/other-prefix/initial_runs/run_1"),
                                    (theirs, "bbbbbbbbbbbb", "config hash aaaaaaaaaaaa")):
        executor = KubernetesExecutor(k8s_settings(), pipeline_id="c0111de5", config_hash=config_hash,
                                      backoff=FAST_BACKOFF)
        with pytest.raises(PermanentError) as info:
            executor.start(spec)
        message = str(info.value)
        assert f"Job {handle.job} in namespace" in message and "belongs to another pipeline" in message
        assert says in message and "is not adopted" in message and f"kubectl delete job {handle.job}" in message
    # its own pipeline still adopts it
    again = KubernetesExecutor(k8s_settings(), pipeline_id="c0111de5", config_hash="aaaaaaaaaaaa",
                               backoff=FAST_BACKOFF)
    assert again.start(theirs) == handle


# ---- a damaged state file -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "not-an-object"])
def test_a_damaged_state_file_is_named_and_nothing_changes(reference, tmp_path, damage):
    out = copy_of(reference, tmp_path)
    text = (out / STATE).read_text()
    (out / STATE).write_text({"truncated": text[: len(text) // 2], "empty": "", "not-an-object": "[1, 2]"}[damage])
    before = folder_tree(out)
    got = run_cli(train_args(str(out)), timeout=120)
    assert got.returncode == 1, got.stderr[-3000:]
    [line] = error_lines(got.stderr)
    assert f"{out / STATE} is damaged" in line and "--force" in line
    assert "Traceback" not in got.stderr and "JSONDecodeError" not in got.stderr
    assert folder_tree(out) == before


def test_force_starts_a_damaged_output_over(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    (out / STATE).write_text('{"phase": "RETRAI')
    got = run_cli(train_args(str(out), "--initial-episodes", "4", "--max-iterations", "0", "--force"), timeout=180)
    assert got.returncode == 0, got.stderr[-3000:]
    summary = read_json(out / SUMMARY)
    assert summary["config"]["initial_episodes"] == 4 and summary["retraining_iterations"] == []
    assert read_json(out / STATE)["phase"] == "DONE"
    assert not [p for p in out.glob("retraining/**/*") if p.is_file()]  # the old pipeline's files were discarded


# ---- a finished pipeline whose files are gone ----------------------------------------------------


def test_done_with_a_deleted_final_model_says_what_is_missing(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    summary = read_json(out / SUMMARY)
    model = Path(summary["final_model_path"].replace(str(reference), str(out)))
    model.unlink()
    before = folder_tree(out)
    got = run_cli(train_args(str(out)), timeout=120)
    assert got.returncode == 1
    [line] = error_lines(got.stderr)
    assert "finished, but 1 file(s) its summary names are missing" in line and str(model) in line
    assert "pipeline_already_done" not in got.stderr
    kept = {k: v for k, v in folder_tree(out).items() if k not in ("training.log", "pipeline_config.json")}
    assert kept == {k: v for k, v in before.items() if k not in ("training.log", "pipeline_config.json")}


def test_final_model_path_works_for_evaluate_from_another_folder(reference, tmp_path):
    summary = read_json(reference / SUMMARY)
    got = run_cli(["evaluate", "--model", summary["final_model_path"], "--json"], cwd=str(tmp_path), timeout=180)
    assert got.returncode == 0, got.stderr[-3000:]
    assert summary["final_model_key"] == summary["final_model_path"][len(str(reference)) + 1:]


# ---- a damaged checkpoint -------------------------------------------------------------------------

WORKER = ["worker", "train", "--run-key", "init-1", "--seed", "7", "--episodes", "2", "--pairs", "BTC/USDT",
          "--start", "2025-03-01", "--end", "2025-06-01", "--val-days", "15", "--num-envs", "2",
          "--episode-bars", "200", "--learning-starts", "64", "--batch-size", "32", "--strategies", "spot",
          "--algorithm", "dqn",  # the Q-learner reads a resume.pt; the forecast learner has none
          "--log-format", "json"]


class Hostile:
    """A pickle that runs code when loaded without weights_only (it would create a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_bytes(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"episodes_done": 1, "payload": Hostile(str(marker))}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "hostile"])
def test_a_damaged_resume_checkpoint_is_set_aside_and_the_run_restarts(tmp_path, damage):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    good = io.BytesIO()
    torch.save({"episodes_done": 1, "weights": torch.zeros(64)}, good)
    blob = good.getvalue()[:100] if damage == "truncated" else hostile_bytes(marker)
    (run / "resume.pt").write_bytes(blob)
    got = run_cli([*WORKER, "--out", str(run)], timeout=240)
    assert got.returncode == 0, got.stderr[-3000:]
    events = [json.loads(line) for line in got.stderr.splitlines() if line.startswith("{")]
    [warning] = [e for e in events if e["event"] == "resume_damaged"]
    assert warning["file"] == str(run / "resume.pt") and "starts again" in warning["action"]
    assert "weights_only=False" not in warning["reason"]
    [aside] = list(run.glob("resume.pt.damaged-*"))
    assert aside.read_bytes() == blob and warning["set_aside"] == str(aside)
    assert read_json(run / "result.json")["status"] == "succeeded"
    assert not (run / "resume.pt").exists() and not marker.exists()


def test_a_hostile_init_from_fails_the_run_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    init = tmp_path / "hostile.pt"
    init.write_bytes(hostile_bytes(marker))
    missing = tmp_path / "missing.pt"
    config = tmp_path / "config.yaml"
    config.write_text("data: {pairs: [BTC/USDT], start: '2025-03-01', end: '2025-06-01', val_days: 15}\n"
                      "env: {num_envs: 2, episode_bars: 200, strategies: [spot]}\n")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(bundled_dir() / "binance_BTC-USDT_1h.csv.gz", data)
    executor = LocalExecutor(2, progress=False)
    specs = [RunSpec(run_key=f"retrain-{i}", phase="retrain", seed=7, episodes=2, config_url=str(config),
                     data_url=str(data), output_url=str(tmp_path / f"run{i}"), init_from=str(path),
                     checkpoint_every=0)
             for i, path in enumerate((init, missing), start=1)]
    outcomes = executor.wait([executor.start(spec) for spec in specs])
    assert [o.succeeded for o in outcomes] == [False, False]
    hostile, absent = (o.reason for o in outcomes)
    assert f"--init-from {init}" in hostile and "cannot be loaded safely" in hostile
    assert "weights_only=False" not in hostile and "(invalid input)" in hostile
    assert f"--init-from {missing} does not exist" in absent
    assert not marker.exists()


# ---- stale worker scratch ------------------------------------------------------------------------


def test_stale_worker_scratch_of_dead_workers_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"nexlify-worker-{dead.pid}-abc123"
    live = tmp_path / f"nexlify-worker-{os.getpid()}-def456"
    other = tmp_path / "nexlify-worker-notapid"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "binance_BTC-USDT_1h.csv.gz").write_bytes(b"x" * 100)
    assert clean_stale_scratch(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


# ---- a worker's failure names its cause ----------------------------------------------------------

FAILING_WORKER = """
import json, sys
kind = sys.argv[1]
if kind == "disk-full":
    print(json.dumps({"event": "failed", "level": "error", "exit_code": 1,
                      "error": "cannot write /data/out/initial_runs/run_1/resume.pt: No space left on device"}),
          file=sys.stderr)
    sys.exit(1)
raise RuntimeError("CUDA error: an illegal memory access was encountered")
"""


def test_worker_failures_carry_their_cause_not_just_the_exit_code(monkeypatch, tmp_path):
    import controller.executors.local as local

    kinds = iter(["disk-full", "crash"])
    monkeypatch.setattr(local, "worker_command", lambda: [sys.executable, "-c", FAILING_WORKER, next(kinds)])
    executor = LocalExecutor(1, progress=False, prefork=False)  # fresh processes: worker_command is what runs
    specs = [RunSpec(run_key=f"init-{i}", phase="initial", seed=i, episodes=1, config_url="c", data_url="d",
                     output_url=str(tmp_path / f"run{i}"), checkpoint_every=0) for i in (1, 2)]
    disk, crash = executor.wait([executor.start(spec) for spec in specs])
    assert disk.reason == ("worker failed: cannot write /data/out/initial_runs/run_1/resume.pt: No space left on "
                           "device (exit code 1)")
    assert crash.reason == ("worker failed: RuntimeError: CUDA error: an illegal memory access was encountered "
                            "(exit code 1)")


# ---- --force: everything validated first, the old results moved aside until a new model exists ----------


def test_force_with_a_config_naming_a_missing_file_changes_nothing(reference, tmp_path):
    """utilization_csv is read by the workers: it is checked before --force touches the output."""
    out = copy_of(reference, tmp_path)
    before = folder_tree(out)
    config = tmp_path / "bad.yaml"
    config.write_text(f"lending:\n  utilization_csv: {tmp_path}/nonexistent/util.csv\n")
    got = run_cli(train_args(str(out), "--config", str(config), "--force"), timeout=120)
    assert got.returncode == 2, got.stderr[-3000:]
    [line] = error_lines(got.stderr)
    assert f"{tmp_path}/nonexistent/util.csv" in line and "does not exist" in line, line
    assert folder_tree(out) == before


def test_force_moves_the_old_results_aside_until_the_new_pipeline_has_a_model(reference, tmp_path):
    """--force killed (-9) before any new model: the old summary, models and data are all in
    .replaced-<time>/, byte for byte; the restart (no --force: the state is the new config's) deletes them
    once its first model exists."""
    out = copy_of(reference, tmp_path)
    before = folder_tree(out)
    changed = ["--initial-episodes", "4", "--max-iterations", "0"]
    log_path = tmp_path / "forced.log"
    proc = start_cli(train_args(str(out), *changed, "--force"), log_path, kill_at_phase="INITIAL_RUNNING")
    assert finish(proc, log_path) == -9
    [aside] = [p for p in out.iterdir() if p.name.startswith(".replaced-")]
    moved = {k.split("/", 1)[1]: v for k, v in folder_tree(out).items() if k.startswith(".replaced-")}
    kept = {k: v for k, v in before.items() if k not in ("pipeline.lease",)}
    assert moved == kept, set(kept) ^ set(moved)  # every file of the old pipeline, unchanged
    assert not (out / SUMMARY).exists()
    assert read_json(out / STATE)["replaced"] == aside.name

    got = run_cli(train_args(str(out), *changed), timeout=180)
    assert got.returncode == 0, got.stderr[-3000:]
    assert not aside.exists()
    assert "replaced" not in read_json(out / STATE)
    assert read_json(out / SUMMARY)["config"]["initial_episodes"] == 4
    assert "replaced_results_deleted" in [e["event"] for e in log_events(out / "training.log")]


# ---- integrity by digest: a finished output is verified on every rerun ---------------------------------------


def _final_model(out: Path) -> Path:
    return out / read_json(out / SUMMARY)["final_model_key"]


def _flip(path: Path) -> None:
    blob = path.read_bytes()
    middle = len(blob) // 2
    path.write_bytes(blob[:middle] + bytes(b ^ 0xFF for b in blob[middle:middle + 8]) + blob[middle + 8:])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (case, what to damage in a copy of the finished reference, the file the one error line must name)
DONE_DAMAGE = [
    ("final model truncated", lambda out: _truncate(_final_model(out)), _final_model),
    ("final model with 8 bytes flipped", lambda out: _flip(_final_model(out)), _final_model),
    ("a run's result.json truncated", lambda out: _truncate(out / "initial_runs/run_2/result.json"),
     lambda out: out / "initial_runs/run_2/result.json"),
    ("a retraining result.json emptied", lambda out: (out / "retraining/iteration_1/result.json").write_bytes(b""),
     lambda out: out / "retraining/iteration_1/result.json"),
    ("the data snapshot truncated", lambda out: _truncate(next((out / "data").iterdir())),
     lambda out: next((out / "data").iterdir())),
]


@pytest.fixture(scope="module")
def done_damage_results(reference, tmp_path_factory) -> dict:
    """Every damaged copy rerun at once: {case: (completed process, output, tree before)}."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("done-damage")

    def run(case):
        name, damage, _ = case
        out = base / name.replace(" ", "-").replace("'", "") / "out"
        shutil.copytree(reference, out)
        damage(out)
        before = folder_tree(out)
        return name, (run_cli(train_args(str(out)), timeout=180), out, before)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, DONE_DAMAGE))


@pytest.mark.parametrize("case", DONE_DAMAGE, ids=[c[0] for c in DONE_DAMAGE])
def test_a_damaged_file_of_a_finished_output_is_named_never_done(done_damage_results, case):
    name, _, named = case
    got, out, before = done_damage_results[name]
    assert got.returncode == 1, got.stderr[-3000:]
    [line] = error_lines(got.stderr)
    assert str(named(out)) in line and "is damaged: its sha256" in line and "--force" in line, line
    assert "pipeline_already_done" not in got.stderr and "Traceback" not in got.stderr
    tree = folder_tree(out)
    for key in ("training.log", "pipeline_config.json"):  # this start's log, and its config naming the copy's folder
        tree.pop(key), before.pop(key)
    assert tree == before  # named; no run, model, data or summary changed


def test_a_damaged_result_of_the_selected_run_stops_a_resume(reference, tmp_path):
    """Mid-pipeline (SELECTED, retraining to come): the selected run's result.json was truncated after the
    state recorded it. The resume names it instead of retraining from a model nobody can vouch for."""
    out = copy_of(reference, tmp_path)
    state = read_json(out / STATE)
    for key in ("stop_reason", "iteration", "summary_sha256"):
        state.pop(key, None)
    state.update(phase="SELECTED", retraining=[], patience_count=0)
    (out / STATE).write_text(json.dumps(state))
    for p in [out / SUMMARY, out / "report.html", *[p for p in (out / "retraining").rglob("*") if p.is_file()]]:
        p.unlink()
    selected = out / f"initial_runs/run_{state['best_initial_run']}/result.json"
    _truncate(selected)
    got = run_cli(train_args(str(out)), timeout=120)
    assert got.returncode == 1, got.stderr[-3000:]
    [line] = error_lines(got.stderr)
    assert "cannot resume" in line and f"{selected} is damaged: its sha256" in line, line
    assert "run_started" not in got.stderr


def test_the_report_is_a_resumable_step_and_stale_temp_folders_go(reference, tmp_path):
    """kill -9 while report.html was being built leaves no report and a nexlify-report-<pid>-* folder: the
    rerun builds the report (it never answers 'done' without one) and removes the dead process's folder."""
    out = copy_of(reference, tmp_path)
    (out / "report.html").unlink()
    scratch = tmp_path / "tmp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = scratch / f"nexlify-report-{dead.pid}-abc123"
    (stale / "data").mkdir(parents=True)
    (stale / "model.pt").write_bytes(b"x" * 1000)
    got = run_cli(train_args(str(out)), timeout=180, env={"TMPDIR": str(scratch)})
    assert got.returncode == 0, got.stderr[-3000:]
    names = [e["event"] for e in log_events(out / "training.log")]
    assert "pipeline_already_done" in names and "report_written" in names
    assert (out / "report.html").stat().st_size > 10_000
    assert not stale.exists()  # the dead process's folder, and this one's own:
    assert not [p for p in scratch.iterdir() if p.name.startswith("nexlify-report-")]


# ---- one writer per output, whatever the command -----------------------------------------------------------


def _hold(out: Path, command: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom controller.lease import LocalLease, new_holder\n"
         "LocalLease(sys.argv[1], new_holder(command=sys.argv[2])).acquire()\nprint('held', flush=True)\n"
         "time.sleep(300)\n", str(out), command],
        cwd=str(REPO), stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_every_command_that_writes_an_output_meets_the_same_lease(reference, tmp_path):
    """train holds an output: backtest and report exit 2 naming it; backtest holds one: train and a second
    backtest exit 2 naming `nexlify backtest`. Nothing is written by the refused command."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_backtest import TINY_WF

    out = copy_of(reference, tmp_path)
    wf = tmp_path / "wf"
    wf.mkdir()
    holders = [_hold(out, "train"), _hold(wf, "backtest")]
    try:
        before = (folder_tree(out), folder_tree(wf))
        commands = {
            "backtest into train's output": ["backtest", "--walk-forward", *TINY_WF, "--output", str(out)],
            "report into train's output": ["report", str(out)],
            "a second backtest": ["backtest", "--walk-forward", *TINY_WF, "--output", str(wf)],
            "train into a backtest's output": train_args(str(wf)),
        }
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = dict(zip(commands, pool.map(lambda args: run_cli([*args, "--log-format", "json"]
                                                                    if args[0] != "train" else args, timeout=180),
                                              commands.values())))
        after = (folder_tree(out), folder_tree(wf))
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    for name, proc in got.items():
        assert proc.returncode == 2, (name, proc.stderr[-3000:])
        [line] = error_lines(proc.stderr)
        holder = holders[0] if "train's" in name else holders[1]
        what = "pipeline controller" if "train's" in name else "`nexlify backtest`"
        assert f"is in use by another {what} (pid {holder.pid} on host" in line, (name, line)
    assert after == before


def test_backtest_preflight_failure_is_one_error_line_and_a_failed_event(tmp_path):
    from tests.test_backtest import TINY_WF

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for fmt in ("json", "console"):
        got = run_cli(["backtest", "--walk-forward", *TINY_WF, "--output", str(blocker / "out"), "--log-format", fmt],
                      timeout=120)
        assert got.returncode == 2, got.stderr[-3000:]
        [line] = error_lines(got.stderr)
        assert line.startswith("error: preflight failed: output") and str(blocker) in line, line
        if fmt == "json":
            assert [e["event"] for e in log_events_text(got.stderr)][-1] == "failed"


# ---- the report on a damaged summary: one line naming the file and the field, exit 1 ------------------------


def _edit(change):
    def damage(out: Path) -> None:
        summary = read_json(out / SUMMARY)
        change(summary)
        (out / SUMMARY).write_text(json.dumps(summary))
    return damage


REPORT_DAMAGE = [
    ("truncated", lambda out: _truncate(out / SUMMARY), "not valid JSON"),
    ("empty", lambda out: (out / SUMMARY).write_bytes(b""), "is damaged: empty"),
    ("binary", lambda out: (out / SUMMARY).write_bytes(bytes(range(256)) * 4), "not valid JSON"),
    ("a JSON list", lambda out: (out / SUMMARY).write_text("[1, 2]"), "a JSON list, not an object"),
    ("no initial_runs", _edit(lambda s: s.pop("initial_runs")), "field 'initial_runs' is missing; expected a list"),
    ("initial_runs of the wrong type", _edit(lambda s: s.update(initial_runs="x")),
     "field 'initial_runs' is str 'x'; expected a list"),
    ("final_model_key naming no run", _edit(lambda s: s.update(final_model_key="initial_runs/run_9/model.pt")),
     "field 'final_model_key' is 'initial_runs/run_9/model.pt', which names none of its runs' models"),
    ("no selection", _edit(lambda s: s.pop("selection")), "field 'selection' is missing"),
    ("a NaN score", _edit(lambda s: s["initial_runs"][1].update(val_score=float("nan"))),
     "field 'initial_runs[1].val_score' is nan; expected a finite number"),
    ("pipeline_complete false", _edit(lambda s: s.update(pipeline_complete=False)),
     "field 'pipeline_complete' is False"),
    ("the data snapshot truncated", lambda out: _truncate(next((out / "data").iterdir())), "is damaged: its sha256"),
]


@pytest.fixture(scope="module")
def report_damage_results(reference, tmp_path_factory) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("report-damage")

    def run(case):
        name, damage, _ = case
        root = base / name.replace(" ", "-")
        out = root / "out"
        shutil.copytree(reference, out)
        (out / "report.html").unlink()
        damage(out)
        (root / "tmp").mkdir()
        before = folder_tree(out)
        got = run_cli(["report", str(out), "--log-format", "json"], timeout=180, env={"TMPDIR": str(root / "tmp")})
        return name, (got, out, before, root / "tmp")

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, REPORT_DAMAGE))


@pytest.mark.parametrize("case", REPORT_DAMAGE, ids=[c[0] for c in REPORT_DAMAGE])
def test_report_on_a_damaged_output_is_one_line_naming_file_and_field(report_damage_results, case):
    name, _, text = case
    got, out, before, scratch = report_damage_results[name]
    assert got.returncode == 1, got.stderr[-3000:]
    [line] = error_lines(got.stderr)
    named = next((out / "data").iterdir()) if "snapshot" in name else out / SUMMARY
    assert f"{named} " in line and text in line, line  # the output's own file, never a temporary copy
    assert "Traceback" not in got.stderr and non_json_lines(got.stderr) == []
    assert folder_tree(out) == before  # no report, no lease file left
    assert not [p for p in scratch.iterdir() if p.name.startswith("nexlify-report-")]  # no temp folder
