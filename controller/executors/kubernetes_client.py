"""The few Kubernetes API calls the controller makes, with retries and errors a user can act on.

Every call here is listed in `kubernetes_rbac.py` (the Helm chart's Role is checked against that list).
Objects travel as plain dicts (raw JSON, `_preload_content=False`): the manifests are built as dicts,
and status fields newer than the client's models are never lost in translation.

Errors: 429, 5xx and connection failures are temporary and retried with exponential backoff inside
each call (TemporaryError once they have lasted too long); everything else becomes a PermanentError
naming the call, the namespace and what to check (401 credentials, 403 RBAC, 404 namespace, 422 the
object). 404 and 409 reach the caller as `ApiException` where they mean something (absent, exists).

Configuration: in a pod (service host and token present, no KUBECONFIG set) the service account
(`load_incluster_config`), otherwise the kubeconfig (`load_kube_config`, KUBECONFIG honoured, a
`:`-separated list merged as kubectl does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import structlog
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from controller.executors.backoff import Backoff
from nexlify.errors import PermanentError

log = structlog.get_logger("nexlify.executor.kubernetes")

T = TypeVar("T")

SERVICE_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})  # and any other 5xx
RBAC_FILE = "controller/executors/kubernetes_rbac.py"


class WatchBroken(Exception):
    """A watch stream that was open broke off (connection cut, load balancer, apiserver restart)."""


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


# -------------------------------------------------------------------------------- configuration


def config_source(env: Mapping[str, str], token_file_exists: bool) -> str:
    """"in-cluster" in a pod with a service account (unless KUBECONFIG says otherwise), else "kubeconfig"."""
    in_pod = bool(env.get("KUBERNETES_SERVICE_HOST")) and bool(env.get("KUBERNETES_SERVICE_PORT"))
    if in_pod and token_file_exists and not env.get("KUBECONFIG"):
        return "in-cluster"
    return "kubeconfig"


def load_configuration(env: Mapping[str, str] | None = None) -> tuple[k8s.Configuration, str]:
    """A client Configuration of its own (the process-wide default is left alone) and where it came from."""
    env = os.environ if env is None else env
    configuration = k8s.Configuration()
    source = config_source(env, os.path.exists(SERVICE_TOKEN_FILE))
    try:
        if source == "in-cluster":
            k8s_config.load_incluster_config(client_configuration=configuration)
            where = "the pod's service account"
        else:
            path = env.get("KUBECONFIG") or None
            k8s_config.load_kube_config(config_file=path, client_configuration=configuration)
            where = f"kubeconfig {path or '~/.kube/config'}"
    except (ConfigException, OSError, ValueError) as error:
        raise PermanentError(
            f"no usable Kubernetes configuration ({error}): outside a cluster set KUBECONFIG or write "
            "~/.kube/config (kubectl's own configuration works); in a pod the controller uses its service "
            "account") from None
    return configuration, where


# ------------------------------------------------------------------------------------ errors


def status_of(error: BaseException) -> int | None:
    return error.status if isinstance(error, ApiException) else None


def is_transient(error: BaseException) -> bool:
    """429, 5xx, and failures to talk at all (refused, reset, timed out) may pass; the rest will not."""
    if isinstance(error, ApiException):
        # status 0: the client's own failure (TLS verification, a request it cannot build): permanent
        return error.status in TRANSIENT_STATUS or (error.status or 0) >= 500
    return isinstance(error, (urllib3.exceptions.HTTPError, OSError, WatchBroken))


def server_message(error: BaseException) -> str:
    """The apiserver's Status message, else the exception's text."""
    if isinstance(error, ApiException):
        try:
            body = json.loads(error.body or "")
            if isinstance(body, dict) and body.get("message"):
                return str(body["message"])
        except (ValueError, TypeError):
            pass
        return f"{error.status} {error.reason}"
    return str(error)


def retry_after(error: BaseException) -> float | None:
    headers = getattr(error, "headers", None) or {}
    try:
        value = headers.get("Retry-After")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def permanent(error: BaseException, action: str, namespace: str, host: str) -> PermanentError:
    """The PermanentError for a failed call, saying what to check."""
    code, message = status_of(error), server_message(error)
    if code == 401:
        return PermanentError(f"the Kubernetes API at {host} rejected the controller's credentials (401) while "
                              f"{action}: check the kubeconfig user or the pod's service account token")
    if code == 403:
        return PermanentError(f"forbidden (403) while {action} in namespace {namespace}: {message}; the "
                              f"controller's Role must allow the calls listed in {RBAC_FILE} (the Helm chart's "
                              "Role is built from that list)")
    if code == 404:
        return PermanentError(f"not found (404) while {action}: {message}; check that namespace {namespace} "
                              f"exists on {host} (--namespace)")
    if code == 422:
        return PermanentError(f"the API server rejected the object as invalid while {action}: {message}")
    return PermanentError(f"the Kubernetes API at {host} refused {action} ({message})")


# ---------------------------------------------------------------------------------------- API


class KubeApi:
    """Namespaced calls for one controller; each retries temporary failures with its own Backoff."""

    def __init__(self, namespace: str, api_client: k8s.ApiClient, *, host: str = "",
                 request_timeout: tuple[float, float] = (10.0, 60.0),
                 backoff: Callable[[], Backoff] = Backoff) -> None:
        self.namespace = namespace
        self.api_client = api_client
        self.host = host or api_client.configuration.host
        self.request_timeout = request_timeout
        self.new_backoff = backoff
        self.batch = k8s.BatchV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)

    @classmethod
    def from_environment(cls, namespace: str, **kwargs: Any) -> tuple["KubeApi", str]:
        configuration, where = load_configuration()
        return cls(namespace, k8s.ApiClient(configuration), **kwargs), where

    def close(self) -> None:
        self.api_client.close()

    # --- plumbing ---

    def call(self, action: str, fn: Callable[[], T], *, passthrough: tuple[int, ...] = ()) -> T:
        """fn() with temporary failures retried; status codes in `passthrough` re-raised as they are."""
        backoff = self.new_backoff()
        while True:
            try:
                return fn()
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
                if status_of(error) in passthrough:
                    raise
                if not is_transient(error):
                    raise permanent(error, action, self.namespace, self.host) from None
                backoff.failed(error, retry_after=retry_after(error), action=action)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    # --- jobs ---

    def get_job(self, name: str) -> dict[str, Any] | None:
        try:
            return self.call(f"reading Job {name}", lambda: self._json(self.batch.read_namespaced_job(
                name, self.namespace, _preload_content=False, _request_timeout=self.request_timeout)),
                passthrough=(404,))
        except ApiException:
            return None

    def create_job(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created Job, or None when one of that name exists already (409)."""
        name = body["metadata"]["name"]
        try:
            return self.call(f"creating Job {name}", lambda: self._json(self.batch.create_namespaced_job(
                self.namespace, body, _preload_content=False, _request_timeout=self.request_timeout)),
                passthrough=(409,))
        except ApiException:
            return None

    def list_jobs(self, selector: str) -> tuple[list[dict[str, Any]], str]:
        """Jobs matching the label selector and the list's resourceVersion (to watch from)."""
        body = self.call("listing Jobs", lambda: self._json(self.batch.list_namespaced_job(
            self.namespace, label_selector=selector, _preload_content=False,
            _request_timeout=self.request_timeout)))
        return body.get("items") or [], body["metadata"]["resourceVersion"]

    def watch_jobs(self, selector: str, resource_version: str, timeout_s: int) -> Iterator[dict[str, Any]]:
        """Watch events after `resource_version` until the server ends the watch (`timeout_s`).

        Opening the watch raises as any call does (no retry here: the caller's loop owns the backoff);
        a stream cut midway raises WatchBroken; an ERROR 410 event raises WatchExpired; other ERROR
        events raise ApiException with their code.
        """
        response = self.batch.list_namespaced_job(
            self.namespace, label_selector=selector, watch=True, resource_version=resource_version,
            allow_watch_bookmarks=True, timeout_seconds=timeout_s, _preload_content=False,
            _request_timeout=(self.request_timeout[0], timeout_s + 30))
        try:
            pending = b""
            try:
                for chunk in response.stream(amt=None, decode_content=False):
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if line.strip():
                            yield _watch_event(json.loads(line))
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise WatchBroken(f"watch on Jobs broke off: {error}") from error
            if pending.strip():
                yield _watch_event(json.loads(pending))
        finally:
            response.close()
            response.release_conn()

    # --- pods, logs, events, namespace ---

    def list_pods(self, selector: str) -> list[dict[str, Any]]:
        body = self.call("listing pods", lambda: self._json(self.core.list_namespaced_pod(
            self.namespace, label_selector=selector, _preload_content=False,
            _request_timeout=self.request_timeout)))
        return body.get("items") or []

    def pod_log_tail(self, pod: str, container: str, lines: int) -> list[str]:
        """The last `lines` lines of the container's log; [] when there is none (never started, pod gone)."""
        def read() -> bytes:
            response = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=container, tail_lines=lines, _preload_content=False,
                _request_timeout=self.request_timeout)
            try:
                return response.data
            finally:
                response.release_conn()
        try:
            data = self.call(f"reading the log of pod {pod}", read, passthrough=(400, 404))
        except ApiException:
            return []
        return data.decode(errors="replace").splitlines()[-lines:]

    def list_events(self, involved_name: str) -> list[dict[str, Any]]:
        body = self.call(f"listing events of {involved_name}", lambda: self._json(self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={involved_name}", _preload_content=False,
            _request_timeout=self.request_timeout)))
        return body.get("items") or []

    def namespace_exists(self) -> bool | None:
        """True / False, or None when the controller may not read its Namespace object (403)."""
        try:
            self.call(f"reading namespace {self.namespace}", lambda: self._json(self.core.read_namespace(
                self.namespace, _preload_content=False, _request_timeout=self.request_timeout)),
                passthrough=(403, 404))
        except ApiException as error:
            return None if error.status == 403 else False
        return True

    def server_version(self) -> str:
        body = self.call("reading the server version", lambda: self._json(k8s.VersionApi(self.api_client).get_code(
            _preload_content=False, _request_timeout=self.request_timeout)))
        return str(body.get("gitVersion") or f"v{body.get('major')}.{body.get('minor')}")


def _watch_event(event: dict[str, Any]) -> dict[str, Any]:
    if event.get("type") == "ERROR":
        status = event.get("object") or {}
        if status.get("code") == 410:
            raise WatchExpired(status.get("message", "410 Gone"))
        error = ApiException(status=status.get("code") or 500, reason=status.get("reason") or "WatchError")
        error.body = json.dumps(status)
        raise error
    return event
