"""The Kubernetes executor: each run is a batch/v1 Job whose pod runs `nexlify worker train ...`.

start(spec)   GET the Job by its deterministic name; create it when absent. A Job that exists (or a
              409 on create) is adopted, finished or not, so a controller killed at any moment and
              started again continues without a duplicate Job.
wait(handles) lists the pipeline's Jobs, then watches them from the list's resourceVersion until each
              has the terminal condition Complete or Failed (a suspended Job, waiting for Kueue, is
              waiting). A dropped watch reconnects, 410 Gone lists again, API errors back off
              exponentially (TemporaryError after a long outage). Every `pod_check_s` seconds the
              pods are looked at, so an Unschedulable or ImagePullBackOff pod is logged while it
              waits and remembered for the failure report. A failed Job is explained from its
              condition, its pods, their log tail and the Warning events.
The pipeline then trusts only result.json in the bucket.

Each Job logs the exact `kubectl logs -f job/<name> -n <ns>` to follow it (events job_created /
job_adopted). The manifest itself is the pure function `job_manifest` (kubernetes_manifest.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import urllib3
from kubernetes.client.exceptions import ApiException

from controller.config import KubernetesConfig
from controller.executors.backoff import Backoff
from controller.executors.base import RunOutcome, RunSpec
from controller.executors.kubernetes_client import (KubeApi, WatchBroken, WatchExpired, is_transient, permanent,
                                                    retry_after)
from controller.executors.kubernetes_manifest import (ANNOTATION_CONFIG_HASH, ANNOTATION_OUTPUT, CONTAINER,
                                                      LABEL_MANAGED_BY, LABEL_PIPELINE, LABEL_RUN, MANAGED_BY,
                                                      check_name_prefix, job_manifest, job_name,
                                                      kubectl_logs_command, label_selector, label_value,
                                                      owner_reference)
from controller.executors.kubernetes_status import (FailureReport, PodProblem, describe_failure, job_state,
                                                    owner_job_name, pod_problem)
from nexlify.errors import NexlifyError, PermanentError

__all__ = ["JobHandle", "KubernetesExecutor", "check_cluster", "job_manifest", "job_name", "owner_from_environment"]

log = structlog.get_logger("nexlify.executor.kubernetes")

DELETION_WAIT_S = 300.0  # a Job being deleted (foreground) must be gone before its name is reused
EVENTS_IN_REPORT = 5
OWNER_JOB_ENV = "NEXLIFY_OWNER_JOB"
OWNER_UID_ENV = "NEXLIFY_OWNER_JOB_UID"


@dataclass(frozen=True)
class JobHandle:
    """What start() returns: the run and its Job."""

    run_key: str
    job: str
    phase: str
    seed: int


@dataclass
class _JobView:
    """What wait() knows of one Job."""

    handle: JobHandle
    job: dict[str, Any] | None = None
    deleted: bool = False
    state: str = ""
    failed_pods: int = 0
    problem: PodProblem | None = None  # the last problem seen on one of its pods while waiting
    reported: set[tuple[str, str]] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return self.deleted or self.state in ("complete", "failed")


class KubernetesExecutor:
    def __init__(self, cfg: KubernetesConfig, *, pipeline_id: str, config_hash: str = "", api: KubeApi | None = None,
                 backoff: Callable[[], Backoff] = Backoff, watch_timeout_s: int = 300, pod_check_s: float = 30.0,
                 log_tail_lines: int = 20) -> None:
        check_name_prefix(cfg.name)
        self.cfg = cfg
        self.pipeline_id = pipeline_id
        self.config_hash = config_hash
        self.new_backoff = backoff
        self.watch_timeout_s = max(1, int(watch_timeout_s))
        self.pod_check_s = pod_check_s
        self.log_tail_lines = log_tail_lines
        if api is None:
            api, where = KubeApi.from_environment(cfg.namespace, backoff=backoff)
            log.info("kubernetes_configured", source=where, server=api.host, namespace=cfg.namespace)
        self.api = api
        self.selector = label_selector(cfg, pipeline_id)
        self._owner: dict[str, Any] | None = None
        self._owner_resolved = False

    # ------------------------------------------------------------------------------------- start

    def start(self, spec: RunSpec) -> JobHandle:
        name = job_name(self.cfg.name, self.pipeline_id, spec.run_key)
        handle = JobHandle(spec.run_key, name, spec.phase, spec.seed)
        fields = self._fields(handle)
        for _ in range(3):  # get, create; a Job deleted between a 409 and the next get goes round again
            existing = self._existing(name)
            if existing is None:
                created = self.api.create_job(job_manifest(spec, self.cfg, self.pipeline_id, owner=self._owner_ref(),
                                                          config_hash=self.config_hash))
                if created is not None:
                    log.info("job_created", **fields)
                    return handle
                existing = self.api.get_job(name)  # 409: created meanwhile (a previous controller's retry)
                if existing is None:
                    continue
            self._check_ours(existing, spec)
            log.info("job_adopted", state=job_state(existing), **fields)
            return handle
        raise PermanentError(f"Job {name} in namespace {self.cfg.namespace} keeps appearing and disappearing; "
                             "is another controller deleting it?")

    def _fields(self, handle: JobHandle) -> dict[str, Any]:
        return {"pipeline": self.pipeline_id, "phase": handle.phase, "run": handle.run_key, "seed": handle.seed,
                "job": handle.job, "namespace": self.cfg.namespace,
                "logs": kubectl_logs_command(handle.job, self.cfg.namespace)}

    def _existing(self, name: str) -> dict[str, Any] | None:
        """The Job of that name, or None; a Job being deleted is waited out (its name is not free yet)."""
        deadline = time.monotonic() + DELETION_WAIT_S
        while True:
            job = self.api.get_job(name)
            if job is None or not job["metadata"].get("deletionTimestamp"):
                return job
            if time.monotonic() >= deadline:
                raise PermanentError(f"Job {name} has been being deleted for {DELETION_WAIT_S:.0f} s; remove it "
                                     f"(kubectl delete job {name} -n {self.cfg.namespace}) and start again")
            log.info("job_being_deleted", job=name)
            time.sleep(1.0)

    def _check_ours(self, job: dict[str, Any], spec: RunSpec) -> None:
        labels = job["metadata"].get("labels") or {}
        expected = {LABEL_PIPELINE: label_value(self.pipeline_id), LABEL_RUN: label_value(spec.run_key),
                    LABEL_MANAGED_BY: MANAGED_BY}
        wrong = {k: labels.get(k) for k, v in expected.items() if labels.get(k) != v}
        if wrong:
            name = job["metadata"]["name"]
            raise PermanentError(f"Job {name} in namespace {self.cfg.namespace} exists but is not this run's "
                                 f"(labels {wrong}, expected {expected}): delete it or choose another --name")
        # The name already covers the output and the config; the annotations say it in full, so a Job of
        # another pipeline (another output, another config) is never adopted, even on a hash collision.
        annotations = job["metadata"].get("annotations") or {}
        name = job["metadata"]["name"]
        theirs = (annotations.get(ANNOTATION_OUTPUT), annotations.get(ANNOTATION_CONFIG_HASH))
        ours = (spec.output_url, self.config_hash or annotations.get(ANNOTATION_CONFIG_HASH))
        if theirs != ours:
            raise PermanentError(
                f"Job {name} in namespace {self.cfg.namespace} belongs to another pipeline (output {theirs[0]}, "
                f"config hash {theirs[1]}; this run: output {ours[0]}, config hash {ours[1]}): it is not adopted; "
                f"delete it (kubectl delete job {name} -n {self.cfg.namespace}) or choose another --name")

    def _owner_ref(self) -> dict[str, Any] | None:
        """ownerReference to the controller's own Job, resolved once.

        Its name is `owner_job`, else NEXLIFY_OWNER_JOB (the Helm chart sets both env variables from the
        controller pod's labels; under a CronJob only the pod knows its Job's generated name). The uid
        comes from NEXLIFY_OWNER_JOB_UID when it is about the same Job, else from a GET.
        """
        if not self._owner_resolved:
            name, uid = owner_from_environment(self.cfg.owner_job, os.environ)
            if name and not uid:
                owner = self.api.get_job(name)
                if owner is None:
                    raise PermanentError(f"owner_job {name!r}: no such Job in namespace {self.cfg.namespace}; "
                                         "the controller's own Job must run in the namespace of the run Jobs")
                uid = owner["metadata"]["uid"]
            self._owner = owner_reference(name, uid) if name else None
            self._owner_resolved = True
        return self._owner

    # -------------------------------------------------------------------------------------- wait

    def wait(self, handles: list[JobHandle]) -> list[RunOutcome]:
        views = {h.job: _JobView(h) for h in handles}
        backoff = self.new_backoff()
        resource_version: str | None = None
        next_pod_check = time.monotonic() + self.pod_check_s
        quick_breaks = 0  # watches in a row that broke off at once, without an event
        while not all(v.finished for v in views.values()):
            opened, delivered = time.monotonic(), False
            try:
                if resource_version is None:
                    items, resource_version = self.api.list_jobs(self.selector)
                    present = {item["metadata"]["name"]: item for item in items}
                    for name, view in views.items():
                        self._observe(view, present.get(name))
                    backoff.succeeded()
                    continue
                timeout = max(1, math.ceil(min(self.watch_timeout_s, next_pod_check - time.monotonic())))
                with contextlib.closing(self.api.watch_jobs(self.selector, resource_version, timeout)) as events:
                    for event in events:
                        backoff.succeeded()
                        delivered = True
                        obj = event["object"]
                        resource_version = obj["metadata"].get("resourceVersion") or resource_version
                        view = views.get(obj["metadata"].get("name", ""))
                        if event["type"] == "BOOKMARK" or view is None:
                            continue
                        self._observe(view, None if event["type"] == "DELETED" else obj)
                        if all(v.finished for v in views.values()):
                            break
                backoff.succeeded()
                quick_breaks = 0
            except WatchExpired as expired:
                log.info("job_watch_expired", pipeline=self.pipeline_id, resource_version=resource_version,
                         detail=str(expired))
                resource_version = None
            except WatchBroken as broken:
                log.info("job_watch_reconnect", pipeline=self.pipeline_id, detail=str(broken)[:200])
                quick_breaks = 0 if delivered or time.monotonic() - opened >= 1.0 else quick_breaks + 1
                if quick_breaks > 1:  # breaking off again and again at once: do not hammer the server
                    backoff.failed(broken, action="watching Jobs")
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
                if not is_transient(error):
                    raise permanent(error, "watching Jobs", self.cfg.namespace, self.api.host) from None
                backoff.failed(error, retry_after=retry_after(error), action="watching Jobs")
            if time.monotonic() >= next_pod_check:
                self._check_pods(views)
                next_pod_check = time.monotonic() + self.pod_check_s
        return [self._outcome(views[h.job]) for h in handles]

    def _observe(self, view: _JobView, job: dict[str, Any] | None) -> None:
        """Take in the Job's latest state (None: it is gone) and log what changed."""
        fields = self._fields(view.handle)
        if job is None:
            if not view.deleted:
                view.deleted = True
                log.warning("job_deleted", **fields)
            return
        view.job = job
        state = job_state(job)
        failed = int((job.get("status") or {}).get("failed") or 0)
        if failed > view.failed_pods and state != "failed":
            log.warning("job_pod_failed", failed=failed, backoff_limit=job["spec"].get("backoffLimit"), **fields)
        view.failed_pods = failed
        if state != view.state:
            view.state = state
            if state == "suspended":
                log.info("job_suspended", detail="waiting for admission (Kueue) or a resume", **fields)
            elif state == "running":
                log.info("job_running", **fields)
            elif state == "complete":
                log.info("job_succeeded", **fields)

    def _check_pods(self, views: dict[str, _JobView]) -> None:
        """Log (once) and remember problems of waiting pods: Unschedulable, image pulls, failed attempts."""
        try:
            pods = self.api.list_pods(self.selector)
        except NexlifyError as error:
            log.warning("pod_check_failed", pipeline=self.pipeline_id, error=str(error))
            return
        for pod in sorted(pods, key=_created):
            view = views.get(owner_job_name(pod) or "")
            if view is None or view.finished:
                continue
            problem = pod_problem(pod)
            if problem is None:
                continue
            view.problem = problem
            key = (problem.pod, problem.reason)
            if key not in view.reported:
                view.reported.add(key)
                log.warning("job_pod_problem", **problem.as_dict(), **self._fields(view.handle))

    def _outcome(self, view: _JobView) -> RunOutcome:
        handle = view.handle
        if view.deleted:
            reason = (f"Job {handle.job} was deleted before it finished (kubectl delete, or its "
                      "ttlSecondsAfterFinished passed); start the pipeline again to re-create it")
            return RunOutcome(handle.run_key, False, reason=reason, details={"job": handle.job})
        assert view.job is not None
        if view.state == "complete":
            return RunOutcome(handle.run_key, True, details={"job": handle.job, "exit_code": 0})
        report = self._diagnose(view)
        log.error("job_failed", **{**report.details, **self._fields(handle), "reason": report.reason})
        return RunOutcome(handle.run_key, False, reason=report.reason, details=report.details)

    def _diagnose(self, view: _JobView) -> FailureReport:
        """describe_failure with what the API still has: the Job's pods, a log tail, Warning events."""
        job = view.job
        assert job is not None
        pods: list[dict[str, Any]] = []
        tail: list[str] = []
        events: list[str] = []
        try:
            match = ((job.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            selector = ",".join(f"{k}={v}" for k, v in sorted(match.items()))
            pods = sorted(self.api.list_pods(selector), key=_created) if selector else []
            started = [p for p in pods if _container_started(p)]
            if started:
                tail = self.api.pod_log_tail(started[-1]["metadata"]["name"], CONTAINER, self.log_tail_lines)
            names = [job["metadata"]["name"]] + [p["metadata"]["name"] for p in pods[-1:]]
            for name in names:
                events += [f"{e.get('reason')}: {e.get('message')}" for e in self.api.list_events(name)
                           if e.get("type") == "Warning"]
        except NexlifyError as error:  # the report is best effort; the failure itself is certain
            log.warning("job_diagnosis_incomplete", job=job["metadata"]["name"], error=str(error))
        return describe_failure(job, pods, self.cfg, remembered=view.problem, log_tail=tail,
                                events=events[-EVENTS_IN_REPORT:])

    def close(self) -> None:
        """Nothing to stop: the Jobs run on without the controller. Release the HTTP connections."""
        self.api.close()


def owner_from_environment(owner_job: str, env: Mapping[str, str]) -> tuple[str, str]:
    """(name, uid) of the controller's own Job: uid only when the environment names that same Job."""
    env_name, env_uid = env.get(OWNER_JOB_ENV, ""), env.get(OWNER_UID_ENV, "")
    name = owner_job or env_name
    return name, (env_uid if name and name == env_name else "")


def _created(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("creationTimestamp") or "", meta.get("name") or ""


def _container_started(pod: dict[str, Any]) -> bool:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "running" in state or "terminated" in state or (status.get("lastState") or {}).get("terminated"):
            return True
    return False


def check_cluster(cfg: KubernetesConfig) -> str:
    """Preflight: the API answers, the namespace exists, the controller may list Jobs there."""
    check_name_prefix(cfg.name)
    api, where = KubeApi.from_environment(cfg.namespace, backoff=lambda: Backoff(budget=20.0, cap=5.0))
    try:
        version = api.server_version()
        exists = api.namespace_exists()
        if exists is False:
            raise PermanentError(f"namespace {cfg.namespace!r} does not exist on {api.host}: create it "
                                 f"(kubectl create namespace {cfg.namespace}) or choose another --namespace")
        api.list_jobs(f"{LABEL_MANAGED_BY}={MANAGED_BY}")
    finally:
        api.close()
    note = "" if exists else " (the namespace itself could not be read: no permission to get it)"
    return f"namespace {cfg.namespace} on {api.host} (Kubernetes {version}, {where}): Jobs can be listed{note}"
