"""The fake's etcd: objects, one global resourceVersion counter and a bounded watch history.

Every write (create, update, delete) takes the next resourceVersion from one counter shared by all
resources, as etcd revisions are, stamps it into the object as a string, and appends a
`WatchEvent` to a bounded history. Watches replay events after a given resourceVersion from that
history; asking for one older than the history keeps answers 410 Expired, as the apiserver's watch
cache does.

Deletion follows the finalizer and grace-period protocol: an object with finalizers, or a pod being
deleted gracefully, only gets `metadata.deletionTimestamp` (a MODIFIED event); it disappears (a
DELETED event carrying the deletion's resourceVersion) once it has no finalizers left and its
`deletionGracePeriodSeconds` is 0.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from .defaults import generate_name
from .resources import ResourceType
from .status import already_exists, conflict, expired, not_found

ObjectKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


def now_rfc3339() -> str:
    """A `metav1.Time` as the apiserver writes it: UTC, whole seconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WatchEvent:
    """One change: `obj` is the state after it (for DELETED, the last state at the deletion's rv)."""

    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    resource: tuple[str, str]  # (group, resource)
    namespace: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


class Store:
    """Thread-safe object store. Reads return deep copies; writes go through `create`/`update`/`delete`."""

    def __init__(self, history_size: int = 1000) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified after every write
        self._objects: dict[tuple[str, str], dict[ObjectKey, dict[str, Any]]] = {}
        self._rv = 0
        self._history: deque[WatchEvent] = deque()
        self._history_size = history_size
        self._compacted_rv = 0  # events with rv <= this are no longer kept
        self._listeners: list[Callable[[], None]] = []
        self._created_rv: dict[str, int] = {}  # uid -> resourceVersion of its creation

    # --- bookkeeping ---------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self.lock:
            return self._rv

    @property
    def compacted_rv(self) -> int:
        with self.lock:
            return self._compacted_rv

    def creation_order(self, uid: str) -> int:
        """The resourceVersion at which the object with `uid` was created (orders objects exactly)."""
        with self.lock:
            return self._created_rv.get(uid, 0)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every write (the controller uses it to wake up)."""
        self._listeners.append(listener)

    def _record(self, event_type: str, rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        self._history.append(WatchEvent(self._rv, event_type, rt.key, obj["metadata"].get("namespace", ""),
                                        copy.deepcopy(obj), copy.deepcopy(old)))
        while len(self._history) > self._history_size:
            self._compacted_rv = self._history.popleft().rv
        self.changed.notify_all()
        for listener in self._listeners:
            listener()

    def _bucket(self, rt: ResourceType) -> dict[ObjectKey, dict[str, Any]]:
        return self._objects.setdefault(rt.key, {})

    def _existing(self, rt: ResourceType, namespace: str,
                  name: str) -> tuple[dict[ObjectKey, dict[str, Any]], ObjectKey, dict[str, Any]]:
        """(the resource's bucket, the object's key in it, the object); 404 NotFound if absent.
        The caller holds the lock."""
        bucket = self._bucket(rt)
        key = (namespace if rt.namespaced else "", name)
        current = bucket.get(key)
        if current is None:
            raise not_found(rt.group, rt.resource, name)
        return bucket, key, current

    def compact(self) -> None:
        """Forget the whole history: a watch from any resourceVersion before now gets 410 Expired."""
        with self.lock:
            self._history.clear()
            self._compacted_rv = self._rv

    def events_after(self, rv: int) -> list[WatchEvent]:
        """Every event with resourceVersion > `rv`, oldest first; 410 Expired if some were forgotten."""
        with self.lock:
            if rv < self._compacted_rv:
                raise expired(rv, self._compacted_rv)
            return [event for event in self._history if event.rv > rv]

    # --- reads -----------------------------------------------------------------------------------

    def find(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self._bucket(rt).get((namespace if rt.namespaced else "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def get(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        obj = self.find(rt, namespace, name)
        if obj is None:
            raise not_found(rt.group, rt.resource, name)
        return obj

    def list(self, rt: ResourceType, namespace: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Objects of `rt` (in `namespace`, or all), sorted by namespace/name, and the current rv."""
        with self.lock:
            items = [copy.deepcopy(obj) for key, obj in sorted(self._bucket(rt).items())
                     if namespace is None or not rt.namespaced or key[0] == namespace]
            return items, self._rv

    # --- writes ----------------------------------------------------------------------------------

    def create(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object: name from generateName, uid, creationTimestamp, resourceVersion. 409 if taken."""
        with self.lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name"):
                meta["name"] = generate_name(meta["generateName"])
            namespace = meta.get("namespace", "") if rt.namespaced else ""
            if not rt.namespaced:
                meta.pop("namespace", None)
            key = (namespace, meta["name"])
            bucket = self._bucket(rt)
            if key in bucket:
                raise already_exists(rt.group, rt.resource, meta["name"])
            meta.setdefault("uid", str(uuid.uuid4()))
            meta["creationTimestamp"] = now_rfc3339()
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            self._created_rv[meta["uid"]] = self._rv
            bucket[key] = obj
            self._record("ADDED", rt, obj, None)
            return copy.deepcopy(obj)

    def update(self, rt: ResourceType, namespace: str, name: str,
               mutate: Callable[[dict[str, Any]], dict[str, Any] | None], *,
               expected_rv: str | None = None) -> dict[str, Any]:
        """Apply `mutate` to a copy of the current object atomically and store the result.

        `mutate` edits its argument in place (or returns a replacement). An update that changes
        nothing writes nothing (no new resourceVersion), as in the apiserver. When the result has a
        deletionTimestamp, a grace period of 0 and no finalizers left, the object is removed (DELETED).
        `expected_rv`: optimistic concurrency, 409 Conflict if the object has moved on.
        """
        with self.lock:
            bucket, key, current = self._existing(rt, namespace, name)
            if expected_rv and expected_rv != current["metadata"]["resourceVersion"]:
                raise conflict(rt.group, rt.resource, name, "the object has been modified; please apply your "
                               "changes to the latest version and try again")
            new = copy.deepcopy(current)
            replaced = mutate(new)
            if replaced is not None:
                new = replaced
            new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            if new == current:
                return copy.deepcopy(current)
            if "generation" in current["metadata"] and new.get("spec") != current.get("spec"):
                new["metadata"]["generation"] = current["metadata"]["generation"] + 1
            self._rv += 1
            new["metadata"]["resourceVersion"] = str(self._rv)
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers") \
                    and not meta.get("deletionGracePeriodSeconds"):
                del bucket[key]
                self._record("DELETED", rt, new, current)
            else:
                bucket[key] = new
                self._record("MODIFIED", rt, new, current)
            return copy.deepcopy(new)

    def delete(self, rt: ResourceType, namespace: str, name: str, *, add_finalizers: tuple[str, ...] = (),
               preconditions: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
        """Delete now, or mark for deletion when the object has (or is given) finalizers.

        Returns (the object as deleted or marked, True when it is gone).
        """
        with self.lock:
            bucket, key, current = self._existing(rt, namespace, name)
            meta = current["metadata"]
            for field in ("uid", "resourceVersion"):
                wanted = (preconditions or {}).get(field)
                if wanted and wanted != meta.get(field):
                    raise conflict(rt.group, rt.resource, name,
                                   f"Precondition failed: {field.upper() if field == 'uid' else 'ResourceVersion'} "
                                   f"in precondition: {wanted}, {field.upper() if field == 'uid' else 'ResourceVersion'} "
                                   f"in object meta: {meta.get(field)}")
            finalizers = list(meta.get("finalizers") or [])
            for finalizer in add_finalizers:
                if finalizer not in finalizers:
                    finalizers.append(finalizer)
            if finalizers:
                def mark(obj: dict[str, Any]) -> None:
                    obj["metadata"]["finalizers"] = finalizers
                    obj["metadata"].setdefault("deletionTimestamp", now_rfc3339())
                    obj["metadata"].setdefault("deletionGracePeriodSeconds", 0)
                return self.update(rt, namespace, name, mark), False
            self._rv += 1
            gone = copy.deepcopy(current)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            del bucket[key]
            self._record("DELETED", rt, gone, current)
            return copy.deepcopy(gone), True

    def set_deletion(self, rt: ResourceType, namespace: str, name: str, grace_seconds: int) -> dict[str, Any]:
        """Graceful deletion of a pod: stamp deletionTimestamp (now + grace) and the grace period."""
        def mark(obj: dict[str, Any]) -> None:
            meta = obj["metadata"]
            if "deletionTimestamp" not in meta:
                when = datetime.now(timezone.utc) + timedelta(seconds=grace_seconds)
                meta["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
                meta["deletionGracePeriodSeconds"] = grace_seconds
        return self.update(rt, namespace, name, mark)
