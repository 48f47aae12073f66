"""The fake's scheduler and kubelet: bind pods to one node and run their container as a local process.

Pod lifecycle written to the store, one update per step so a watcher sees each phase:
  Pending (created) -> Pending + PodScheduled True + container waiting ContainerCreating (bound to
  `fake-node`) -> Running (process started) -> Succeeded / Failed (process exited; the container's
  `state.terminated` has the exit code and reason Completed / Error / OOMKilled / StartError).
restartPolicy OnFailure restarts the container in the same pod (restartCount + 1, waiting
CrashLoopBackOff for `restart_delay` seconds). Graceful deletion: SIGTERM to the process group, SIGKILL
after the pod's grace period, terminal status, then the pod is removed (after its finalizers).

Pods of a Job marked `unschedulable` stay Pending with PodScheduled False, reason Unschedulable.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import structlog

from .defaults import FAKE_NODE, JOB_NAME_LABELS
from .jobrules import is_terminal
from .podenv import CommandMap, ContainerConfigError, StartError, container_argv, container_env
from .resources import PODS, SECRETS
from .runtime import ContainerProcess, LogBuffer
from .status import ApiError, bad_request
from .store import Store, now_rfc3339

log = structlog.get_logger(__name__)

HOST_IP = "127.0.0.1"
UNSCHEDULABLE_MESSAGE = ("0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: "
                         "1 No preemption victims found for incoming pod.")


def _stamp(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch or time.time(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PodRuntime:
    """What the kubelet keeps about one pod it runs."""

    uid: str
    tmpdir: str
    runs: list[ContainerProcess] = field(default_factory=list)
    container_ids: list[str] = field(default_factory=list)
    recorded: int = 0  # runs whose end is written into the pod status
    restart_at: float | None = None
    term_sent_at: float | None = None
    kill_at: float | None = None
    exit_override: tuple[str, int | None] | None = None
    start_error: str = ""

    @property
    def current(self) -> ContainerProcess | None:
        return self.runs[-1] if self.runs else None


def _set_pod_condition(status: dict[str, Any], kind: str, value: str, reason: str | None = None,
                       message: str | None = None) -> None:
    conditions = status.setdefault("conditions", [])
    for item in conditions:
        if item["type"] == kind:
            if item["status"] != value:
                item["lastTransitionTime"] = now_rfc3339()
            item["status"] = value
            for key, text in (("reason", reason), ("message", message)):
                if text is None:
                    item.pop(key, None)
                else:
                    item[key] = text
            return
    entry: dict[str, Any] = {"type": kind, "status": value, "lastProbeTime": None,
                             "lastTransitionTime": now_rfc3339()}
    if reason is not None:
        entry["reason"] = reason
    if message is not None:
        entry["message"] = message
    conditions.append(entry)


class Kubelet:
    """Runs every pod in the store; called by the control loop (`sync`) and by the API and test hooks."""

    def __init__(self, store: Store, command_map: CommandMap, base_env: dict[str, str], workdir: str,
                 restart_delay: float, wake: Callable[[], None]) -> None:
        self.store = store
        self.command_map = command_map
        self.base_env = base_env
        self.workdir = workdir
        self.restart_delay = restart_delay
        self.wake = wake
        self.unschedulable: set[tuple[str, str]] = set()  # (namespace, job name)
        self._runtimes: dict[str, PodRuntime] = {}
        self._lock = threading.RLock()

    # --- hooks used by the API and by tests ---------------------------------------------------------

    def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> dict[str, Any]:
        """Graceful deletion: stamp the pod; the next sync signals its process. Unbound pods go at once."""
        pod = self.store.get(PODS, namespace, name)
        if grace_seconds is None:
            grace_seconds = pod["spec"].get("terminationGracePeriodSeconds", 30)
        if not pod["spec"].get("nodeName") or is_terminal(pod):
            grace_seconds = 0
        pod = self.store.set_deletion(PODS, namespace, name, grace_seconds)
        self.wake()
        return pod

    def evict(self, namespace: str, name: str) -> None:
        """What the Eviction API does: condition DisruptionTarget, then graceful deletion."""
        def disrupt(pod: dict[str, Any]) -> None:
            _set_pod_condition(pod.setdefault("status", {}), "DisruptionTarget", "True",
                               "EvictionByEvictionAPI", "Eviction API: evicting")
        self.store.update(PODS, namespace, name, disrupt)
        self.delete_pod(namespace, name)

    def set_exit_override(self, namespace: str, name: str, reason: str, exit_code: int | None) -> PodRuntime:
        pod = self.store.get(PODS, namespace, name)
        with self._lock:
            runtime = self._runtimes.get(pod["metadata"]["uid"])
            if runtime is None:
                raise ValueError(f"pod {namespace}/{name} has not started a container yet")
            runtime.exit_override = (reason, exit_code)
            return runtime

    def inject_oom(self, namespace: str, name: str) -> None:
        """Kill the container now with SIGKILL and report it as OOMKilled (exit code 137)."""
        runtime = self.set_exit_override(namespace, name, "OOMKilled", 137)
        if runtime.current is not None:
            runtime.current.signal(signal.SIGKILL)

    def log_buffer(self, pod: dict[str, Any], container: str | None, previous: bool) -> LogBuffer:
        """The log of the pod's container (its previous run with `previous`), or the apiserver's 400."""
        name = pod["metadata"]["name"]
        containers = [c["name"] for c in pod["spec"].get("containers") or []]
        if container is None:
            if len(containers) != 1:
                raise bad_request(f"a container name must be specified for pod {name}, choose one of: "
                                  f"[{' '.join(containers)}]")
            container = containers[0]
        if container not in containers:
            raise bad_request(f"container {container} is not valid for pod {name}")
        if not pod["spec"].get("nodeName"):
            raise bad_request(f"pod {name} does not have a host assigned")
        with self._lock:
            runtime = self._runtimes.get(pod["metadata"]["uid"])
        runs = runtime.runs if runtime else []
        if previous:
            if len(runs) < 2:
                raise bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
            return runs[-2].log
        if not runs:
            statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
            reason = ((statuses[0].get("state") or {}).get("waiting") or {}).get("reason", "ContainerCreating")
            raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        return runs[-1].log

    # --- the sync pass ---------------------------------------------------------------------------------

    def sync(self) -> bool:
        """One pass over every pod. Returns True while some container runs or a timer is pending."""
        pods, _ = self.store.list(PODS)
        busy = False
        for pod in pods:
            try:
                busy = self._sync_pod(pod) or busy
            except ApiError as error:
                if error.code != 404:  # the pod went away meanwhile: nothing to do
                    raise
        self._forget_gone({p["metadata"]["uid"] for p in pods})
        return busy

    def _forget_gone(self, live_uids: set[str]) -> None:
        with self._lock:
            for uid in [u for u in self._runtimes if u not in live_uids]:
                runtime = self._runtimes.pop(uid)
                if runtime.current is not None and runtime.current.alive:
                    runtime.current.signal(signal.SIGKILL)
                shutil.rmtree(runtime.tmpdir, ignore_errors=True)

    def _sync_pod(self, pod: dict[str, Any]) -> bool:
        meta, spec = pod["metadata"], pod["spec"]
        namespace, name = meta["namespace"], meta["name"]
        with self._lock:
            runtime = self._runtimes.get(meta["uid"])
        current = runtime.current if runtime else None
        if meta.get("deletionTimestamp"):
            if current is not None and current.alive:
                assert runtime is not None
                now = time.time()
                if runtime.term_sent_at is None:
                    runtime.term_sent_at = now
                    runtime.kill_at = now + meta.get("deletionGracePeriodSeconds", 30)
                    current.signal(signal.SIGTERM)
                elif now >= (runtime.kill_at or now):
                    current.signal(signal.SIGKILL)
                return True
            if runtime is not None and runtime.recorded < len(runtime.runs):
                self._record_exit(pod, runtime, deleting=True)
            elif not is_terminal(pod):
                self.store.update(PODS, namespace, name, lambda p: p["status"].update(phase="Failed"))

            def finish(p: dict[str, Any]) -> None:
                p["metadata"]["deletionGracePeriodSeconds"] = 0
            self.store.update(PODS, namespace, name, finish)  # removed now, or once its finalizers are gone
            return False
        if is_terminal(pod):
            return False
        if not spec.get("nodeName"):
            self._schedule(pod)
            return False
        if runtime is None:
            return self._start(pod, None)
        if current is not None and not current.alive and runtime.recorded < len(runtime.runs):
            self._record_exit(pod, runtime, deleting=False)
            return True
        if runtime.restart_at is not None:
            if time.time() >= runtime.restart_at:
                return self._start(pod, runtime)
            return True
        return current is not None and current.alive

    def _job_name(self, pod: dict[str, Any]) -> str | None:
        labels = pod["metadata"].get("labels") or {}
        return labels.get(JOB_NAME_LABELS[1]) or labels.get(JOB_NAME_LABELS[0])

    def _schedule(self, pod: dict[str, Any]) -> None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        if (namespace, self._job_name(pod)) in self.unschedulable:
            self.store.update(PODS, namespace, name, lambda p: _set_pod_condition(
                p["status"], "PodScheduled", "False", "Unschedulable", UNSCHEDULABLE_MESSAGE))
            return
        container = pod["spec"]["containers"][0]

        def bind(p: dict[str, Any]) -> None:
            p["spec"]["nodeName"] = FAKE_NODE
            status = p["status"]
            _set_pod_condition(status, "PodReadyToStartContainers", "False")
            _set_pod_condition(status, "Initialized", "True")
            _set_pod_condition(status, "Ready", "False", "ContainersNotReady",
                               f"containers with unready status: [{container['name']}]")
            _set_pod_condition(status, "ContainersReady", "False", "ContainersNotReady",
                               f"containers with unready status: [{container['name']}]")
            _set_pod_condition(status, "PodScheduled", "True")
            status.update(hostIP=HOST_IP, hostIPs=[{"ip": HOST_IP}], startTime=now_rfc3339())
            status["containerStatuses"] = [{
                "name": container["name"], "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {},
                "ready": False, "restartCount": 0, "image": container["image"], "imageID": "", "started": False}]
        self.store.update(PODS, namespace, name, bind)

    def _environment(self, pod: dict[str, Any], container: dict[str, Any], tmpdir: str) -> dict[str, str]:
        declared = container_env(pod, container, self._secret)
        inherited = {key: os.environ[key] for key in ("PATH", "PYTHONPATH") if key in os.environ}
        return {**inherited, **self.base_env, "HOSTNAME": pod["metadata"]["name"], "HOME": tmpdir,
                "TMPDIR": tmpdir, **declared}

    def _secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.store.find(SECRETS, namespace, name)

    def _start(self, pod: dict[str, Any], runtime: PodRuntime | None) -> bool:
        """Start the container (first run or restart). False when it is stuck in config errors."""
        meta = pod["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        container = pod["spec"]["containers"][0]
        tmpdir = runtime.tmpdir if runtime else tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)
        try:
            env = self._environment(pod, container, tmpdir)
        except ContainerConfigError as error:
            message = str(error)  # `error` is unbound after the except block; the closure keeps the text
            if runtime is None:
                shutil.rmtree(tmpdir, ignore_errors=True)

            def waiting(p: dict[str, Any]) -> None:
                p["status"]["containerStatuses"][0]["state"] = {
                    "waiting": {"reason": "CreateContainerConfigError", "message": message}}
            self.store.update(PODS, namespace, name, waiting)
            return False
        if runtime is None:
            runtime = PodRuntime(meta["uid"], tmpdir)
            with self._lock:
                self._runtimes[meta["uid"]] = runtime
        runtime.restart_at = None
        process = ContainerProcess([], env, container.get("workingDir"), self.wake)
        runtime.runs.append(process)
        runtime.container_ids.append(f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}")
        try:
            process.argv = container_argv(container, env, self.command_map)
            process.start()
        except (StartError, OSError) as error:
            process.returncode = 128
            process.started_at = process.finished_at = time.time()
            process.log.close()
            runtime.exit_override = ("StartError", 128)
            runtime.start_error = f'exec: "{process.argv[0] if process.argv else "?"}": {error}'
            log.info("fake_pod_start_error", pod=name, error=str(error))
            return True
        log.info("fake_pod_started", pod=f"{namespace}/{name}", pid=process.pid, argv=process.argv)
        restart_count = len(runtime.runs) - 1

        def running(p: dict[str, Any]) -> None:
            status = p["status"]
            status["phase"] = "Running"
            status.update(podIP=HOST_IP, podIPs=[{"ip": HOST_IP}])
            for kind in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"):
                _set_pod_condition(status, kind, "True")
            previous = status["containerStatuses"][0]
            status["containerStatuses"] = [{
                "name": container["name"], "state": {"running": {"startedAt": _stamp(process.started_at)}},
                "lastState": previous.get("lastState", {}), "ready": True, "restartCount": restart_count,
                "image": container["image"], "imageID": f"fake-registry.local/{container['image']}@sha256:{'0' * 64}",
                "containerID": runtime.container_ids[-1], "started": True}]
        self.store.update(PODS, namespace, name, running)
        return True

    def _record_exit(self, pod: dict[str, Any], runtime: PodRuntime, *, deleting: bool) -> None:
        """Write how the last run ended: terminal phase, or (OnFailure) a restart after a back-off."""
        meta = pod["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        process = runtime.runs[-1]
        runtime.recorded = len(runtime.runs)
        exit_code = process.exit_code if process.exit_code is not None else 137
        reason = "Completed" if exit_code == 0 else "Error"
        if runtime.exit_override is not None:
            reason, forced = runtime.exit_override
            exit_code = forced if forced is not None else exit_code
            runtime.exit_override = None
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason, "startedAt": _stamp(process.started_at),
                                      "finishedAt": _stamp(process.finished_at),
                                      "containerID": runtime.container_ids[-1]}
        if reason == "StartError":
            terminated["message"] = runtime.start_error
        container = pod["spec"]["containers"][0]
        restart = (pod["spec"].get("restartPolicy") == "OnFailure" and exit_code != 0 and not deleting)
        log.info("fake_pod_container_exited", pod=f"{namespace}/{name}", exit_code=exit_code, reason=reason,
                 restart=restart)

        def ended(p: dict[str, Any]) -> None:
            status = p["status"]
            previous = status["containerStatuses"][0]
            entry = {"name": container["name"], "lastState": previous.get("lastState", {}), "ready": False,
                     "restartCount": previous.get("restartCount", 0), "image": container["image"],
                     "imageID": previous.get("imageID", ""), "containerID": runtime.container_ids[-1],
                     "started": False}
            if restart:
                entry["restartCount"] += 1
                entry["lastState"] = {"terminated": terminated}
                entry["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message":
                                              f"back-off {self.restart_delay:g}s restarting failed "
                                              f"container={container['name']} pod={name}_{namespace}({meta['uid']})"}}
                for kind in ("Ready", "ContainersReady"):
                    _set_pod_condition(status, kind, "False", "ContainersNotReady",
                                       f"containers with unready status: [{container['name']}]")
            else:
                entry["state"] = {"terminated": terminated}
                status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
                for kind in ("Ready", "ContainersReady"):
                    _set_pod_condition(status, kind, "False", "PodCompleted")
                _set_pod_condition(status, "PodReadyToStartContainers", "False")
            status["containerStatuses"] = [entry]
        self.store.update(PODS, namespace, name, ended)
        if restart:
            runtime.restart_at = time.time() + self.restart_delay

    # --- shutdown ---------------------------------------------------------------------------------------

    def running_processes(self) -> int:
        with self._lock:
            return sum(1 for r in self._runtimes.values() if r.current is not None and r.current.alive)

    def describe_running(self) -> list[str]:
        """One line per running container (pod, pid, kernel state) for timeout messages."""
        with self._lock:
            runtimes = list(self._runtimes.values())
        lines = []
        for runtime in runtimes:
            process = runtime.current
            if process is None or not process.alive:
                continue
            state = wchan = "?"
            try:
                with open(f"/proc/{process.pid}/stat") as stat:
                    state = stat.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{process.pid}/wchan") as where:
                    wchan = where.read().strip() or "-"
            except OSError:
                pass
            lines.append(f"pod uid {runtime.uid}: pid {process.pid} state {state} wchan {wchan} "
                         f"argv {process.argv[:3]}")
        return lines

    def stop(self) -> None:
        """Kill every process still running (SIGKILL) and remove the pods' temporary directories."""
        with self._lock:
            runtimes = list(self._runtimes.values())
            self._runtimes.clear()
        for runtime in runtimes:
            if runtime.current is not None and runtime.current.alive:
                runtime.current.signal(signal.SIGKILL)
        for runtime in runtimes:
            if runtime.current is not None:
                runtime.current.wait(5)
            shutil.rmtree(runtime.tmpdir, ignore_errors=True)
