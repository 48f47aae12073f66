"""Faults injected end to end, as a user or an operator meets them: nothing may go silently wrong.

- a concurrent start: two controllers on one output (a folder, a bucket prefix): one runs, the other
  exits 2 naming the holder, and every checkpoint was trained with the config the summary names;
- a collision between two outputs: one config run to two prefixes in one namespace never shares a
  Kubernetes Job, and a Job of another pipeline is refused by name, not adopted;
- a damaged state file: one line naming it, nothing changed; --force starts over;
- a damaged checkpoint: a truncated or hostile resume.pt is set aside and the run starts again; a
  hostile --init-from fails the run with a reason naming the file;
- a finished pipeline whose final model was deleted says what is missing instead of "done";
- workers killed with -9 leave snapshot copies in /tmp: the next worker removes them.
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
    REPO, Reference, error_lines, finish, folder_tree, log_events, non_json_lines, read_json, run_cli, start_cli,
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
    executor = LocalExecutor(1, progress=False)
    specs = [RunSpec(run_key=f"init-{i}", phase="initial", seed=i, episodes=1, config_url="c", data_url="d",
                     output_url=str(tmp_path / f"run{i}"), checkpoint_every=0) for i in (1, 2)]
    disk, crash = executor.wait([executor.start(spec) for spec in specs])
    assert disk.reason == ("worker failed: cannot write /data/out/initial_runs/run_1/resume.pt: No space left on "
                           "device (exit code 1)")
    assert crash.reason == ("worker failed: RuntimeError: CUDA error: an illegal memory access was encountered "
                            "(exit code 1)")
