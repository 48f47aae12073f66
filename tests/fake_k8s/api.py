"""The REST semantics of the fake apiserver, independent of HTTP: one method per verb.

`Api.dispatch` takes a parsed `RequestInfo` (the apiserver's own notion: verb, group, version,
resource, subresource, namespace, name) and answers a `Response`, a `Stream` (watch, log follow) or
raises `ApiError` (sent as a Status). The HTTP layer in `server.py` only moves bytes.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import unquote

from . import resources
from .defaults import default_event, default_job, default_namespace, default_secret, generate_name
from .kubelet import Kubelet
from .patching import apply_patch
from .resources import EVENTS, JOBS, NAMESPACES, PODS, SECRETS, ResourceType
from .selectors import FieldRequirement, fields_match, labels_match, parse_field_selector, parse_label_selector
from .status import (ApiError, bad_request, conflict, expired, method_not_allowed, not_found, path_not_found,
                     unsupported_media_type)
from .store import Store, WatchEvent
from .validation import check_received, check_rules, check_schema, check_type_meta, check_update

DEFAULT_WATCH_TIMEOUT = 1800  # the apiserver picks 30-60 min (minRequestTimeout 1800 s, randomised)
JOB_DELETE_WARNING = ('299 - "child pods are preserved by default when jobs are deleted; set '
                      'propagationPolicy=Background to remove them or set propagationPolicy=Orphan to '
                      'suppress this warning"')


@dataclass(frozen=True)
class RequestInfo:
    """What the apiserver's RequestInfoFactory derives from a resource request."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str
    version: str
    resource: str
    subresource: str
    namespace: str
    name: str


@dataclass
class Response:
    code: int
    body: Any  # dict (JSON) or bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Stream:
    """A chunked answer: watch events (dicts, sent as JSON lines) or log bytes."""

    chunks: Iterator[Any]
    content_type: str


_METHOD_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def parse_request_info(method: str, path: str, query: dict[str, str]) -> RequestInfo | None:
    """Resource request -> RequestInfo, as `k8s.io/apiserver/pkg/endpoints/request.RequestInfoFactory`.

    None for non-resource paths (discovery, /version, /healthz).
    """
    parts = [unquote(p) for p in path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in ("status", "finalize"):
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if len(rest) > 3:
        return RequestInfo("get", group, version, resource, "/".join(rest[2:]), namespace, name)
    watch = query.get("watch", "").lower() in ("true", "1")
    if method in ("GET", "HEAD"):
        verb = "watch" if watch else ("get" if name else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _METHOD_VERBS.get(method, method.lower())
    return RequestInfo(verb, group, version, resource, subresource, namespace, name)


def _flag(query: dict[str, str], key: str) -> bool:
    return query.get(key, "").lower() in ("true", "1")


def _int(query: dict[str, str], key: str) -> int | None:
    value = query.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except ValueError:
        raise bad_request(f"invalid value for {key}: {value!r}") from None


def _json_body(body: bytes, content_type: str) -> Any:
    kind = (content_type or "application/json").split(";")[0].strip()
    if not kind.endswith("json"):
        raise unsupported_media_type(kind)
    try:
        return json.loads(body or b"null")
    except ValueError as error:
        raise bad_request(f"the body of the request could not be decoded as JSON: {error}") from None


def _list_item(obj: dict[str, Any]) -> dict[str, Any]:
    """Items inside a List carry no apiVersion/kind on the wire."""
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}


class Api:
    """The verbs of every served resource over the store, kubelet and clock."""

    def __init__(self, store: Store, kubelet: Kubelet, kubernetes_version: str, wake: Callable[[], None],
                 bookmark_interval: float) -> None:
        self.store = store
        self.kubelet = kubelet
        self.kubernetes_version = kubernetes_version
        self.wake = wake
        self.bookmark_interval = bookmark_interval

    # --- dispatch ----------------------------------------------------------------------------------

    def dispatch(self, info: RequestInfo, query: dict[str, str], body: bytes, content_type: str,
                 closing: threading.Event) -> Response | Stream:
        rt = resources.find(info.group, info.version, info.resource)
        if rt is None or (info.namespace and not rt.namespaced and info.resource != "namespaces"):
            raise path_not_found()
        if info.subresource:
            allowed = rt.subresources.get(info.subresource)
            if allowed is None:
                raise path_not_found()
            if info.verb not in allowed:
                raise method_not_allowed()
            if info.subresource == "log":
                return self._log(info, query, closing)
            return Response(200, self.store.get(rt, info.namespace, info.name))  # status: the whole object
        if info.verb not in rt.verbs:
            raise method_not_allowed()
        namespace = info.namespace if rt.namespaced else ""
        if info.verb == "get":
            return Response(200, self.store.get(rt, namespace, info.name))
        if info.verb == "list":
            return self._list(rt, namespace or None, query)
        if info.verb == "watch":
            return self._watch(rt, namespace or None, info.name, query, closing)
        if info.verb == "create":
            return self._create(rt, namespace, query, _json_body(body, content_type))
        if info.verb in ("update", "patch"):
            return self._update(rt, namespace, info.name, info.verb, _json_body(body, content_type), content_type)
        if info.verb == "delete":
            return self._delete(rt, namespace, info.name, query, body)
        if info.verb == "deletecollection":
            return self._delete_collection(rt, namespace, query, body)
        raise method_not_allowed()

    # --- reads ---------------------------------------------------------------------------------------

    def _selected(self, rt: ResourceType, query: dict[str, str],
                  extra: list[FieldRequirement] | None = None) -> Callable[[dict[str, Any]], bool]:
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"), rt.resource) + (extra or [])
        return lambda obj: labels_match(labels, obj) and fields_match(fields, obj, rt.resource)

    def _list(self, rt: ResourceType, namespace: str | None, query: dict[str, str]) -> Response:
        selected = self._selected(rt, query)
        items, rv = self.store.list(rt, namespace)
        asked = query.get("resourceVersion", "")
        if asked not in ("", "0"):
            wanted = _int(query, "resourceVersion") or 0
            if wanted > rv:
                raise ApiError(504, "Timeout", f"Too large resource version: {wanted}, current: {rv}",
                               {"causes": [{"reason": "ResourceVersionTooLarge",
                                            "message": "Too large resource version"}], "retryAfterSeconds": 1})
            if query.get("resourceVersionMatch") == "Exact" and wanted != rv:
                raise expired(wanted, self.store.compacted_rv)
        items = [item for item in items if selected(item)]
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        limit = _int(query, "limit")
        token = query.get("continue")
        if token:
            try:
                start = json.loads(base64.b64decode(token))["start"]
            except (ValueError, KeyError, TypeError):
                raise bad_request("continue key is not valid") from None
            items = [i for i in items if (i["metadata"].get("namespace", ""), i["metadata"]["name"]) > tuple(start)]
        if limit and len(items) > limit:
            last = items[limit - 1]["metadata"]
            metadata["continue"] = base64.b64encode(json.dumps(
                {"rv": rv, "start": [last.get("namespace", ""), last["name"]]}).encode()).decode()
            metadata["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return Response(200, {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": metadata,
                              "items": [_list_item(i) for i in items]})

    def _watch(self, rt: ResourceType, namespace: str | None, name: str, query: dict[str, str],
               closing: threading.Event) -> Stream:
        extra = [FieldRequirement("metadata.name", True, name)] if name else []
        selected = self._selected(rt, query, extra)
        timeout = _int(query, "timeoutSeconds")
        bookmarks = _flag(query, "allowWatchBookmarks")
        initial_events = _flag(query, "sendInitialEvents")
        asked = query.get("resourceVersion", "")
        with self.store.lock:
            current = self.store.resource_version
            if asked in ("", "0") or initial_events:
                initial, _ = self.store.list(rt, namespace)
                initial = [obj for obj in initial if selected(obj)]
                start = current
            else:
                initial, start = [], _int(query, "resourceVersion") or 0
        return Stream(self._events(rt, namespace, selected, initial, start, timeout, bookmarks, initial_events,
                                   closing), "application/json")

    def _bookmark(self, rt: ResourceType, rv: int, initial_end: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}}

    @staticmethod
    def _translate(event: WatchEvent, rt: ResourceType, namespace: str | None,
                   selected: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """An event as this watcher sees it: objects entering/leaving the selection become ADDED/DELETED."""
        if event.resource != rt.key or (namespace is not None and event.namespace != namespace):
            return None
        now_in = selected(event.obj)
        if event.type == "MODIFIED":
            was_in = event.old is not None and selected(event.old)
            kind = "MODIFIED" if now_in and was_in else "ADDED" if now_in else "DELETED" if was_in else None
        else:
            kind = event.type if now_in else None
        return {"type": kind, "object": event.obj} if kind else None

    def _events(self, rt: ResourceType, namespace: str | None, selected: Callable[[dict[str, Any]], bool],
                initial: list[dict[str, Any]], start: int, timeout: int | None, bookmarks: bool,
                initial_events: bool, closing: threading.Event) -> Iterator[dict[str, Any]]:
        for obj in initial:
            yield {"type": "ADDED", "object": obj}
        if initial_events and bookmarks:
            yield self._bookmark(rt, start, initial_end=True)
        now = time.monotonic()
        deadline = now + (timeout if timeout else DEFAULT_WATCH_TIMEOUT)  # 0 means "the server's default"
        next_bookmark = now + self.bookmark_interval
        last = start
        while not closing.is_set():
            try:
                with self.store.lock:
                    events = self.store.events_after(last)
                    seen = self.store.resource_version
            except ApiError as error:
                yield {"type": "ERROR", "object": error.status()}
                return
            for event in events:
                translated = self._translate(event, rt, namespace, selected)
                if translated is not None:
                    yield translated
            last = max(last, seen)
            now = time.monotonic()
            if now >= deadline:
                if bookmarks:
                    yield self._bookmark(rt, last)
                return
            if bookmarks and now >= next_bookmark:
                yield self._bookmark(rt, last)
                next_bookmark = now + self.bookmark_interval
            wake_at = min(deadline, next_bookmark) if bookmarks else deadline
            with self.store.changed:
                self.store.changed.wait_for(lambda: self.store.resource_version > last or closing.is_set(),
                                            timeout=max(wake_at - time.monotonic(), 0))

    def _log(self, info: RequestInfo, query: dict[str, str], closing: threading.Event) -> Response | Stream:
        pod = self.store.get(PODS, info.namespace, info.name)
        buffer = self.kubelet.log_buffer(pod, query.get("container") or None, _flag(query, "previous"))
        tail, timestamps = _int(query, "tailLines"), _flag(query, "timestamps")
        if _flag(query, "follow"):
            return Stream(buffer.follow(tail_lines=tail, timestamps=timestamps, stop=closing.is_set),
                          "text/plain")
        data = buffer.text(tail_lines=tail, limit_bytes=_int(query, "limitBytes"),
                           since_seconds=_int(query, "sinceSeconds"), timestamps=timestamps)
        return Response(200, data, "text/plain")

    # --- writes --------------------------------------------------------------------------------------

    def _require_namespace(self, namespace: str) -> None:
        if self.store.find(NAMESPACES, "", namespace) is None:
            raise not_found("", "namespaces", namespace)

    def _create(self, rt: ResourceType, namespace: str, query: dict[str, str], body: Any) -> Response:
        obj = check_type_meta(rt, body, namespace)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise ApiError(500, "InternalError", "resourceVersion should not be set on objects to be created")
        check_schema(rt, obj, self.kubernetes_version)
        check_received(rt, obj)
        for key in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation",
                    "managedFields", "selfLink"):
            meta.pop(key, None)
        if rt.namespaced:
            self._require_namespace(namespace)
            meta["namespace"] = namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = generate_name(meta["generateName"])
        meta["uid"] = str(uuid.uuid4())
        if rt is JOBS:
            if meta.get("name"):
                default_job(obj)
        elif rt is SECRETS:
            default_secret(obj)
        elif rt is EVENTS:
            default_event(obj, namespace)
        elif rt is NAMESPACES:
            if meta.get("name"):
                default_namespace(obj)
        check_rules(rt, obj, namespace)
        if query.get("dryRun") == "All":
            return Response(201, obj)
        created = self.store.create(rt, obj)
        self.wake()
        return Response(201, created)

    def _update(self, rt: ResourceType, namespace: str, name: str, verb: str, body: Any,
                content_type: str) -> Response:
        current = self.store.get(rt, namespace, name)
        if verb == "patch":
            new = apply_patch(content_type, current, body)
            if not isinstance(new, dict):
                raise bad_request("the patch did not result in an object")
        else:
            new = check_type_meta(rt, body, namespace)
            if new["metadata"].get("name") not in (None, name):
                raise bad_request(f"the name of the object ({new['metadata']['name']}) does not match the name "
                                  f"on the URL ({name})")
        expected_rv = (new.get("metadata") or {}).get("resourceVersion") or None
        if expected_rv and expected_rv != current["metadata"]["resourceVersion"]:
            raise conflict(rt.group, rt.resource, name, "the object has been modified; please apply your changes "
                           "to the latest version and try again")
        new.setdefault("apiVersion", rt.api_version)
        new.setdefault("kind", rt.kind)
        meta = new.setdefault("metadata", {})
        for key in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation",
                    "resourceVersion", "namespace", "name"):
            if key in current["metadata"]:
                meta[key] = current["metadata"][key]
            else:
                meta.pop(key, None)
        if "status" in current:
            new["status"] = copy.deepcopy(current["status"])  # the status subresource owns it
        check_update(rt, current, new, self.kubernetes_version)
        updated = self.store.update(rt, namespace, name, lambda _: copy.deepcopy(new),
                                    expected_rv=current["metadata"]["resourceVersion"])
        self.wake()
        return Response(200, updated)

    @staticmethod
    def _delete_options(query: dict[str, str], body: bytes) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if query.get("propagationPolicy"):
            options["propagationPolicy"] = query["propagationPolicy"]
        if query.get("gracePeriodSeconds"):
            options["gracePeriodSeconds"] = _int(query, "gracePeriodSeconds")
        if query.get("orphanDependents"):
            options["orphanDependents"] = _flag(query, "orphanDependents")
        if query.get("dryRun"):
            options["dryRun"] = [query["dryRun"]]
        if body and body.strip():
            decoded = _json_body(body, "application/json")
            if decoded is not None:
                if not isinstance(decoded, dict):
                    raise bad_request("DeleteOptions must be an object")
                options.update({k: v for k, v in decoded.items() if k not in ("kind", "apiVersion")})
        if options.get("dryRun"):
            raise bad_request("fake_k8s: dryRun is not supported on delete")
        policy = options.get("propagationPolicy")
        if policy not in (None, "Background", "Foreground", "Orphan"):
            raise ApiError(422, "Invalid", f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: '
                           f'Unsupported value: "{policy}": supported values: "Foreground", "Background", "Orphan"',
                           {"kind": "DeleteOptions", "group": "meta.k8s.io"})
        return options

    def _delete(self, rt: ResourceType, namespace: str, name: str, query: dict[str, str], body: bytes) -> Response:
        options = self._delete_options(query, body)
        preconditions = options.get("preconditions")
        if rt is PODS:
            current = self.store.get(PODS, namespace, name)
            for key in ("uid", "resourceVersion"):
                if (preconditions or {}).get(key) and preconditions[key] != current["metadata"].get(key):
                            raise conflict("", "pods", name, f"Precondition failed: {key} in precondition: "
                                   f"{preconditions[key]}, {key} in object meta: {current['metadata'].get(key)}")
            pod = self.kubelet.delete_pod(namespace, name, options.get("gracePeriodSeconds"))
            return Response(200, pod)
        headers: dict[str, str] = {}
        add_finalizers: tuple[str, ...] = ()
        if rt is JOBS:
            policy = options.get("propagationPolicy")
            if policy is None and "orphanDependents" in options:
                policy = "Orphan" if options["orphanDependents"] else "Background"
            if policy is None:
                policy = "Orphan"  # batch/v1 keeps its pods by default, and says so in a warning
                headers["Warning"] = JOB_DELETE_WARNING
            add_finalizers = {"Foreground": ("foregroundDeletion",), "Orphan": ("orphan",)}.get(policy, ())
        obj, gone = self.store.delete(rt, namespace, name, add_finalizers=add_finalizers, preconditions=preconditions)
        self.wake()
        if not gone:
            return Response(200, obj, headers=headers)
        details: dict[str, Any] = {"name": name, "kind": rt.resource, "uid": obj["metadata"]["uid"]}
        if rt.group:
            details["group"] = rt.group
        return Response(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                              "details": details}, headers=headers)

    def _delete_collection(self, rt: ResourceType, namespace: str, query: dict[str, str], body: bytes) -> Response:
        selected = self._selected(rt, query)
        items, _ = self.store.list(rt, namespace or None)
        deleted = []
        for item in items:
            if not selected(item):
                continue
            try:
                response = self._delete(rt, item["metadata"].get("namespace", ""), item["metadata"]["name"],
                                        query, body)
            except ApiError as error:
                if error.code == 404:
                    continue
                raise
            deleted.append(_list_item(response.body if response.body.get("kind") != "Status" else item))
        return Response(200, {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                              "metadata": {"resourceVersion": str(self.store.resource_version)}, "items": deleted})

    # --- discovery -----------------------------------------------------------------------------------

    def discovery(self, path: str, server_address: str) -> Response:
        """Non-resource GETs: /version, /api, /apis, group and resource lists, health checks."""
        path = "/" + path.strip("/")
        if path in ("/healthz", "/livez", "/readyz"):
            return Response(200, b"ok", "text/plain")
        if path == "/version":
            return Response(200, resources.version_info(self.kubernetes_version))
        if path == "/api":
            return Response(200, resources.api_versions(server_address))
        if path == "/apis":
            return Response(200, resources.api_group_list())
        parts = path.strip("/").split("/")
        document = None
        if parts[0] == "api" and len(parts) == 2:
            document = resources.api_resource_list("", parts[1])
        elif parts[0] == "apis" and len(parts) == 2:
            document = resources.api_group(parts[1])
        elif parts[0] == "apis" and len(parts) == 3:
            document = resources.api_resource_list(parts[1], parts[2])
        if document is None:
            raise path_not_found()
        return Response(200, document)
