"""Reading Job and Pod status: is a Job finished, and if it failed, why, in one line a user can act on.

Pure functions of the objects the API server returns (plain dicts), so the tests can feed them
hand-made pods: OOMKilled, ImagePullBackOff, Unschedulable, exit codes, evictions, deadlines.

A Job is finished only with the terminal condition `Complete` or `Failed`. The interim conditions
`SuccessCriteriaMet` / `FailureTarget` (Kubernetes 1.31+) mean pods may still be running, and a
suspended Job (Kueue waiting for quota) is waiting, not failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.config import KubernetesConfig
from controller.executors.kubernetes_manifest import CONTAINER, EXIT_INVALID_INPUT, kubectl_logs_command

WAITING_PROBLEMS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
                    "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "CrashLoopBackOff")
IMAGE_PROBLEMS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")


def condition(obj: dict[str, Any], kind: str, status: str = "True") -> dict[str, Any] | None:
    """The object's condition of type `kind` with the given status, if any."""
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind and item.get("status") == status:
            return item
    return None


def job_state(job: dict[str, Any]) -> str:
    """complete | failed | suspended | running | pending: only the first two are terminal."""
    if condition(job, "Complete") is not None:
        return "complete"
    if condition(job, "Failed") is not None:
        return "failed"
    if (job.get("spec") or {}).get("suspend"):
        return "suspended"
    if (job.get("status") or {}).get("active"):
        return "running"
    return "pending"


def is_terminal(job: dict[str, Any]) -> bool:
    return job_state(job) in ("complete", "failed")


def owner_job_name(pod: dict[str, Any]) -> str | None:
    """The name of the Job that controls this pod."""
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("controller"):
            return ref.get("name")
    return None


@dataclass(frozen=True)
class PodProblem:
    """What went wrong with one pod, as far as its status tells."""

    pod: str
    reason: str  # OOMKilled, ImagePullBackOff, Unschedulable, Error, Evicted, ...
    message: str = ""
    exit_code: int | None = None
    phase: str = ""
    disrupted: bool = False  # evicted or preempted: the Job's podFailurePolicy ignores it

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pod": self.pod, "reason": self.reason, "pod_phase": self.phase}
        if self.message:
            out["message"] = self.message
        if self.exit_code is not None:
            out["exit_code"] = self.exit_code
        return out


def _worker_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER:
            return status
    return statuses[0] if statuses else {}


def pod_problem(pod: dict[str, Any]) -> PodProblem | None:
    """The most telling problem of a pod, or None for a pod that is fine (running or succeeded)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    name, phase = meta.get("name", "?"), status.get("phase", "")
    container = _worker_status(pod)
    state = container.get("state") or {}
    terminated = state.get("terminated") or (container.get("lastState") or {}).get("terminated")
    waiting = state.get("waiting") or {}
    if terminated and terminated.get("reason") == "OOMKilled":
        return PodProblem(name, "OOMKilled", terminated.get("message", ""), terminated.get("exitCode"), phase)
    if waiting.get("reason") in WAITING_PROBLEMS:
        return PodProblem(name, waiting["reason"], waiting.get("message", ""), None, phase)
    unscheduled = condition(pod, "PodScheduled", "False")
    if unscheduled is not None and unscheduled.get("reason") == "Unschedulable":
        return PodProblem(name, "Unschedulable", unscheduled.get("message", ""), None, phase)
    disrupted = condition(pod, "DisruptionTarget")
    if disrupted is not None:
        code = terminated.get("exitCode") if terminated else None
        return PodProblem(name, disrupted.get("reason") or "DisruptionTarget", disrupted.get("message", ""), code,
                          phase, disrupted=True)
    if terminated and terminated.get("exitCode", 0) != 0:
        return PodProblem(name, terminated.get("reason") or "Error", terminated.get("message", ""),
                          terminated.get("exitCode"), phase)
    if phase == "Failed":
        return PodProblem(name, status.get("reason") or "Failed", status.get("message", ""), None, phase)
    return None


def _hint(problem: PodProblem | None, job_reason: str, cfg: KubernetesConfig, logs: str) -> str:
    if problem is not None:
        if problem.reason == "OOMKilled":
            return (f"the worker ran out of memory: raise --memory-limit (now {cfg.memory_limit or 'none'}) "
                    "or lower num_envs / episode_bars")
        if problem.reason in IMAGE_PROBLEMS:
            return (f"the image {cfg.image} cannot be pulled: check --image and the registry's pull secret "
                    f"({problem.message or problem.reason})")
        if problem.reason == "Unschedulable":
            return (f"no node can run the pod ({problem.message or 'unschedulable'}): check --cpu-request, "
                    "--memory-request, --gpus, node_selector, tolerations and the cluster's free capacity")
        if problem.reason in ("CreateContainerConfigError", "CreateContainerError"):
            secret = f"; does Secret {cfg.s3_secret!r} exist with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY?" \
                if cfg.s3_secret else ""
            return f"the container cannot be created ({problem.message or problem.reason}){secret}"
        if problem.exit_code == EXIT_INVALID_INPUT:
            return f"the worker rejected its input (exit code {EXIT_INVALID_INPUT}): see the log tail ({logs})"
    if job_reason == "DeadlineExceeded":
        return f"the Job ran longer than --active-deadline-seconds {cfg.active_deadline_seconds}"
    if problem is not None and problem.exit_code is not None:
        return f"the worker exited with code {problem.exit_code} ({problem.reason}): see the log tail ({logs})"
    return f"see {logs}"


@dataclass
class FailureReport:
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def describe_failure(job: dict[str, Any], pods: list[dict[str, Any]], cfg: KubernetesConfig, *,
                     remembered: PodProblem | None = None, log_tail: list[str] | None = None,
                     events: list[str] | None = None) -> FailureReport:
    """One line (reason) and the particulars (details) of a failed Job.

    `pods` are the Job's pods, oldest first; `remembered` is the last problem seen while waiting
    (pods of a Job that hit its deadline are deleted, so an Unschedulable pod may be gone by now).
    """
    name = (job.get("metadata") or {}).get("name", "?")
    namespace = (job.get("metadata") or {}).get("namespace") or cfg.namespace
    failed = condition(job, "Failed") or {}
    job_reason = failed.get("reason") or "Failed"
    job_message = failed.get("message") or ""
    problems = [p for p in (pod_problem(pod) for pod in pods) if p is not None]
    # The pod that decided the outcome: the last one with a problem that is not a mere disruption.
    deciding = next((p for p in reversed(problems) if not p.disrupted), problems[-1] if problems else remembered)
    logs = kubectl_logs_command(name, namespace)
    head = f"Job {name} failed ({job_reason})"
    if deciding is not None:
        code = f", exit code {deciding.exit_code}" if deciding.exit_code is not None else ""
        head += f": pod {deciding.pod} {deciding.reason}{code}"
    elif job_message:
        head += f": {job_message}"
    reason = (f"{head}; {_hint(deciding, job_reason, cfg, logs)}; to run it again, delete the Job "
              f"(kubectl delete job {name} -n {namespace}) and start the pipeline again")
    details: dict[str, Any] = {
        "job": name, "namespace": namespace, "job_reason": job_reason, "job_message": job_message,
        "pods": [p.as_dict() for p in problems] or ([remembered.as_dict()] if remembered else []),
        "failed_pods": (job.get("status") or {}).get("failed", 0), "logs_command": logs,
    }
    if deciding is not None and deciding.exit_code is not None:
        details["exit_code"] = deciding.exit_code
    if log_tail:
        details["log_tail"] = log_tail
    if events:
        details["events"] = events
    return FailureReport(reason, details)
