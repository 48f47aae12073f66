"""The tiny pipeline against a real S3 server (SeaweedFS on loopback), killed with SIGKILL during its initial
runs and started again: the summary must equal the local uninterrupted run's, the models bit for bit.
Also: bad input against a bucket writes nothing under the prefix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pipeline_support import (
    Reference,
    comparable,
    error_lines,
    finish,
    folder_tree,
    log_events,
    read_json,
    run_cli,
    sha256,
    sigkill_pipeline,
    start_cli,
    tail,
    train_args,
    wait_until,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return Reference.get(tmp_path_factory)


class Bucket:
    """Reading the pipeline's output prefix directly with boto3 (not through the code under test)."""

    def __init__(self, seaweed, prefix: str) -> None:
        self.client = seaweed.client()
        self.bucket = seaweed.bucket
        self.prefix = prefix

    def keys(self) -> list[str]:
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self.prefix + "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.client.list_objects_v2(**kwargs)
            keys += [o["Key"][len(self.prefix) + 1:] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

    def exists(self, key: str) -> bool:
        return key in self.keys()


def test_s3_pipeline_killed_and_resumed_equals_the_local_run(seaweed, s3_env, reference, tmp_path):
    bucket = Bucket(seaweed, f"{s3_env}/out")
    output = f"s3://{seaweed.bucket}/{s3_env}/out"
    log_path = tmp_path / "train.log"
    args = train_args(output)

    proc = start_cli(args, log_path)
    wait_until(lambda: any(k.endswith("/resume.pt") for k in bucket.keys()), proc, log_path,
               "a resume.pt in the bucket", poll_s=0.1)
    workers = sigkill_pipeline(proc)
    assert len(workers) == 2
    assert "complete_training_summary.json" not in bucket.keys()
    assert json.loads(bucket.read("pipeline_state.json"))["phase"] == "INITIAL_RUNNING"

    offset = log_path.stat().st_size
    proc = start_cli(args, log_path)
    assert finish(proc, log_path) == 0, tail(log_path)
    resumed_part = log_path.with_suffix(".part")
    resumed_part.write_bytes(log_path.read_bytes()[offset:])
    assert "pipeline_resumed" in [e["event"] for e in log_events(resumed_part)]

    summary = json.loads(bucket.read("complete_training_summary.json"))
    expected = read_json(reference / "complete_training_summary.json")
    assert comparable(summary) == comparable(expected)
    assert summary["config"]["output"] == output
    assert summary["final_model_url"] == summary["final_model_path"] == f"{output}/{summary['final_model_key']}"

    # the same files as the local run, models and data snapshot bit for bit
    local = folder_tree(reference)
    assert bucket.keys() == sorted(local)
    for name, digest in local.items():
        if name.endswith((".pt", ".csv.gz")):
            assert sha256(bucket.read(name)) == digest, name
    for f in summary["data"]["files"]:
        assert sha256(bucket.read(f["key"])) == f["sha256"]
    events = [e["event"] for e in log_events_from_bytes(bucket.read("training.log"), tmp_path)]
    assert events.count("pipeline_complete") == 1 and events.count("pipeline_resumed") == 1

    # the summary's final_model_path is usable as it stands: evaluate reads the model from the bucket
    got = run_cli(["evaluate", "--model", summary["final_model_path"], "--json"], cwd=str(tmp_path), timeout=180)
    assert got.returncode == 0, got.stderr[-3000:]
    local_eval = run_cli(["evaluate", "--model", str(reference / summary["final_model_key"]), "--json"], timeout=180)
    from_bucket, from_folder = json.loads(got.stdout), json.loads(local_eval.stdout)
    from_bucket.pop("model"), from_folder.pop("model")  # where it was read from
    assert from_bucket == from_folder  # the same model, bit for bit


def log_events_from_bytes(blob: bytes, tmp_path: Path) -> list[dict]:
    path = tmp_path / "bucket-training.log"
    path.write_bytes(blob)
    return log_events(path)


@pytest.mark.parametrize("bad, named", [
    (["--val-days", "1000"], "1000"),
    (["--pairs", "NOPE/USDT"], "NOPE/USDT"),
])
def test_bad_input_writes_nothing_under_the_bucket_prefix(seaweed, s3_env, bad, named):
    bucket = Bucket(seaweed, f"{s3_env}/out")
    got = run_cli(["train", "--output", f"s3://{seaweed.bucket}/{s3_env}/out", *bad], timeout=120)
    assert got.returncode == 2
    errors = error_lines(got.stderr)
    assert len(errors) == 1 and named in errors[0]
    assert bucket.keys() == []
