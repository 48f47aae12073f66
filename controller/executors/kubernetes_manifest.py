"""The Job a run becomes: names, labels and the whole manifest, as pure functions of the settings.

Nothing here talks to a cluster, so the tests (and the Helm chart's engineer) can check every field.
The container runs the SAME `nexlify worker train ...` argument list the local executor runs
(`RunSpec.worker_args()`); only where it runs differs.

Names are deterministic: `<name>-<pipeline-id>-<run-key>` (`nexlify-3f2a9c1e-init-1`), so a
restarted controller finds its Jobs by name. Too long a prefix is cut and given a short hash of
itself, so the name stays a DNS-1123 label (at most 63 characters) and different prefixes stay apart.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

from controller.config import KubernetesConfig
from controller.executors.base import RunSpec
from nexlify.cpus import cpus_of_request
from nexlify.errors import InputError

MAX_NAME = 63  # a Job name is used as a pod label value (batch.kubernetes.io/job-name): at most 63
HASH_CHARS = 6
CONTAINER = "worker"
WORKER_COMMAND = ["nexlify"]
SCRATCH_VOLUME = "tmp"
SCRATCH_PATH = "/tmp"
TERMINATION_GRACE_SECONDS = 120  # SIGTERM -> the worker saves its resume checkpoint and exits 143
EXIT_INVALID_INPUT = 2  # the worker's exit code for bad input: fail the Job at once, no retry
EXIT_NON_FINITE = 3  # a non-finite reward, observation, loss or weight: runs are deterministic, a retry meets it again

APP_NAME = "nexlify-train"
MANAGED_BY = "nexlify-controller"
LABEL_PIPELINE = "nexlify.io/pipeline"
LABEL_PHASE = "nexlify.io/phase"
LABEL_RUN = "nexlify.io/run"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ANNOTATION_OUTPUT = "nexlify.io/output"  # the run's output URL (under its pipeline's output)
ANNOTATION_CONFIG_HASH = "nexlify.io/config-hash"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_RESOURCE = "nvidia.com/gpu"
# A resource name: an optional DNS-subdomain prefix and a name (apimachinery's qualified name).
_RESOURCE_NAME = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_QUANTITY = re.compile(r"([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)")  # apimachinery's resource.Quantity


def check_name_prefix(prefix: str) -> None:
    """The Job name prefix (`--name`) must be a DNS-1123 label on its own."""
    if not _DNS_LABEL.fullmatch(prefix or ""):
        raise InputError(f"--name {prefix!r}: accepted: lower case letters, digits and '-', starting and ending "
                         "with a letter or digit (a DNS-1123 label, e.g. 'nexlify')")


def job_name(prefix: str, pipeline_id: str, run_key: str) -> str:
    """`<prefix>-<pipeline-id>-<run-key>`, at most 63 characters, stable for the same inputs."""
    check_name_prefix(prefix)
    suffix = f"-{pipeline_id}-{run_key}"
    if not _DNS_LABEL.fullmatch(suffix[1:]):
        raise InputError(f"run key {run_key!r} of pipeline {pipeline_id!r} cannot be part of a Job name; accepted: "
                         "lower case letters, digits and '-'")
    name = prefix + suffix
    if len(name) <= MAX_NAME:
        return name
    room = MAX_NAME - len(suffix) - HASH_CHARS - 1
    if room < 1:
        raise InputError(f"run key {run_key!r} is too long for a Job name (at most {MAX_NAME} characters)")
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:HASH_CHARS]
    return f"{prefix[:room].rstrip('-')}-{digest}{suffix}"


def label_value(text: str) -> str:
    """`text` as a valid label value: allowed characters only, at most 63, alphanumeric at both ends."""
    value = _LABEL_VALUE_CHARS.sub("-", text)[:MAX_NAME]
    return value.strip("-._")


def selector_labels(cfg: KubernetesConfig, pipeline_id: str) -> dict[str, str]:
    """The labels every Job (and pod) of one pipeline carries: what the controller watches by."""
    return {LABEL_INSTANCE: label_value(cfg.name), LABEL_PIPELINE: label_value(pipeline_id)}


def label_selector(cfg: KubernetesConfig, pipeline_id: str) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(cfg, pipeline_id).items()))


def run_labels(spec: RunSpec, cfg: KubernetesConfig, pipeline_id: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/component": CONTAINER,
        LABEL_MANAGED_BY: MANAGED_BY,
        **selector_labels(cfg, pipeline_id),
        LABEL_PHASE: label_value(spec.phase),
        LABEL_RUN: label_value(spec.run_key),
    }


def kubectl_logs_command(name: str, namespace: str) -> str:
    """What a person types to follow a run's log."""
    return f"kubectl logs -f job/{name} -n {namespace}"


def owner_reference(owner_name: str, owner_uid: str) -> dict[str, Any]:
    """The controller's own Job as owner: deleting it deletes the run Jobs (it does not control them)."""
    return {"apiVersion": "batch/v1", "kind": "Job", "name": owner_name, "uid": owner_uid,
            "blockOwnerDeletion": True, "controller": False}


def _quantity(value: str, flag: str) -> str:
    if not _QUANTITY.fullmatch(value):
        raise InputError(f"{flag} {value!r}: accepted: a Kubernetes quantity such as 500m, 2, 4Gi or 512Mi")
    return value


def _resources(cfg: KubernetesConfig) -> dict[str, dict[str, str]]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cfg.cpu_request:
        requests["cpu"] = _quantity(cfg.cpu_request, "--cpu-request")
    if cfg.memory_request:
        requests["memory"] = _quantity(cfg.memory_request, "--memory-request")
    if cfg.cpu_limit:
        limits["cpu"] = _quantity(cfg.cpu_limit, "--cpu-limit")
    if cfg.memory_limit:
        limits["memory"] = _quantity(cfg.memory_limit, "--memory-limit")
    if cfg.gpus > 0:
        limits[GPU_RESOURCE] = str(cfg.gpus)  # extended resources: the request defaults to the limit
    extra = cfg.resources or {}
    unknown = set(extra) - {"requests", "limits"}
    if unknown or not all(isinstance(v, dict) for v in extra.values()):
        raise InputError(f"kubernetes.resources {extra!r}: accepted: a mapping with requests and/or limits, each "
                         "a mapping of resource name to quantity")
    for kind, target in (("requests", requests), ("limits", limits)):
        for name, value in (extra.get(kind) or {}).items():
            if not _RESOURCE_NAME.fullmatch(str(name)):
                raise InputError(f"kubernetes.resources.{kind}: {name!r} is not a resource name; accepted: names "
                                 "such as cpu, memory, ephemeral-storage, nvidia.com/gpu, amd.com/gpu, "
                                 "nvidia.com/mig-1g.10gb")
            if value in ("", None):
                target.pop(str(name), None)
            else:
                target[str(name)] = _quantity(str(value), f"kubernetes.resources.{kind}.{name}")
    out: dict[str, dict[str, str]] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _worker_threads(cfg: KubernetesConfig) -> int | None:
    """The worker's CPU threads from its CPU request (nexlify.cpus.cpus_of_request: "1" -> 1, "1500m" -> 2): the
    CPUs the scheduler reserves for the pod, so a worker never starts more threads than it was given, nor
    fewer. None without a request: the config's `threads` then stands."""
    if not cfg.cpu_request:
        return None
    quantity = _quantity(cfg.cpu_request, "--cpu-request")
    try:
        return cpus_of_request(quantity)
    except ValueError:
        raise InputError(f"--cpu-request {quantity!r}: accepted: a CPU quantity such as 500m, 1 or 2") from None


def _threads_args(cfg: KubernetesConfig) -> list[str]:
    threads = _worker_threads(cfg)
    return [] if threads is None else ["--threads", str(threads)]


def _env(cfg: KubernetesConfig) -> list[dict[str, Any]]:
    """Plain settings of the worker (no secrets: those come with `_env_from`)."""
    env: list[dict[str, Any]] = [
        {"name": "NEXLIFY_LOG_FORMAT", "value": "json"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TMPDIR", "value": SCRATCH_PATH},
        {"name": "HOME", "value": SCRATCH_PATH},
    ]
    if cfg.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": cfg.s3_endpoint})
    return env


def _env_from(cfg: KubernetesConfig) -> list[dict[str, Any]]:
    """S3 credentials: every key of the named Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally
    AWS_DEFAULT_REGION / AWS_SESSION_TOKEN), as the controller loads it; none with IRSA / workload identity."""
    return [{"secretRef": {"name": cfg.s3_secret}}] if cfg.s3_secret else []


def _pod_failure_policy() -> dict[str, Any]:
    """Evictions and preemptions (DisruptionTarget) are not the run's fault: they do not count against
    backoffLimit, and the replacement pod resumes from the checkpoint the worker saved on SIGTERM.
    Exit code 2 is invalid input and 3 a non-finite value (nexlify.errors.NonFiniteError; a run is
    deterministic): retrying cannot help, so the Job fails at once."""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": [EXIT_INVALID_INPUT, EXIT_NON_FINITE]}},
    ]}


def _pod_spec(spec: RunSpec, cfg: KubernetesConfig) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": list(WORKER_COMMAND),
        "args": spec.worker_args() + _threads_args(cfg),
        "env": _env(cfg),
        **({"envFrom": _env_from(cfg)} if cfg.s3_secret else {}),
        "resources": _resources(cfg),
        "securityContext": copy.deepcopy(cfg.container_security_context),
        "volumeMounts": [{"name": SCRATCH_VOLUME, "mountPath": SCRATCH_PATH}],
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # workers read and write the bucket only
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": copy.deepcopy(cfg.pod_security_context),
        "containers": [container],
        "volumes": [{"name": SCRATCH_VOLUME, "emptyDir": {}}],
    }
    if cfg.worker_service_account:
        pod["serviceAccountName"] = cfg.worker_service_account
    if cfg.priority_class_name:
        pod["priorityClassName"] = cfg.priority_class_name
    if cfg.node_selector:
        pod["nodeSelector"] = {str(k): str(v) for k, v in cfg.node_selector.items()}
    if cfg.tolerations:
        pod["tolerations"] = [dict(t) for t in cfg.tolerations]
    if cfg.affinity:
        pod["affinity"] = dict(cfg.affinity)
    return pod


def _pod_metadata(cfg: KubernetesConfig, labels: dict[str, str]) -> dict[str, Any]:
    """The run pod's labels (the user's, then ours: the controller selects pods by ours) and annotations."""
    metadata: dict[str, Any] = {"labels": {**{str(k): str(v) for k, v in cfg.pod_labels.items()}, **labels}}
    if cfg.pod_annotations:
        metadata["annotations"] = {str(k): str(v) for k, v in cfg.pod_annotations.items()}
    return metadata


def job_manifest(spec: RunSpec, cfg: KubernetesConfig, pipeline_id: str,
                 owner: dict[str, Any] | None = None, config_hash: str = "") -> dict[str, Any]:
    """The batch/v1 Job of one run. `owner`: an ownerReference (see `owner_reference`) or None."""
    name = job_name(cfg.name, pipeline_id, spec.run_key)
    labels = run_labels(spec, cfg, pipeline_id)
    job_labels = dict(labels)
    if cfg.kueue_queue:
        job_labels[KUEUE_QUEUE_LABEL] = label_value(cfg.kueue_queue)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": cfg.namespace,
        "labels": job_labels,
        # what adoption checks: a restarted controller adopts only a Job of its own output and config
        "annotations": {"nexlify.io/seed": str(spec.seed), ANNOTATION_OUTPUT: spec.output_url,
                        ANNOTATION_CONFIG_HASH: config_hash},
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    job_spec: dict[str, Any] = {
        "backoffLimit": cfg.backoff_limit,
        "activeDeadlineSeconds": cfg.active_deadline_seconds,
        "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
        "podReplacementPolicy": "Failed",  # never two workers writing the same run at once
        "podFailurePolicy": _pod_failure_policy(),
        "template": {"metadata": _pod_metadata(cfg, labels), "spec": _pod_spec(spec, cfg)},
    }
    if cfg.kueue_queue:
        job_spec["suspend"] = True  # Kueue admits (unsuspends) the Job when its queue has quota
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
