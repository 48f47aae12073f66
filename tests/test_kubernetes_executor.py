"""The Kubernetes executor against the strict fake API server (tests/fake_k8s), with SeaweedFS as the bucket.

From the inside out: the pure parts (Job names, the manifest and its variants validated with
kubernetes-validate strict, failure descriptions, backoff), then the executor on Jobs whose container
is a tiny stand-in program (watch drops, 410, API errors, Kueue, deadlines, OOM, adoption), then the
real thing: the quick pipeline through the fake cluster, whose pods run the real `nexlify worker train`,
compared with the local executor on the same config; a controller killed with SIGKILL mid-pipeline and
started again; an evicted worker that resumes from its SIGTERM checkpoint.

Every cluster checks at teardown that each API call it recorded is allowed by
controller/executors/kubernetes_rbac.py (the list the Helm chart's Role is checked against).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from structlog.testing import capture_logs

from controller.cli import build_parser, resolve_pipeline_config
from controller.config import KubernetesConfig, PipelineConfig
from controller.executors import kubernetes_rbac
from controller.executors.backoff import Backoff, delay_for
from controller.executors.base import RunSpec
from controller.executors.kubernetes import (KubernetesExecutor, check_cluster, job_manifest, job_name,
                                             owner_from_environment)
from controller.executors.kubernetes_client import config_source
from controller.executors.kubernetes_status import (PodProblem, describe_failure, is_terminal, job_state,
                                                    pod_problem)
from controller.executors.local import LocalExecutor
from controller.pipeline import Pipeline
from controller.run import run_pipeline
from controller.stores import open_store
from nexlify.errors import InputError, PermanentError, TemporaryError
from tests.fake_k8s import FakeCluster
from tests.fake_k8s.resources import EVENTS, JOBS, SECRETS

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "nexlify-test"
SECRET = "nexlify-s3"
IMAGE = "registry.example/nexlify-train:test"
KUBE_VERSION = "1.33"
WORKER_MAP = {"nexlify": [sys.executable, "-m", "controller"]}  # the image's `nexlify` = this checkout
QUICK_FLAGS = [
    "--pairs", "BTC/USDT", "--start", "2024-11-01", "--end", "2025-06-01", "--val-days", "30",
    "--initial-runs", "2", "--initial-episodes", "8", "--retrain-episodes", "4", "--num-envs", "4",
    "--episode-bars", "300", "--max-iterations", "1", "--checkpoint-every", "4",
    "--learning-starts", "256", "--batch-size", "64",
    "--algorithm", "dqn",  # the Q-learner trains in rounds: an evicted worker resumes from its checkpoint
]
PIPELINE_TIMEOUT_S = 240.0
FAST_BACKOFF = lambda: Backoff(initial=0.05, cap=0.2, budget=20.0)  # noqa: E731 - a factory
GATE_PROGRAM = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.05)\n"


# ============================================================================================ helpers


def pipeline_config(*flags: str) -> PipelineConfig:
    """A PipelineConfig exactly as `nexlify train <flags>` resolves it."""
    return resolve_pipeline_config(build_parser().parse_args(["train", *flags]))


def k8s_flags(endpoint: str) -> list[str]:
    return ["--executor", "kubernetes", "--namespace", NAMESPACE, "--name", "nexlify", "--image", IMAGE,
            "--s3-secret", SECRET, "--s3-endpoint", endpoint]


def k8s_settings(**overrides: Any) -> KubernetesConfig:
    return KubernetesConfig(**{"namespace": NAMESPACE, "image": IMAGE, **overrides})


def dummy_spec(run_key: str = "init-1", seed: int = 42) -> RunSpec:
    return RunSpec(run_key=run_key, phase="initial" if run_key.startswith("init") else "retrain", seed=seed,
                   episodes=8, config_url="s3://bucket/p/pipeline_config.json", data_url="s3://bucket/p/data",
                   output_url=f"s3://bucket/p/initial_runs/run_{run_key.split('-')[-1]}", checkpoint_every=4)


def comparable(summary: dict) -> dict:
    """A summary without what differs between two places that ran it: timings and output locations."""
    s = copy.deepcopy(summary)
    for key in ("timings", "final_model_url", "final_model_path", "pipeline_id"):  # the id covers the output
        s.pop(key)
    for key in ("output", "executor", "kubernetes", "parallel"):
        s["config"].pop(key, None)
    for run in s["initial_runs"] + s["retraining_iterations"]:
        run.pop("timings", None)
        run.pop("result_sha256", None)  # the digest of a result.json, which holds the timings and the output
    return s


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like values differ (for a readable assertion message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in differences(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{path}/{key}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def assert_same_summary(summary: dict, reference: dict) -> None:
    diff = differences(comparable(summary), comparable(reference))
    assert not diff, "summaries differ:\n" + "\n".join(diff[:20])


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_events(cluster: FakeCluster, job: str, reason: str) -> list[dict]:
    items, _ = cluster.store.list(EVENTS, NAMESPACE)
    return [e for e in items if e["involvedObject"]["name"] == job and e["reason"] == reason]


def call_rule(call) -> tuple[str, str, str]:
    resource = f"{call.resource}/{call.subresource}" if call.subresource else call.resource
    return call.group, resource, call.verb


def disallowed(calls) -> list[tuple[str, str, str]]:
    return sorted({call_rule(c) for c in calls if not kubernetes_rbac.allows(*call_rule(c))})


class Cluster:
    """A started FakeCluster with the test namespace, the S3 Secret, a kubeconfig, and a count of the
    objects really created per (resource, name) (the request log has no name for a create)."""

    def __init__(self, cluster: FakeCluster, kubeconfig: Path) -> None:
        self.fake = cluster
        self.kubeconfig = kubeconfig
        self.created: Counter[tuple[str, str]] = Counter()
        original = cluster.store.create

        def counting_create(rt, obj):
            stored = original(rt, obj)
            self.created[(rt.resource, stored["metadata"]["name"])] += 1
            return stored

        cluster.store.create = counting_create  # type: ignore[method-assign]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fake, name)

    def job(self, name: str) -> dict:
        job = self.fake.get("jobs", name, NAMESPACE)
        assert job is not None, f"Job {name} does not exist"
        return job

    def jobs_created(self) -> dict[str, int]:
        return {name: n for (resource, name), n in self.created.items() if resource == "jobs"}

    def calls(self, verb: str, resource: str, subresource: str = "") -> int:
        wanted = (verb, resource, subresource)
        return sum(1 for c in self.fake.requests if (c.verb, c.resource, c.subresource) == wanted)


@pytest.fixture(scope="module")
def s3(seaweed):
    """The SeaweedFS server as this module's S3 (boto3 in this process and in its children)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_S3_ADDRESSING_STYLE",
                     "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/nexlify-test-aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/nexlify-test-aws-credentials")
        for name, value in seaweed.env().items():
            mp.setenv(name, value)
        yield seaweed


@pytest.fixture
def make_cluster(tmp_path, monkeypatch):
    """make_cluster(**FakeCluster kwargs) -> Cluster, with KUBECONFIG pointing at it."""
    started: list[Cluster] = []

    def make(*, s3_server=None, **kwargs: Any) -> Cluster:
        python_path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        kwargs.setdefault("image_command_map", WORKER_MAP)
        fake = FakeCluster(kubernetes_version=KUBE_VERSION, base_env={"PYTHONPATH": python_path}, **kwargs).start()
        kubeconfig = fake.kubeconfig(tmp_path / f"kubeconfig-{len(started)}")
        cluster = Cluster(fake, kubeconfig)
        started.append(cluster)
        fake.create_namespace(NAMESPACE)
        if s3_server is not None:  # the workers' credentials, as an operator would store them
            data = {k: base64.b64encode(v.encode()).decode() for k, v in s3_server.env().items()
                    if k != "AWS_ENDPOINT_URL"}
            fake.store.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                        "metadata": {"name": SECRET, "namespace": NAMESPACE}, "data": data})
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        return cluster

    yield make
    errors, forbidden = [], []
    for cluster in started:
        errors += cluster.fake.errors
        forbidden += disallowed(cluster.fake.requests)
        cluster.fake.stop()
    assert not errors, "fake_k8s internal errors:\n" + "\n".join(errors)
    assert not forbidden, f"API calls not allowed by kubernetes_rbac.py: {forbidden}"


def gate_map(gate: Path) -> dict[str, list[str]]:
    """The container waits until `gate` exists, then exits 0 (a run that ends when the test says so)."""
    return {"nexlify": [sys.executable, "-c", GATE_PROGRAM, str(gate)]}


def exit_map(code: int, output: str = "", after_s: float = 0.0) -> dict[str, list[str]]:
    """The container prints `output`, waits `after_s` seconds and exits with `code`."""
    program = f"import sys, time\nprint({output!r}, flush=True)\ntime.sleep({after_s})\nsys.exit({code})"
    return {"nexlify": [sys.executable, "-c", program]}


# ================================================================================= names and manifest


def test_job_names_are_deterministic_dns_labels_within_63_characters():
    assert job_name("nexlify", "3f2a9c1e", "init-1") == "nexlify-3f2a9c1e-init-1"
    assert job_name("nexlify", "3f2a9c1e", "retrain-12") == "nexlify-3f2a9c1e-retrain-12"
    long_a, long_b = "a" * 70, "a" * 69 + "b"
    name_a = job_name(long_a, "3f2a9c1e", "retrain-12")
    # 63 = kept prefix (36) + "-" + 6 hash characters + "-3f2a9c1e-retrain-12" (20)
    assert len(name_a) == 63
    assert name_a.startswith("a" * 36 + "-") and name_a.endswith("-3f2a9c1e-retrain-12")
    assert name_a == job_name(long_a, "3f2a9c1e", "retrain-12")  # stable across restarts
    assert job_name(long_b, "3f2a9c1e", "retrain-12") != name_a  # different prefixes stay apart
    edge = "n" * (63 - len("-3f2a9c1e-init-1"))
    assert job_name(edge, "3f2a9c1e", "init-1") == edge + "-3f2a9c1e-init-1"  # exactly 63: kept whole
    for bad in ("Nexlify", "nex_lify", "-nexlify", "nexlify-", ""):
        with pytest.raises(InputError, match="--name"):
            job_name(bad, "3f2a9c1e", "init-1")


def test_manifest_runs_the_same_worker_args_with_labels_policy_and_hardening():
    spec = dummy_spec("init-2", seed=1042)
    job = job_manifest(spec, k8s_settings(), "3f2a9c1e")
    assert kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    assert job["metadata"]["name"] == "nexlify-3f2a9c1e-init-2"
    labels = {
        "app.kubernetes.io/name": "nexlify-train", "app.kubernetes.io/instance": "nexlify",
        "app.kubernetes.io/component": "worker", "app.kubernetes.io/managed-by": "nexlify-controller",
        "nexlify.io/pipeline": "3f2a9c1e", "nexlify.io/phase": "initial", "nexlify.io/run": "init-2",
    }
    assert job["metadata"]["labels"] == labels
    assert job["spec"]["template"]["metadata"]["labels"] == labels
    assert "ownerReferences" not in job["metadata"]
    spec_ = job["spec"]
    assert (spec_["backoffLimit"], spec_["activeDeadlineSeconds"], spec_["ttlSecondsAfterFinished"]) == \
        (2, 6 * 3600, 7 * 24 * 3600)
    assert spec_["podReplacementPolicy"] == "Failed"
    assert "suspend" not in spec_
    assert spec_["podFailurePolicy"] == {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2, 3]}},
    ]}
    pod = spec_["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                      "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    [container] = pod["containers"]
    assert container["name"] == "worker" and container["image"] == IMAGE
    assert container["command"] == ["nexlify"]
    # the worker's threads come from its CPU request (1 by default)
    assert container["args"] == spec.worker_args() + ["--threads", "1"]
    assert spec.worker_args() == [
        "worker", "train", "--run-key", "init-2", "--seed", "1042", "--episodes", "8",
        "--config", "s3://bucket/p/pipeline_config.json", "--data-snapshot", "s3://bucket/p/data",
        "--out", "s3://bucket/p/initial_runs/run_2", "--checkpoint-every", "4"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"NEXLIFY_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", "TMPDIR": "/tmp", "HOME": "/tmp"}
    assert "envFrom" not in container  # no Secret named: IRSA / workload identity
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}


@pytest.mark.parametrize("request_, threads", [
    ("1", ["--threads", "1"]), ("2", ["--threads", "2"]), ("1500m", ["--threads", "2"]), ("250m", ["--threads", "1"]),
    ("2000m", ["--threads", "2"]), ("2.5", ["--threads", "3"]), ("", []),
])
def test_manifest_worker_threads_follow_the_cpu_request(request_, threads):
    """A pod's threads are the CPUs its request reserves, rounded up (nexlify.cpus.cpus_of_request); no request
    leaves the config's threads alone (no flag)."""
    spec = dummy_spec("init-1", seed=42)
    job = job_manifest(spec, k8s_settings(cpu_request=request_), "3f2a9c1e")
    assert kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == spec.worker_args() + threads


def test_manifest_refuses_a_cpu_request_that_is_not_a_cpu_count():
    with pytest.raises(InputError, match=r"--cpu-request '4Gi': accepted: a CPU quantity"):
        job_manifest(dummy_spec("init-1", seed=42), k8s_settings(cpu_request="4Gi"), "3f2a9c1e")


def test_manifest_variants_gpu_placement_kueue_secret_owner_validate_strictly():
    cfg = k8s_settings(
        gpus=2, cpu_request="4", memory_request="16Gi", cpu_limit="8", memory_limit="32Gi",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"}]}]}}},
        priority_class_name="training-high", kueue_queue="team-a", worker_service_account="nexlify-worker",
        s3_secret="nexlify-s3", s3_endpoint="http://seaweedfs.storage:8333", backoff_limit=5,
        active_deadline_seconds=3600, ttl_seconds_after_finished=600)
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "nexlify-controller-1a2b", "uid": "0b5d-uid",
             "blockOwnerDeletion": True, "controller": False}
    job = job_manifest(dummy_spec("retrain-3", seed=2042), cfg, "3f2a9c1e", owner=owner)
    assert kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    assert job["metadata"]["ownerReferences"] == [owner]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["nexlify.io/phase"] == "retrain"
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    assert job["spec"]["suspend"] is True
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"],
            job["spec"]["ttlSecondsAfterFinished"]) == (5, 3600, 600)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "nexlify-worker"
    assert pod["priorityClassName"] == "training-high"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == cfg.tolerations and pod["affinity"] == cfg.affinity
    [container] = pod["containers"]
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"},
                                      "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}}
    assert container["args"][-2:] == ["--threads", "4"]  # the request, not the limit
    assert container["envFrom"] == [{"secretRef": {"name": "nexlify-s3"}}]
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://seaweedfs.storage:8333"} in container["env"]
    assert not any("AWS_SECRET" in json.dumps(e) for e in container["env"])  # never a credential inline
    with pytest.raises(InputError, match="--memory-limit '4GB'"):
        job_manifest(dummy_spec(), k8s_settings(memory_limit="4GB"), "3f2a9c1e")


@pytest.mark.parametrize("extra, expected_limits", [
    ({"limits": {"amd.com/gpu": "1"}}, {"memory": "4Gi", "amd.com/gpu": "1"}),
    ({"limits": {"nvidia.com/mig-1g.10gb": 2, "ephemeral-storage": "20Gi"}},
     {"memory": "4Gi", "nvidia.com/mig-1g.10gb": "2", "ephemeral-storage": "20Gi"}),
    ({"limits": {"memory": ""}}, None),  # '' unsets the memory limit of the flat settings
])
def test_any_resource_name_reaches_the_worker_container(extra, expected_limits):
    job = job_manifest(dummy_spec(), k8s_settings(resources=extra), "3f2a9c1e")
    assert kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "1", "memory": "2Gi"}
    assert resources.get("limits") == expected_limits


@pytest.mark.parametrize("extra, says", [
    ({"limits": {"amd.com/gpu": "one"}}, "kubernetes.resources.limits.amd.com/gpu 'one'"),
    ({"limits": {"bad name!": "1"}}, "'bad name!' is not a resource name"),
    ({"claims": []}, "accepted: a mapping with requests and/or limits"),
])
def test_bad_resources_are_refused_by_name(extra, says):
    with pytest.raises(InputError, match=re.escape(says)):
        job_manifest(dummy_spec(), k8s_settings(resources=extra), "3f2a9c1e")


def test_worker_pod_security_context_annotations_and_labels_come_from_the_settings():
    default = job_manifest(dummy_spec(), k8s_settings(), "3f2a9c1e")["spec"]["template"]
    assert default["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                                  "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
    assert "annotations" not in default["metadata"]
    cfg = k8s_settings(pod_security_context={"runAsNonRoot": True, "runAsUser": 2000, "fsGroup": 2000},
                       container_security_context={"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                                   "readOnlyRootFilesystem": True,
                                                   "capabilities": {"drop": ["ALL"], "add": ["SYS_NICE"]}},
                       pod_annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
                       pod_labels={"team": "quant", "nexlify.io/run": "spoofed"})
    job = job_manifest(dummy_spec(), cfg, "3f2a9c1e")
    assert kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    template = job["spec"]["template"]
    assert template["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 2000, "fsGroup": 2000}
    assert template["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] == ["SYS_NICE"]
    assert template["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    assert template["metadata"]["labels"]["team"] == "quant"
    assert template["metadata"]["labels"]["nexlify.io/run"] == "init-1"  # the controller's own labels win


def test_owner_reference_comes_from_the_setting_or_the_chart_environment():
    env = {"NEXLIFY_OWNER_JOB": "nexlify-ctl-9", "NEXLIFY_OWNER_JOB_UID": "uid-9"}
    assert owner_from_environment("", env) == ("nexlify-ctl-9", "uid-9")  # under a CronJob
    assert owner_from_environment("nexlify-ctl-9", env) == ("nexlify-ctl-9", "uid-9")
    assert owner_from_environment("other-job", env) == ("other-job", "")  # uid looked up with a GET
    assert owner_from_environment("", {}) == ("", "")  # on a laptop: no owner


def test_config_source_in_a_pod_or_from_kubeconfig():
    pod_env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert config_source(pod_env, token_file_exists=True) == "in-cluster"
    assert config_source(pod_env, token_file_exists=False) == "kubeconfig"
    assert config_source({**pod_env, "KUBECONFIG": "/etc/kube/config"}, token_file_exists=True) == "kubeconfig"
    assert config_source({}, token_file_exists=True) == "kubeconfig"


# ================================================================================ reading status


def _job(conditions: list[tuple[str, str]] = (), suspend: bool = False, active: int = 0, failed: int = 0) -> dict:
    return {"metadata": {"name": "nexlify-3f2a9c1e-init-1", "namespace": NAMESPACE},
            "spec": {"suspend": suspend, "backoffLimit": 2},
            "status": {"active": active, "failed": failed,
                       "conditions": [{"type": t, "status": "True", "reason": r, "message": f"{r} message"}
                                      for t, r in conditions]}}


def _pod(name: str, *, terminated: dict | None = None, waiting: dict | None = None, conditions=(),
         phase: str = "Failed") -> dict:
    state = {"terminated": terminated} if terminated else {"waiting": waiting} if waiting else {"running": {}}
    return {"metadata": {"name": name, "creationTimestamp": "2025-01-01T00:00:00Z",
                         "ownerReferences": [{"kind": "Job", "name": "nexlify-3f2a9c1e-init-1", "controller": True}]},
            "status": {"phase": phase, "conditions": [dict(c) for c in conditions],
                       "containerStatuses": [{"name": "worker", "state": state}]}}


@pytest.mark.parametrize("job, state", [
    (_job(), "pending"),
    (_job(active=1), "running"),
    (_job([("SuccessCriteriaMet", "CompletionsReached")]), "pending"),  # interim: pods may still run
    (_job([("FailureTarget", "BackoffLimitExceeded")], active=1), "running"),  # interim
    (_job([("SuccessCriteriaMet", "CompletionsReached"), ("Complete", "CompletionsReached")]), "complete"),
    (_job([("FailureTarget", "DeadlineExceeded"), ("Failed", "DeadlineExceeded")]), "failed"),
    (_job(suspend=True), "suspended"),  # Kueue has not admitted it yet: waiting, not failed
])
def test_only_complete_and_failed_are_terminal(job, state):
    assert job_state(job) == state
    assert is_terminal(job) == (state in ("complete", "failed"))


def test_failure_descriptions_name_the_cause_and_what_to_do():
    cfg = k8s_settings(s3_secret=SECRET)
    oom = _pod("p-oom", terminated={"reason": "OOMKilled", "exitCode": 137})
    report = describe_failure(_job([("Failed", "BackoffLimitExceeded")], failed=3), [oom], cfg)
    assert report.reason.startswith("Job nexlify-3f2a9c1e-init-1 failed (BackoffLimitExceeded): pod p-oom "
                                    "OOMKilled, exit code 137; the worker ran out of memory: raise --memory-limit "
                                    "(now 4Gi)")
    assert report.reason.endswith(f"delete the Job (kubectl delete job nexlify-3f2a9c1e-init-1 -n {NAMESPACE}) "
                                  "and start the pipeline again")
    assert report.details["exit_code"] == 137 and report.details["failed_pods"] == 3

    pull = _pod("p-img", waiting={"reason": "ImagePullBackOff", "message": "Back-off pulling image"}, phase="Pending")
    report = describe_failure(_job([("Failed", "DeadlineExceeded")]), [pull], cfg)
    assert f"pod p-img ImagePullBackOff; the image {IMAGE} cannot be pulled" in report.reason

    config_error = _pod("p-cfg", waiting={"reason": "CreateContainerConfigError",
                                          "message": f'secret "{SECRET}" not found'}, phase="Pending")
    report = describe_failure(_job([("Failed", "DeadlineExceeded")]), [config_error], cfg)
    assert f'secret "{SECRET}" not found' in report.reason and f"does Secret '{SECRET}' exist" in report.reason

    # the pod of a Job that hit its deadline is gone; the problem seen while waiting is remembered
    remembered = PodProblem("p-pending", "Unschedulable", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    report = describe_failure(_job([("Failed", "DeadlineExceeded")]), [], cfg, remembered=remembered)
    assert "failed (DeadlineExceeded): pod p-pending Unschedulable; no node can run the pod (0/3 nodes are " \
           "available: 3 Insufficient nvidia.com/gpu.)" in report.reason
    assert report.details["pods"] == [remembered.as_dict()]
    report = describe_failure(_job([("Failed", "DeadlineExceeded")]), [], cfg)
    assert "failed (DeadlineExceeded): DeadlineExceeded message; the Job ran longer than " \
           "--active-deadline-seconds 21600" in report.reason

    # an eviction (ignored by the policy) then a real failure: the real failure decides
    evicted = _pod("p-1", terminated={"reason": "Error", "exitCode": 143},
                   conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}])
    bad_input = _pod("p-2", terminated={"reason": "Error", "exitCode": 2})
    report = describe_failure(_job([("Failed", "PodFailurePolicy")]), [evicted, bad_input], cfg,
                              log_tail=["error: config s3://b/x.json does not exist"])
    assert "pod p-2 Error, exit code 2; the worker rejected its input (exit code 2)" in report.reason
    assert [p["pod"] for p in report.details["pods"]] == ["p-1", "p-2"]
    assert report.details["log_tail"] == ["error: config s3://b/x.json does not exist"]
    assert pod_problem(evicted).disrupted and not pod_problem(bad_input).disrupted
    assert pod_problem(_pod("p-ok", terminated={"reason": "Completed", "exitCode": 0}, phase="Succeeded")) is None


def test_backoff_doubles_up_to_the_cap_and_gives_up_after_its_budget():
    assert [delay_for(n, 0.5, 30.0) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert delay_for(1, 0.5, 30.0, retry_after=3) == 3  # the server's Retry-After is longer: honoured
    assert delay_for(1, 0.5, 30.0, retry_after=300) == 30  # ... within the cap
    now, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    backoff = Backoff(initial=1.0, cap=4.0, budget=10.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(4):
        backoff.failed(OSError("connection refused"), action="listing Jobs")
    assert slept == [1.0, 2.0, 4.0, 3.0]  # the last wait is cut to what is left of the budget
    with pytest.raises(TemporaryError, match=r"kept failing for 10 s \(5 attempts\) while listing Jobs"):
        backoff.failed(OSError("connection refused"), action="listing Jobs")
    backoff.succeeded()
    backoff.failed(OSError("connection refused"))  # a new outage starts afresh
    assert slept[-1] == 1.0


# ============================================================================ executor, stand-in runs


def test_wait_survives_dropped_watches_and_410_gone(make_cluster, tmp_path):
    gate = tmp_path / "gate"
    cluster = make_cluster(image_command_map=gate_map(gate))
    executor = KubernetesExecutor(k8s_settings(), pipeline_id="feed0001", backoff=FAST_BACKOFF)
    handle = executor.start(dummy_spec())

    failures: list[BaseException] = []

    def disturb() -> None:
        try:
            wait_for(lambda: cluster.open_watches() >= 1, what="the first watch")
            wait_for(lambda: cluster.job(handle.job).get("status", {}).get("active"), what="the pod to run")
            assert cluster.drop_watches() >= 1
            wait_for(lambda: cluster.open_watches() >= 1, what="the watch to reconnect")
            cluster.create_namespace("unrelated-write")  # history moves past what the executor has seen
            cluster.compact_history()
            assert cluster.drop_watches() >= 1  # the reconnect asks for a forgotten resourceVersion: 410
            wait_for(lambda: cluster.open_watches() >= 1, what="the watch after the re-list")
        except BaseException as error:  # noqa: BLE001 - reported below, after the run is let go
            failures.append(error)
        finally:
            gate.touch()  # the run ends either way, so a failed step fails the test instead of hanging it

    helper = threading.Thread(target=disturb, daemon=True)
    helper.start()
    with capture_logs() as logs:
        [outcome] = executor.wait([handle])
    helper.join(timeout=10)
    if failures:
        raise failures[0]
    assert outcome.succeeded, outcome.reason
    events = [e["event"] for e in logs]
    # the first drop reconnects from the last resourceVersion; after the compaction the fake answers the
    # open watch or the reconnect with ERROR 410 (whichever comes first), and the executor lists again
    assert events.count("job_watch_reconnect") >= 1 and events.count("job_watch_expired") == 1
    assert cluster.calls("list", "jobs") == 2  # the first list and the re-list after 410
    assert cluster.calls("watch", "jobs") >= 3
    assert job_state(cluster.job(handle.job)) == "complete"


def test_wait_backs_off_on_api_errors_and_gives_up_after_a_long_outage(make_cluster, tmp_path):
    cluster = make_cluster(image_command_map=exit_map(0))
    executor = KubernetesExecutor(k8s_settings(), pipeline_id="feed0002", backoff=FAST_BACKOFF)
    handle = executor.start(dummy_spec())
    cluster.fail_next(1, 429, verb="list", resource="jobs")
    cluster.fail_next(2, 503, verb="watch", resource="jobs")
    [outcome] = executor.wait([handle])
    assert outcome.succeeded
    assert cluster.calls("list", "jobs") == 2  # 429 (Retry-After: 1) then the list that worked

    second = executor.start(dummy_spec("init-2"))
    cluster.fail_next(100_000, 500)
    impatient = KubernetesExecutor(k8s_settings(), pipeline_id="feed0002",
                                   backoff=lambda: Backoff(initial=0.05, cap=0.1, budget=1.0))
    started = time.monotonic()
    with pytest.raises(TemporaryError, match="kept failing"):
        impatient.wait([second])
    assert time.monotonic() - started < 10


def test_unreachable_api_server_is_a_temporary_error(tmp_path, monkeypatch):
    from tests.s3server import free_ports

    port = free_ports(1)[0]  # nothing listens there: connection refused
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "x", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    executor = KubernetesExecutor(k8s_settings(), pipeline_id="feed0003",
                                  backoff=lambda: Backoff(initial=0.05, cap=0.1, budget=0.5))
    with pytest.raises(TemporaryError, match="while reading Job nexlify-feed0003-init-1"):
        executor.start(dummy_spec())


def test_suspended_job_waits_for_kueue_then_completes(make_cluster, tmp_path):
    gate = tmp_path / "gate"
    gate.touch()  # once admitted, the run ends at once
    cluster = make_cluster(image_command_map=gate_map(gate))
    executor = KubernetesExecutor(k8s_settings(kueue_queue="team-a"), pipeline_id="feed0004",
                                  backoff=FAST_BACKOFF, pod_check_s=0.2)
    handle = executor.start(dummy_spec())
    outcomes: list = []
    with capture_logs() as logs:
        waiter = threading.Thread(target=lambda: outcomes.extend(executor.wait([handle])), daemon=True)
        waiter.start()
        wait_for(lambda: any(e["event"] == "job_suspended" for e in logs), what="job_suspended")
        time.sleep(1.0)
        assert waiter.is_alive() and not outcomes  # suspended is waiting, not finished
        assert cluster.pods_of(handle.job, NAMESPACE) == []
        cluster.store.update(JOBS, NAMESPACE, handle.job, lambda j: j["spec"].update(suspend=False))  # admitted
        waiter.join(timeout=30)
    assert outcomes and outcomes[0].succeeded
    assert cluster.job(handle.job)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_job_that_never_schedules_fails_with_deadline_exceeded_and_unschedulable(make_cluster):
    cluster = make_cluster(image_command_map=exit_map(0))
    cfg = k8s_settings(active_deadline_seconds=600)
    executor = KubernetesExecutor(cfg, pipeline_id="feed0005", backoff=FAST_BACKOFF, pod_check_s=0.3)
    cluster.unschedulable(job_name(cfg.name, "feed0005", "init-1"), NAMESPACE)
    handle = executor.start(dummy_spec())
    outcomes: list = []
    with capture_logs() as logs:
        waiter = threading.Thread(target=lambda: outcomes.extend(executor.wait([handle])), daemon=True)
        waiter.start()
        # The controller sees the stuck pod first; only then does the deadline pass (shortened in
        # place, as `kubectl patch` may), so the test does not race the pod check against a timer.
        wait_for(lambda: any(e["event"] == "job_pod_problem" for e in logs), what="job_pod_problem")
        cluster.store.update(JOBS, NAMESPACE, handle.job, lambda j: j["spec"].update(activeDeadlineSeconds=1))
        waiter.join(timeout=30)
    [outcome] = outcomes
    assert not outcome.succeeded
    assert outcome.reason.startswith(f"Job {handle.job} failed (DeadlineExceeded): pod {handle.job}-")
    assert "Unschedulable; no node can run the pod (0/1 nodes are available: 1 Insufficient cpu." in outcome.reason
    assert outcome.details["job_reason"] == "DeadlineExceeded"
    problems = [e for e in logs if e["event"] == "job_pod_problem"]
    assert problems and problems[0]["reason"] == "Unschedulable" and problems[0]["run"] == "init-1"
    failed = [e for e in logs if e["event"] == "job_failed"]
    assert len(failed) == 1 and failed[0]["reason"] == outcome.reason


def test_out_of_memory_is_reported_with_the_memory_limit(make_cluster, tmp_path):
    cluster = make_cluster(image_command_map=gate_map(tmp_path / "never"))
    executor = KubernetesExecutor(k8s_settings(backoff_limit=0, memory_limit="3Gi"), pipeline_id="feed0006",
                                  backoff=FAST_BACKOFF)
    handle = executor.start(dummy_spec())
    pod = wait_for(lambda: [p for p in cluster.pods_of(handle.job, NAMESPACE)
                            if p["status"].get("phase") == "Running"], what="a running pod")[0]
    cluster.inject_oom(pod["metadata"]["name"], NAMESPACE)
    [outcome] = executor.wait([handle])
    assert not outcome.succeeded
    assert f"failed (BackoffLimitExceeded): pod {pod['metadata']['name']} OOMKilled, exit code 137; the worker " \
           "ran out of memory: raise --memory-limit (now 3Gi)" in outcome.reason
    assert outcome.details["exit_code"] == 137


def test_start_is_idempotent_adopts_finished_jobs_and_409(make_cluster):
    cluster = make_cluster(image_command_map=exit_map(0, "done"))
    spec = dummy_spec()
    first = KubernetesExecutor(k8s_settings(), pipeline_id="feed0007", backoff=FAST_BACKOFF)
    handle = first.start(spec)
    assert first.wait([handle])[0].succeeded
    again = KubernetesExecutor(k8s_settings(), pipeline_id="feed0007", backoff=FAST_BACKOFF)  # a restarted controller
    with capture_logs() as logs:
        assert again.start(spec) == handle
        [outcome] = again.wait([handle])
    assert outcome.succeeded
    adopted = [e for e in logs if e["event"] == "job_adopted"]
    assert len(adopted) == 1 and adopted[0]["state"] == "complete"
    assert adopted[0]["logs"] == f"kubectl logs -f job/{handle.job} -n {NAMESPACE}"
    # the Job appears between the GET and the create (another controller's create): 409 means adopt
    cluster.fail_next(1, 404, verb="get", resource="jobs")
    before = cluster.calls("create", "jobs")
    assert again.start(spec) == handle
    assert cluster.calls("create", "jobs") == before + 1  # the create was tried and answered 409
    assert cluster.jobs_created() == {handle.job: 1}
    # a Job of that name that is not this run's is never adopted
    foreign = job_manifest(dummy_spec("init-2"), k8s_settings(), "0ther000")
    foreign["metadata"]["name"] = job_name("nexlify", "feed0007", "init-2")
    again.api.create_job(foreign)
    with pytest.raises(PermanentError, match="exists but is not this run's"):
        again.start(dummy_spec("init-2"))


def test_owner_reference_points_at_the_controllers_job(make_cluster, monkeypatch):
    cluster = make_cluster(image_command_map=exit_map(0))
    monkeypatch.delenv("NEXLIFY_OWNER_JOB", raising=False)
    controller_job = job_manifest(dummy_spec(), k8s_settings(name="ctl", kueue_queue="hold"), "c0ffee00")
    executor = KubernetesExecutor(k8s_settings(owner_job=controller_job["metadata"]["name"]),
                                  pipeline_id="feed0008", backoff=FAST_BACKOFF)
    owner_uid = executor.api.create_job(controller_job)["metadata"]["uid"]
    handle = executor.start(dummy_spec())
    assert cluster.job(handle.job)["metadata"]["ownerReferences"] == [{
        "apiVersion": "batch/v1", "kind": "Job", "name": controller_job["metadata"]["name"], "uid": owner_uid,
        "blockOwnerDeletion": True, "controller": False}]
    assert executor.wait([handle])[0].succeeded
    missing = KubernetesExecutor(k8s_settings(owner_job="no-such-job"), pipeline_id="feed0008")
    with pytest.raises(PermanentError, match="owner_job 'no-such-job': no such Job"):
        missing.start(dummy_spec("init-2"))


def test_check_cluster_reports_the_namespace_and_refuses_clearly(make_cluster, tmp_path, monkeypatch):
    cluster = make_cluster()
    detail = check_cluster(k8s_settings())
    assert detail.startswith(f"namespace {NAMESPACE} on {cluster.url} (Kubernetes v1.33.0-fake, kubeconfig ")
    assert detail.endswith("Jobs can be listed")
    with pytest.raises(PermanentError, match="namespace 'elsewhere' does not exist .*kubectl create namespace"):
        check_cluster(k8s_settings(namespace="elsewhere"))
    cluster.fail_next(1, 403, verb="list", resource="jobs")
    with pytest.raises(PermanentError, match=r"forbidden \(403\) while listing Jobs .*kubernetes_rbac.py"):
        check_cluster(k8s_settings())
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(PermanentError, match="no usable Kubernetes configuration"):
        check_cluster(k8s_settings())


def test_rbac_list_covers_every_call_of_a_failing_and_a_succeeding_run(make_cluster):
    cluster = make_cluster(image_command_map=exit_map(2, "error: bad input", after_s=1.0))
    check_cluster(k8s_settings())
    executor = KubernetesExecutor(k8s_settings(), pipeline_id="feed0009", backoff=FAST_BACKOFF)
    [outcome] = executor.wait([executor.start(dummy_spec())])
    assert not outcome.succeeded and outcome.details["log_tail"] == ["error: bad input"]
    rules = {call_rule(c) for c in cluster.requests}
    assert {("batch", "jobs", "get"), ("batch", "jobs", "create"), ("batch", "jobs", "list"),
            ("batch", "jobs", "watch"), ("", "pods", "list"), ("", "pods/log", "get"), ("", "events", "list"),
            ("", "namespaces", "get")} <= rules
    assert disallowed(cluster.requests) == []


# ============================================================================= the real worker in pods


@pytest.fixture(scope="module")
def local_reference(s3) -> dict:
    """The quick pipeline with the local executor, against SeaweedFS: what the cluster must reproduce."""
    cfg = pipeline_config(*QUICK_FLAGS, "--output", f"s3://{s3.bucket}/{uuid.uuid4().hex}-local", "--parallel", "2")
    return run_pipeline(cfg)


@pytest.fixture(scope="module")
def run_inputs(s3) -> dict:
    """A pipeline's config and data snapshot in the bucket, for runs started by hand."""
    cfg = pipeline_config(*QUICK_FLAGS, "--output", f"s3://{s3.bucket}/{uuid.uuid4().hex}-inputs")
    store = open_store(cfg.output)
    pipeline = Pipeline(cfg, store, executor=None)  # type: ignore[arg-type] - only its files are used
    pipeline.load_or_plan()
    pipeline.snapshot_data()
    return {"store": store, "config_url": store.url("pipeline_config.json"), "data_url": store.url("data")}


def test_quick_pipeline_through_the_fake_cluster_matches_the_local_executor(s3, local_reference, make_cluster):
    cluster = make_cluster(s3_server=s3)
    output = f"s3://{s3.bucket}/{uuid.uuid4().hex}-k8s"
    cfg = pipeline_config(*QUICK_FLAGS, *k8s_flags(s3.endpoint_url), "--output", output)
    with capture_logs() as logs:
        summary = run_pipeline(cfg)
    assert_same_summary(summary, local_reference)
    assert summary["stop_reason"] == "max_iterations"
    pid = summary["pipeline_id"]
    runs = {"init-1": (42, "initial", "initial_runs/run_1"), "init-2": (1042, "initial", "initial_runs/run_2"),
            "retrain-1": (2042, "retrain", "retraining/iteration_1")}
    assert cluster.jobs_created() == {f"nexlify-{pid}-{key}": 1 for key in runs}
    created = {e["run"]: e for e in logs if e["event"] == "job_created"}
    assert set(created) == set(runs)
    for key, (seed, phase, folder) in runs.items():
        name = f"nexlify-{pid}-{key}"
        job = cluster.job(name)
        assert job_state(job) == "complete" and job["status"]["succeeded"] == 1
        assert job["metadata"]["labels"]["nexlify.io/run"] == key
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        expected = ["worker", "train", "--run-key", key, "--seed", str(seed),
                    "--episodes", "8" if phase == "initial" else "4",
                    "--config", f"{output}/pipeline_config.json", "--data-snapshot", f"{output}/data",
                    "--out", f"{output}/{folder}", "--checkpoint-every", "4"]
        if key == "retrain-1":
            best = summary["initial_runs"][summary["best_initial_run"] - 1]["model_path"]
            expected += ["--init-from", f"{output}/{best}"]
        assert args == expected + ["--threads", "1"]  # from the default CPU request of 1
        event = created[key]
        assert (event["pipeline"], event["phase"], event["seed"], event["job"]) == (pid, phase, seed, name)
        assert event["logs"] == f"kubectl logs -f job/{name} -n {NAMESPACE}"
        [pod] = cluster.pods_of(name, NAMESPACE)
        lines = cluster.kubelet.log_buffer(pod, None, False).text().decode().splitlines()
        finished = [json.loads(line) for line in lines if '"run_finished"' in line]
        assert finished and finished[-1]["run"] == key  # the worker logged JSON lines (NEXLIFY_LOG_FORMAT)


def json_line(line: str) -> dict | None:
    """A JSON log event, or None for other output (the preflight table, the printed summary)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _controller(args: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "controller", *args], cwd=str(REPO), env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def test_controller_killed_mid_pipeline_resumes_without_duplicate_jobs(s3, local_reference, make_cluster, tmp_path):
    cluster = make_cluster(s3_server=s3)
    output = f"s3://{s3.bucket}/{uuid.uuid4().hex}-restart"
    args = ["train", *QUICK_FLAGS, *k8s_flags(s3.endpoint_url), "--output", output, "--log-format", "json"]
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    first = _controller(args, tmp_path / "first.log", env)
    try:
        wait_for(lambda: cluster.jobs_created() or first.poll() is not None, timeout=120, what="the first Job")
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    store = open_store(output)
    assert not store.exists("complete_training_summary.json")
    second = _controller(args, tmp_path / "second.log", env)
    try:
        second.wait(timeout=PIPELINE_TIMEOUT_S)
    finally:
        if second.poll() is None:
            second.kill()
    log_text = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, log_text[-5000:]
    summary = json.loads(store.read_bytes("complete_training_summary.json"))
    assert_same_summary(summary, local_reference)
    pid = summary["pipeline_id"]
    assert cluster.jobs_created() == {f"nexlify-{pid}-{key}": 1 for key in ("init-1", "init-2", "retrain-1")}
    events = [event for event in map(json_line, log_text.splitlines()) if event]
    # the Job the first controller created ran on without it: the second adopts it while it runs
    # (job_adopted), or its result once it has finished (run_adopted, when the worker beat the restart);
    # either way it is never created twice (jobs_created above)
    adopted = {e["run"] for e in events if e.get("event") in ("job_adopted", "run_adopted")}
    assert "init-1" in adopted


def test_evicted_worker_is_replaced_and_resumes_from_its_checkpoint(s3, run_inputs, make_cluster):
    store = run_inputs["store"]
    spec = RunSpec(run_key="init-1", phase="initial", seed=42, episodes=24, config_url=run_inputs["config_url"],
                   data_url=run_inputs["data_url"], output_url=store.url("evicted/run_1"), checkpoint_every=4)
    uninterrupted = dataclasses.replace(spec, output_url=store.url("uninterrupted/run_1"))
    local = LocalExecutor(1, progress=False)
    assert local.wait([local.start(uninterrupted)])[0].succeeded

    cluster = make_cluster(s3_server=s3)
    cfg = k8s_settings(s3_secret=SECRET, s3_endpoint=s3.endpoint_url)
    executor = KubernetesExecutor(cfg, pipeline_id="e71c7ed0", backoff=FAST_BACKOFF)
    handle = executor.start(spec)
    evicted: list[str] = []

    def evict_after_first_checkpoint() -> None:
        def checkpointed():
            for pod in cluster.pods_of(handle.job, NAMESPACE):
                try:
                    text = cluster.kubelet.log_buffer(pod, None, False).text()
                except Exception:  # noqa: BLE001 - not started yet
                    continue
                if b'"checkpoint_saved"' in text:
                    return pod["metadata"]["name"]
            return None
        name = wait_for(checkpointed, timeout=120, what="the first checkpoint")
        cluster.evict_pod(name, NAMESPACE)
        evicted.append(name)

    helper = threading.Thread(target=evict_after_first_checkpoint, daemon=True)
    helper.start()
    [outcome] = executor.wait([handle])
    helper.join(timeout=10)
    assert outcome.succeeded, outcome.reason
    job = cluster.job(handle.job)
    assert job["status"]["succeeded"] == 1 and "failed" not in job["status"]  # the eviction did not count
    assert len(job_events(cluster, handle.job, "SuccessfulCreate")) == 2  # the evicted pod and its replacement
    first_states = [e.obj for e in cluster.store.events_after(cluster.store.compacted_rv)
                    if e.resource == ("", "pods") and e.obj["metadata"]["name"] == evicted[0]]
    ends = [s["status"]["containerStatuses"][0]["state"].get("terminated") for s in first_states
            if s["status"].get("containerStatuses")]
    assert any(end and end["exitCode"] == 143 for end in ends)  # saved its checkpoint on SIGTERM and exited
    [replacement] = cluster.pods_of(handle.job, NAMESPACE)
    log_lines = cluster.kubelet.log_buffer(replacement, None, False).text().decode().splitlines()
    resumed = [json.loads(line) for line in log_lines if '"run_resumed"' in line]
    assert resumed and resumed[0]["episodes_done"] >= 4, "\n".join(log_lines[:30])
    result = json.loads(store.read_bytes("evicted/run_1/result.json"))
    reference = json.loads(store.read_bytes("uninterrupted/run_1/result.json"))
    for key in ("val_score", "val_metrics", "train_return", "model_file", "episodes_total"):
        assert result[key] == reference[key], key  # resumed bit for bit where the uninterrupted run ends
    assert not store.exists("evicted/run_1/resume.pt")


def test_bad_config_fails_the_job_at_once_with_one_pod(s3, run_inputs, make_cluster):
    store = run_inputs["store"]
    cluster = make_cluster(s3_server=s3)
    missing = store.url("no-such-config.json")
    spec = RunSpec(run_key="init-1", phase="initial", seed=42, episodes=4, config_url=missing,
                   data_url=run_inputs["data_url"], output_url=store.url("badconfig/run_1"), checkpoint_every=0)
    executor = KubernetesExecutor(k8s_settings(s3_secret=SECRET, s3_endpoint=s3.endpoint_url),
                                  pipeline_id="bad0c0f1", backoff=FAST_BACKOFF)
    handle = executor.start(spec)
    [outcome] = executor.wait([handle])
    assert not outcome.succeeded
    assert outcome.details["job_reason"] == "PodFailurePolicy" and outcome.details["exit_code"] == 2
    assert "the worker rejected its input (exit code 2)" in outcome.reason
    assert any(f"config {missing} does not exist" in line for line in outcome.details["log_tail"])
    assert len(cluster.pods_of(handle.job, NAMESPACE)) == 1  # FailJob: no retry despite backoffLimit 2
    assert cluster.job(handle.job)["status"]["failed"] == 1


def test_run_that_succeeds_without_result_json_fails_the_pipeline_clearly(s3, make_cluster):
    make_cluster(s3_server=s3, image_command_map=exit_map(0, "pretending to train"))
    output = f"s3://{s3.bucket}/{uuid.uuid4().hex}-noresult"
    cfg = pipeline_config(*QUICK_FLAGS, *k8s_flags(s3.endpoint_url), "--output", output)
    with pytest.raises(PermanentError) as failure:
        run_pipeline(cfg)
    message = str(failure.value)
    assert message.startswith("runs failed: init-1: result.json is missing after the run reported success; "
                              "init-2: result.json is missing")
    state = json.loads(open_store(output).read_bytes("pipeline_state.json"))
    assert [f["run"] for f in state["failures"]] == ["init-1", "init-2"]
    assert state["phase"] == "INITIAL_RUNNING"
