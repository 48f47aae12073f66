"""The fake's Job controller, garbage collector, TTL-after-finished controller and event recorder.

Per Job, each pass (`sync`) does what `pkg/controller/job` does for a NonIndexed Job:
- counts pods that reached a terminal phase and still carry the `batch.kubernetes.io/job-tracking`
  finalizer into `status.succeeded` / `status.failed`, then removes the finalizer (so no pod is
  counted twice and none vanishes uncounted); a failed pod first goes through `podFailurePolicy`
  (FailJob -> the Job fails with reason PodFailurePolicy, Ignore -> not counted, Count/no match -> counted);
- fails the Job when `failed > backoffLimit` (OnFailure: container restarts reach backoffLimit), or when
  `activeDeadlineSeconds` passed since `startTime`: first condition FailureTarget (pods are deleted),
  then, on a later pass once no pod is left running, Failed with the same reason and message;
- succeeds when `succeeded >= completions`: SuccessCriteriaMet, then Complete plus completionTime;
- suspended (`spec.suspend: true`): deletes active pods, condition Suspended True, no startTime;
  resumed: Suspended False (reason JobResumed), startTime reset, pods created again;
- otherwise creates pods up to `parallelism`, one after the other: with podReplacementPolicy Failed
  a replacement waits until the old pod is terminal; `retry_delay` (default 0; real: 10 s doubling
  up to 6 min) spaces the retries.
Deleting a Job: Background (the Job goes at once, the collector deletes its pods), Foreground (the Job
waits with the foregroundDeletion finalizer until its pods are gone), Orphan (owner references
removed, pods keep running). `ttlSecondsAfterFinished` deletes a finished Job (Background).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from .defaults import JOB_TRACKING_FINALIZER, pod_for_job
from .jobrules import (COMPLETIONS_REACHED, condition, count_finished_pods, epoch, failure_reason, is_finished,
                       is_terminal, owner_uid, set_condition)
from .kubelet import Kubelet
from .resources import EVENTS, JOBS, PODS
from .status import ApiError
from .store import Store, now_rfc3339

log = structlog.get_logger(__name__)

MAX_RETRY_DELAY = 360.0


def _ignore_gone(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a store call; an object that vanished meanwhile (404) is not an error for a controller."""
    try:
        return call(*args, **kwargs)
    except ApiError as error:
        if error.code != 404:
            raise
        return None


class JobController:
    """Reconciles every Job; called by the control loop."""

    def __init__(self, store: Store, kubelet: Kubelet, retry_delay: float) -> None:
        self.store = store
        self.kubelet = kubelet
        self.retry_delay = retry_delay
        self._not_counted: set[str] = set()  # pods the controller deleted for suspend/success
        self._next_create: dict[str, float] = {}  # job uid -> earliest start of its next pod

    # --- events ----------------------------------------------------------------------------------

    def record_event(self, obj: dict[str, Any], kind: str, event_type: str, reason: str, message: str) -> None:
        """A v1 Event about `obj`, as the job controller's recorder writes it."""
        meta = obj["metadata"]
        now = now_rfc3339()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj.get("apiVersion", "batch/v1"), "kind": kind, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"],
                               "resourceVersion": meta.get("resourceVersion", "")},
            "reason": reason, "message": message, "type": event_type, "source": {"component": "job-controller"},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": "job-controller", "reportingInstance": "",
        }
        self.store.create(EVENTS, event)

    # --- the pass ----------------------------------------------------------------------------------

    def sync(self) -> bool:
        """One pass over every Job and the garbage. True while a retry timer is pending."""
        jobs, _ = self.store.list(JOBS)
        pods, _ = self.store.list(PODS)
        by_owner: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            uid = owner_uid(pod)
            if uid is not None:
                by_owner.setdefault(uid, []).append(pod)
        busy = False
        for job in jobs:
            try:
                busy = self._sync_job(job, by_owner.get(job["metadata"]["uid"], [])) or busy
            except ApiError as error:
                if error.code != 404:
                    raise
        live = {job["metadata"]["uid"] for job in jobs}
        for uid, owned in by_owner.items():
            if uid not in live:
                self._collect_orphans(owned)
        return busy

    def _unfinalize(self, pod: dict[str, Any]) -> None:
        def drop(p: dict[str, Any]) -> None:
            finalizers = [f for f in p["metadata"].get("finalizers") or [] if f != JOB_TRACKING_FINALIZER]
            if finalizers:
                p["metadata"]["finalizers"] = finalizers
            else:
                p["metadata"].pop("finalizers", None)
        if JOB_TRACKING_FINALIZER in (pod["metadata"].get("finalizers") or []):
            _ignore_gone(self.store.update, PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], drop)

    def _delete_pod(self, pod: dict[str, Any]) -> None:
        if not pod["metadata"].get("deletionTimestamp"):
            _ignore_gone(self.kubelet.delete_pod, pod["metadata"]["namespace"], pod["metadata"]["name"])

    def _collect_orphans(self, pods: list[dict[str, Any]]) -> None:
        """Pods whose Job is gone (Background deletion): delete them and release their finalizer."""
        for pod in pods:
            self._delete_pod(pod)
            self._unfinalize(pod)

    def _sync_deleting(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        meta = job["metadata"]
        finalizers = meta.get("finalizers") or []
        if "foregroundDeletion" in finalizers:
            for pod in pods:
                self._delete_pod(pod)
                self._unfinalize(pod)
            if pods:
                return
            remove = "foregroundDeletion"
        elif "orphan" in finalizers:
            for pod in pods:
                def orphan(p: dict[str, Any]) -> None:
                    refs = [r for r in p["metadata"].get("ownerReferences") or [] if r.get("uid") != meta["uid"]]
                    if refs:
                        p["metadata"]["ownerReferences"] = refs
                    else:
                        p["metadata"].pop("ownerReferences", None)
                    finalizers_left = [f for f in p["metadata"].get("finalizers") or [] if f != JOB_TRACKING_FINALIZER]
                    if finalizers_left:
                        p["metadata"]["finalizers"] = finalizers_left
                    else:
                        p["metadata"].pop("finalizers", None)
                _ignore_gone(self.store.update, PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], orphan)
            remove = "orphan"
        else:
            return

        def release(j: dict[str, Any]) -> None:
            j["metadata"]["finalizers"] = [f for f in j["metadata"].get("finalizers") or [] if f != remove]
            if not j["metadata"]["finalizers"]:
                del j["metadata"]["finalizers"]
        _ignore_gone(self.store.update, JOBS, meta["namespace"], meta["name"], release)

    def _sync_finished(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            if is_terminal(pod):
                self._unfinalize(pod)
            else:
                self._delete_pod(pod)
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        finished = condition(job, "Complete") or condition(job, "Failed")
        assert finished is not None
        if time.time() >= epoch(finished["lastTransitionTime"]) + ttl:
            meta = job["metadata"]
            log.info("fake_job_ttl_expired", job=f"{meta['namespace']}/{meta['name']}")
            _ignore_gone(self.store.delete, JOBS, meta["namespace"], meta["name"],
                         preconditions={"uid": meta["uid"]})

    def _sync_job(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
        meta, spec = job["metadata"], job["spec"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if meta.get("deletionTimestamp"):
            self._sync_deleting(job, pods)
            return False
        if is_finished(job):
            self._sync_finished(job, pods)
            return False
        now, stamp = time.time(), now_rfc3339()
        old_status = job.get("status") or {}
        counted = [p for p in pods if is_terminal(p) and JOB_TRACKING_FINALIZER in (p["metadata"].get("finalizers") or [])]
        tally = count_finished_pods(spec, [p for p in counted if p["metadata"]["uid"] not in self._not_counted])
        for pod_name, rule in tally.ignored:
            log.info("fake_job_pod_failure_ignored", job=name, pod=pod_name, rule=rule)
        succeeded = old_status.get("succeeded", 0) + tally.succeeded
        failed = old_status.get("failed", 0) + tally.failed
        non_terminal = [p for p in pods if not is_terminal(p)]
        active = [p for p in non_terminal if not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in non_terminal if p["metadata"].get("deletionTimestamp")]
        failure_target = condition(job, "FailureTarget")
        success_met = condition(job, "SuccessCriteriaMet")
        if failure_target is not None:  # once decided, the outcome does not change
            failure: tuple[str, str] | None = (failure_target["reason"], failure_target["message"])
        elif success_met is not None:
            failure = None
        else:
            failure = tally.failure or failure_reason(job, failed, pods, now)
        completions = spec.get("completions")
        success = success_met is not None or (failure is None and (
            (completions is not None and succeeded >= completions) or
            (completions is None and succeeded > 0 and not active)))

        status = {k: v for k, v in old_status.items()}
        to_delete: list[dict[str, Any]] = []
        to_create = 0
        events: list[tuple[str, str, str]] = []
        busy = False
        if failure is not None:
            if failure_target is None:
                set_condition(status, "FailureTarget", "True", failure[0], failure[1], stamp)
                events.append(("Warning", failure[0], failure[1]))
            to_delete = active
            if failure_target is not None and not active and not terminating:
                set_condition(status, "Failed", "True", failure[0], failure[1], stamp)
        elif success:
            if success_met is None:
                set_condition(status, "SuccessCriteriaMet", "True", *COMPLETIONS_REACHED, stamp)
            to_delete = active
            self._not_counted.update(p["metadata"]["uid"] for p in active)
            if success_met is not None and not active and not terminating:
                set_condition(status, "Complete", "True", *COMPLETIONS_REACHED, stamp)
                status["completionTime"] = stamp
                events.append(("Normal", "Completed", "Job completed"))
        elif spec.get("suspend"):
            to_delete = active
            self._not_counted.update(p["metadata"]["uid"] for p in active)
            if condition(job, "Suspended") is None:
                set_condition(status, "Suspended", "True", "JobSuspended", "Job suspended", stamp)
                events.append(("Normal", "Suspended", "Job suspended"))
            status.pop("startTime", None)
        else:
            if condition(job, "Suspended") is not None:
                set_condition(status, "Suspended", "False", "JobResumed", "Job resumed", stamp)
                events.append(("Normal", "Resumed", "Job resumed"))
                status["startTime"] = stamp
            status.setdefault("startTime", stamp)
            if tally.failed and self.retry_delay > 0:
                self._next_create[uid] = now + min(self.retry_delay * 2 ** (failed - 1), MAX_RETRY_DELAY)
            wanted = spec.get("parallelism", 1)
            if completions is not None:
                wanted = min(wanted, completions - succeeded)
            blocked = spec.get("podReplacementPolicy") == "Failed" and terminating
            if wanted > len(active) and not blocked:
                if now >= self._next_create.get(uid, 0.0):
                    to_create = wanted - len(active)
                else:
                    busy = True

        created = []
        for _ in range(to_create):
            pod = self.store.create(PODS, pod_for_job(job))
            created.append(pod)
            events.append(("Normal", "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}"))
        still_active = [p for p in active if p not in to_delete] + created
        ready = sum(1 for p in still_active for c in (p.get("status") or {}).get("conditions") or []
                    if c["type"] == "Ready" and c["status"] == "True")
        for key, value in (("active", len(still_active)), ("succeeded", succeeded), ("failed", failed)):
            if value:
                status[key] = value
            else:
                status.pop(key, None)
        status["ready"] = ready
        status["terminating"] = len(terminating) + len(to_delete)
        status["uncountedTerminatedPods"] = {}

        def write(j: dict[str, Any]) -> None:
            j["status"] = status
        updated = self.store.update(JOBS, namespace, name, write)
        for event_type, reason, message in events:
            self.record_event(updated, "Job", event_type, reason, message)
        for pod in to_delete:
            self._delete_pod(pod)
            self.record_event(updated, "Job", "Normal", "SuccessfulDelete", f"Deleted pod: {pod['metadata']['name']}")
        for pod in counted:
            self._unfinalize(pod)
        return busy
