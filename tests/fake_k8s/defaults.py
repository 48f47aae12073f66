"""Defaulting the apiserver applies on create, and the Pod a Job controller stamps from a template.

Pure functions on plain dicts (JSON objects). What is defaulted follows `pkg/apis/batch/v1/defaults.go`,
`pkg/apis/core/v1/defaults.go` and the Job strategy (generated selector and labels): a client that
reads back its Job sees the same fields it would see on a real cluster.
"""

from __future__ import annotations

import base64
import copy
import secrets
from typing import Any

from .status import bad_request

JOB_NAME_LABELS = ("job-name", "batch.kubernetes.io/job-name")
CONTROLLER_UID_LABELS = ("controller-uid", "batch.kubernetes.io/controller-uid")
JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
# Alphabet and length of the suffix of generated names (apiserver's names.SimpleNameGenerator).
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
NAME_SUFFIX_LENGTH = 5
MAX_GENERATED_NAME_LENGTH = 63
FAKE_NODE = "fake-node"


def generate_name(prefix: str) -> str:
    """`prefix` + 5 random characters, the prefix cut so the result stays within 63 characters."""
    base = prefix[:MAX_GENERATED_NAME_LENGTH - NAME_SUFFIX_LENGTH]
    return base + "".join(secrets.choice(NAME_ALPHABET) for _ in range(NAME_SUFFIX_LENGTH))


def _image_pull_policy(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    if "@" in last:
        return "IfNotPresent"
    tag = last.split(":", 1)[1] if ":" in last else ""
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def default_pod_spec(spec: dict[str, Any]) -> None:
    """SetDefaults_PodSpec and SetDefaults_Container, the parts a client can observe."""
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for group in ("initContainers", "containers"):
        for container in spec.get(group) or []:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("imagePullPolicy", _image_pull_policy(container.get("image", "")))
            container.setdefault("resources", {})
            for var in container.get("env") or []:
                field_ref = (var.get("valueFrom") or {}).get("fieldRef")
                if field_ref is not None:
                    field_ref.setdefault("apiVersion", "v1")


def default_job(job: dict[str, Any]) -> None:
    """Job defaults plus the generated selector and template labels (needs metadata.uid and name)."""
    meta, spec = job["metadata"], job.setdefault("spec", {})
    template = spec.setdefault("template", {})
    template_meta = template.setdefault("metadata", {})
    user_template_labels = dict(template_meta.get("labels") or {})
    if user_template_labels and not meta.get("labels"):
        meta["labels"] = user_template_labels
    if spec.get("completions") is None and spec.get("parallelism") is None:
        spec["completions"] = 1
        spec["parallelism"] = 1
    spec.setdefault("parallelism", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy",
                    "Failed" if spec.get("podFailurePolicy") is not None else "TerminatingOrFailed")
    for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []:
        for condition in rule.get("onPodConditions") or []:
            condition.setdefault("status", "True")
    if not spec.get("manualSelector"):
        if spec.get("selector") is None:
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": meta["uid"]}}
        labels = template_meta.setdefault("labels", {})
        for key in CONTROLLER_UID_LABELS:
            labels[key] = meta["uid"]
        for key in JOB_NAME_LABELS:
            labels[key] = meta["name"]
    default_pod_spec(template.setdefault("spec", {}))
    job["status"] = {}
    meta["generation"] = 1


def default_secret(secret: dict[str, Any]) -> None:
    """Type Opaque; `stringData` folded into base64 `data`; `data` must be valid base64."""
    secret.setdefault("type", "Opaque")
    data = secret.setdefault("data", {})
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (ValueError, TypeError):
            raise bad_request(f"Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data "
                              f"at key {key!r}") from None
    for key, value in (secret.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(value.encode()).decode()
    if not data:
        secret.pop("data")


def default_event(event: dict[str, Any], namespace: str) -> None:
    event.setdefault("involvedObject", {}).setdefault("namespace", namespace)
    event.setdefault("count", 1)
    event.setdefault("type", "Normal")


def default_namespace(namespace: dict[str, Any]) -> None:
    namespace.setdefault("spec", {"finalizers": ["kubernetes"]})
    namespace["status"] = {"phase": "Active"}
    labels = namespace["metadata"].setdefault("labels", {})
    labels["kubernetes.io/metadata.name"] = namespace["metadata"]["name"]


def pod_for_job(job: dict[str, Any]) -> dict[str, Any]:
    """The Pod the Job controller creates: the template plus owner reference and tracking finalizer.

    Pod-level defaults that the apiserver adds on pod creation (service account, tolerations,
    priority) are filled in here, since the fake creates the pod without a second admission pass.

    The name is left to `generateName: <job>-` so the store adds the 5-character suffix.
    """
    template = copy.deepcopy(job["spec"]["template"])
    meta = template.get("metadata") or {}
    job_meta = job["metadata"]
    pod_meta: dict[str, Any] = {
        "generateName": f"{job_meta['name']}-",
        "namespace": job_meta["namespace"],
        "labels": dict(meta.get("labels") or {}),
        "annotations": dict(meta.get("annotations") or {}),
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_meta["name"],
                             "uid": job_meta["uid"], "controller": True, "blockOwnerDeletion": True}],
        "finalizers": [JOB_TRACKING_FINALIZER],
    }
    spec = template["spec"]
    default_pod_spec(spec)
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault("tolerations", [
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300}])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec,
            "status": {"phase": "Pending", "qosClass": "BestEffort"}}
