"""`FakeCluster`: a small, strict, in-process Kubernetes API server with a Job controller that runs pods
as local processes. Start it, write a kubeconfig, and point the official client at it.

    with FakeCluster(image_command_map={"nexlify": [sys.executable, "-m", "nexlify.cli"]}) as cluster:
        cluster.kubeconfig(tmp_path / "kubeconfig")
        kubernetes.config.load_kube_config(config_file=str(tmp_path / "kubeconfig"))
        kubernetes.client.BatchV1Api().create_namespaced_job("default", job)
        cluster.wait_idle()

Where it behaves differently from a real cluster is listed in `tests/fake_k8s/DIFFERENCES.md`.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

import structlog
import yaml

from .api import Api
from .controlplane import ControlPlane
from .defaults import default_namespace
from .jobcontroller import JobController
from .kubelet import Kubelet
from .podenv import CommandMap
from .resources import NAMESPACES, PODS, ResourceType, find
from .server import FakeHTTPServer, RequestLog
from .store import Store
from .validation import check_version_supported

log = structlog.get_logger(__name__)

INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class FakeCluster:
    """A fake apiserver + scheduler + kubelet + Job controller on 127.0.0.1 (a free port).

    Parameters:
      kubernetes_version: the release whose strict OpenAPI schema validates every object (kubernetes-validate)
        and that `/version` reports, e.g. "1.33".
      image_command_map: maps a container's `command[0]` (or, without `command`, its image reference) to a
        local argv prefix, e.g. {"nexlify": [sys.executable, "-m", "nexlify.cli"]}; or a callable
        `container dict -> argv`. Commands not in the map run as they are.
      base_env: extra environment for every container (PATH and PYTHONPATH are inherited anyway).
      token: the bearer token the server accepts (written into the kubeconfig).
      history_size: how many watch events are kept; older resourceVersions get 410 Expired.
      bookmark_interval: seconds between BOOKMARK events on watches that allow them (real: about 60).
      retry_delay: seconds before a failed Job pod is replaced, doubling per failure (real: 10 s, up to 6 min).
      restart_delay: seconds before an OnFailure container is restarted (real CrashLoopBackOff: 10 s and up).
      tick: the control loop's longest sleep; bounds how late deadlines and timers fire.
    """

    def __init__(self, *, kubernetes_version: str = "1.33", image_command_map: CommandMap | None = None,
                 base_env: Mapping[str, str] | None = None, token: str | None = None, history_size: int = 1000,
                 bookmark_interval: float = 60.0, retry_delay: float = 0.0, restart_delay: float = 0.0,
                 tick: float = 0.05) -> None:
        check_version_supported(kubernetes_version)
        self.kubernetes_version = kubernetes_version
        self.token = token or secrets.token_hex(16)
        self._workdir = ""  # per-pod temporary directories go here; made by start()
        self.store = Store(history_size)
        self._control: ControlPlane | None = None
        self.kubelet = Kubelet(self.store, image_command_map or {}, dict(base_env or {}), "",
                               restart_delay, self._wake)
        self.jobs = JobController(self.store, self.kubelet, retry_delay)
        self._control = ControlPlane(self.store, self.kubelet, self.jobs, tick)
        self.store.add_listener(self._wake)
        self.api = Api(self.store, self.kubelet, kubernetes_version, self._wake, bookmark_interval)
        self._server: FakeHTTPServer | None = None
        self.kubeconfig_path: Path | None = None  # the last kubeconfig written by kubeconfig()
        self._thread: threading.Thread | None = None
        for name in INITIAL_NAMESPACES:
            self.create_namespace(name)

    def _wake(self) -> None:
        if self._control is not None:
            self._control.wake()

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "FakeCluster":
        """Listen on 127.0.0.1 (a free port) and start the control loop."""
        self._workdir = self.kubelet.workdir = tempfile.mkdtemp(prefix="fake-k8s-")
        self._server = FakeHTTPServer(("127.0.0.1", 0), self.api, self.token)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-k8s-http", daemon=True)
        self._thread.start()
        assert self._control is not None
        self._control.start()
        log.info("fake_k8s_started", url=self.url, kubernetes_version=self.kubernetes_version)
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections, kill every container process, remove temporary files."""
        if self._server is not None:
            self._server.shutdown()
            self._server.close_all()
            self._server.server_close()
        if self._control is not None:
            self._control.stop()
        self.kubelet.stop()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        log.info("fake_k8s_stopped")

    def __enter__(self) -> "FakeCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the cluster first"
        return f"http://{self._server.address}"

    def kubeconfig(self, path: str | Path, *, namespace: str = "default", context: str = "fake") -> Path:
        """Write a kubeconfig (plain-http server, token user) for `kubernetes.config.load_kube_config`.

        The in-cluster route (KUBERNETES_SERVICE_HOST/PORT + a service-account token file) is
        https-only in the Python client, so the fake offers this kubeconfig instead.
        """
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": context, "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "fake-user",
                                                       "namespace": namespace}}],
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig_path = path
        return path

    # --- direct access for assertions ----------------------------------------------------------------

    @property
    def requests(self) -> RequestLog:
        """Every resource request received, as `ApiCall(verb, group, version, resource, subresource, namespace, name)`."""
        assert self._server is not None, "start() the cluster first"
        return self._server.requests

    @property
    def nonresource_requests(self) -> list[tuple[str, str]]:
        """(verb, path) of discovery and other non-resource requests."""
        assert self._server is not None, "start() the cluster first"
        return list(self._server.nonresource_requests)

    @property
    def errors(self) -> list[str]:
        """Tracebacks of unexpected exceptions in the fake itself (answered 500 or logged by the loop)."""
        server_errors = self._server.errors if self._server is not None else []
        control_errors = self._control.errors if self._control is not None else []
        return list(server_errors) + list(control_errors)

    def get(self, resource: str, name: str, namespace: str = "default", group: str = "") -> dict[str, Any] | None:
        """The stored object (a copy), or None. `resource` is plural ("jobs" needs group "batch")."""
        rt: ResourceType | None = find(group or ("batch" if resource == "jobs" else ""), "v1", resource)
        assert rt is not None, f"unknown resource {resource!r}"
        return self.store.find(rt, namespace, name)

    def pods_of(self, job_name: str, namespace: str = "default") -> list[dict[str, Any]]:
        """Pods labelled with `job-name=<job_name>`, oldest first."""
        pods, _ = self.store.list(PODS, namespace)
        owned = [p for p in pods if (p["metadata"].get("labels") or {}).get("job-name") == job_name]
        return sorted(owned, key=lambda p: self.store.creation_order(p["metadata"]["uid"]))

    def create_namespace(self, name: str) -> dict[str, Any]:
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        default_namespace(namespace)
        return self.store.create(NAMESPACES, namespace)

    # --- test hooks ----------------------------------------------------------------------------------

    def evict_pod(self, name: str, namespace: str = "default") -> None:
        """Evict like the Eviction API: condition DisruptionTarget (reason EvictionByEvictionAPI), SIGTERM,
        pod Failed, then deleted. A podFailurePolicy `Ignore` rule on DisruptionTarget then applies."""
        self.kubelet.evict(namespace, name)

    def set_exit_reason(self, pod: str, reason: str, exit_code: int | None = None, namespace: str = "default") -> None:
        """Report the container's next termination with `reason` (and `exit_code` if given)."""
        self.kubelet.set_exit_override(namespace, pod, reason, exit_code)

    def inject_oom(self, pod: str, namespace: str = "default") -> None:
        """SIGKILL the container now and report it terminated with reason OOMKilled, exit code 137."""
        self.kubelet.inject_oom(namespace, pod)

    def drop_watches(self) -> int:
        """Cut every open watch (and log follow) connection abruptly; returns how many were cut."""
        assert self._server is not None
        return self._server.drop_watches()

    def open_watches(self) -> int:
        assert self._server is not None
        return self._server.open_watches()

    def compact_history(self) -> None:
        """Forget the watch history: a watch from any earlier resourceVersion gets ERROR 410 Expired."""
        self.store.compact()

    def fail_next(self, n: int = 1, code: int = 500, *, verb: str | None = None, resource: str | None = None) -> None:
        """Answer the next `n` resource requests (optionally only of `verb` / `resource`) with error `code`
        (500 InternalError, 429 TooManyRequests with Retry-After: 1, 503, 504, 409...)."""
        assert self._server is not None
        self._server.failures.add(n, code, verb, resource)

    def unschedulable(self, job_name: str, namespace: str = "default", value: bool = True) -> None:
        """Keep (or stop keeping) the Job's pods Pending with PodScheduled False, reason Unschedulable."""
        key = (namespace, job_name)
        if value:
            self.kubelet.unschedulable.add(key)
        else:
            self.kubelet.unschedulable.discard(key)
        self._wake()

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until nothing runs and the controllers have nothing left to do (TimeoutError otherwise)."""
        assert self._control is not None
        self._control.wait_idle(timeout)

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "not started"
        return f"FakeCluster({where}, kubernetes {self.kubernetes_version})"


def python_command_map() -> dict[str, list[str]]:
    """A map running `python`/`python3` containers with this interpreter."""
    return {"python": [sys.executable], "python3": [sys.executable]}
