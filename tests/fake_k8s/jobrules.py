"""Pure rules of the Job controller: pod failure policy matching, conditions, terminal states.

Messages and reasons are the ones `pkg/controller/job` writes in Kubernetes 1.31+ (where a finished
Job first gets the interim condition `SuccessCriteriaMet` / `FailureTarget` and then, once no pod
is left running, the terminal `Complete` / `Failed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

COMPLETIONS_REACHED = ("CompletionsReached", "Reached expected number of succeeded pods")
BACKOFF_LIMIT_EXCEEDED = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
DEADLINE_EXCEEDED = ("DeadlineExceeded", "Job was active longer than specified deadline")
POD_FAILURE_POLICY = "PodFailurePolicy"
TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class PolicyMatch:
    """The first podFailurePolicy rule a failed pod matches."""

    action: str  # FailJob | Ignore | Count | FailIndex
    index: int
    message: str


def _matches_exit_codes(rule: dict[str, Any], index: int, pod: dict[str, Any]) -> PolicyMatch | None:
    requirement = rule["onExitCodes"]
    name = requirement.get("containerName")
    values = set(requirement.get("values") or [])
    statuses = (pod.get("status") or {}).get("initContainerStatuses", []) + \
        (pod.get("status") or {}).get("containerStatuses", [])
    for status in statuses:
        if name is not None and status.get("name") != name:
            continue
        terminated = (status.get("state") or {}).get("terminated")
        if not terminated or terminated.get("exitCode", 0) == 0:
            continue  # exit code 0 never matches, for In and NotIn alike
        code = terminated["exitCode"]
        if (requirement["operator"] == "In") == (code in values):
            meta = pod["metadata"]
            return PolicyMatch(rule["action"], index,
                               f"Container {status['name']} for pod {meta['namespace']}/{meta['name']} failed with "
                               f"exit code {code} matching {rule['action']} rule at index {index}")
    return None


def _matches_conditions(rule: dict[str, Any], index: int, pod: dict[str, Any]) -> PolicyMatch | None:
    conditions = (pod.get("status") or {}).get("conditions") or []
    for pattern in rule["onPodConditions"]:
        for condition in conditions:
            if condition.get("type") == pattern.get("type") and condition.get("status") == pattern.get("status", "True"):
                meta = pod["metadata"]
                return PolicyMatch(rule["action"], index,
                                   f"Pod {meta['namespace']}/{meta['name']} has condition {condition['type']} "
                                   f"matching {rule['action']} rule at index {index}")
    return None


def match_pod_failure_policy(policy: dict[str, Any] | None, pod: dict[str, Any]) -> PolicyMatch | None:
    """The first rule of `spec.podFailurePolicy` that the failed `pod` matches (None: count it)."""
    for index, rule in enumerate((policy or {}).get("rules") or []):
        if rule.get("onExitCodes") is not None:
            match = _matches_exit_codes(rule, index, pod)
        else:
            match = _matches_conditions(rule, index, pod)
        if match is not None:
            return match
    return None


def past_backoff_limit_on_failure(job: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
    """restartPolicy OnFailure: the restarts of the Job's active pods reached backoffLimit.

    Same arithmetic as the controller's pastBackoffLimitOnFailure: the sum of container restart
    counts of Pending/Running pods, compared with `>= backoffLimit` (or `> 0` when the limit is 0).
    """
    spec = job["spec"]
    if spec["template"]["spec"].get("restartPolicy") != "OnFailure":
        return False
    restarts = sum(status.get("restartCount", 0)
                   for pod in pods if (pod.get("status") or {}).get("phase") in ("Pending", "Running")
                   for status in (pod["status"].get("containerStatuses") or []))
    limit = spec.get("backoffLimit", 6)
    return restarts > 0 if limit == 0 else restarts >= limit


@dataclass
class PodTally:
    """What newly finished pods add to a Job's status."""

    succeeded: int = 0
    failed: int = 0
    failure: tuple[str, str] | None = None  # (reason, message) when a FailJob rule matched
    ignored: list[tuple[str, int]] = field(default_factory=list)  # (pod name, rule index) of Ignore matches


def count_finished_pods(spec: dict[str, Any], pods: list[dict[str, Any]]) -> PodTally:
    """Count terminal pods not counted before: Succeeded, or Failed through `spec.podFailurePolicy`
    (Ignore: not counted; FailJob: counted and the Job fails; Count or no match: counted)."""
    tally = PodTally()
    for pod in pods:
        if pod["status"]["phase"] == "Succeeded":
            tally.succeeded += 1
            continue
        match = match_pod_failure_policy(spec.get("podFailurePolicy"), pod)
        if match is not None and match.action == "Ignore":
            tally.ignored.append((pod["metadata"]["name"], match.index))
            continue
        tally.failed += 1
        if match is not None and match.action == "FailJob" and tally.failure is None:
            tally.failure = (POD_FAILURE_POLICY, match.message)
    return tally


def epoch(stamp: str) -> float:
    """Seconds since the epoch of a `metav1.Time` string."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def failure_reason(job: dict[str, Any], failed: int, pods: list[dict[str, Any]], now: float) -> tuple[str, str] | None:
    """BackoffLimitExceeded (more failed pods than backoffLimit, or OnFailure restarts reaching it) or
    DeadlineExceeded (activeDeadlineSeconds passed since startTime of a running Job), else None."""
    spec = job["spec"]
    if failed > spec.get("backoffLimit", 6) or past_backoff_limit_on_failure(job, pods):
        return BACKOFF_LIMIT_EXCEEDED
    deadline = spec.get("activeDeadlineSeconds")
    start_time = (job.get("status") or {}).get("startTime")
    if deadline is not None and start_time and not spec.get("suspend") and now >= epoch(start_time) + deadline:
        return DEADLINE_EXCEEDED
    return None


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The Job's condition of type `kind` whose status is True, if any."""
    for item in (job.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind and item.get("status") == "True":
            return item
    return None


def is_finished(job: dict[str, Any]) -> bool:
    return condition(job, "Complete") is not None or condition(job, "Failed") is not None


def set_condition(status: dict[str, Any], kind: str, value: str, reason: str, message: str, now: str) -> None:
    """Add or update a condition; lastTransitionTime moves only when the status flips."""
    conditions = status.setdefault("conditions", [])
    for item in conditions:
        if item["type"] == kind:
            if item["status"] != value:
                item["lastTransitionTime"] = now
            item.update(status=value, reason=reason, message=message, lastProbeTime=now)
            return
    conditions.append({"type": kind, "status": value, "lastProbeTime": now, "lastTransitionTime": now,
                       "reason": reason, "message": message})


def is_terminal(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in TERMINAL_PHASES


def owner_uid(obj: dict[str, Any]) -> str | None:
    """uid of the controlling owner (ownerReferences[].controller == true)."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None
