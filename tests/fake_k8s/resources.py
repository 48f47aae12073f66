"""The resources the fake serves, and the discovery documents that describe them.

A `ResourceType` is one REST resource (`batch/v1 jobs`, `v1 pods`, ...). Routing, request
recording (RBAC-style tuples), validation and discovery all read this one table, so a resource is
served exactly as discovery announces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    resource: str  # plural, lower case: "jobs"
    kind: str
    singular: str
    namespaced: bool
    verbs: tuple[str, ...]
    short_names: tuple[str, ...] = ()
    subresources: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> verbs
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.resource)


_READ_WRITE = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

JOBS = ResourceType("batch", "v1", "jobs", "Job", "job", True, _READ_WRITE,
                    categories=("all",), subresources={"status": ("get",)})
PODS = ResourceType("", "v1", "pods", "Pod", "pod", True, ("delete", "get", "list", "watch"), ("po",),
                    categories=("all",), subresources={"log": ("get",), "status": ("get",)})
EVENTS = ResourceType("", "v1", "events", "Event", "event", True, ("create", "delete", "get", "list", "watch"),
                      ("ev",))
SECRETS = ResourceType("", "v1", "secrets", "Secret", "secret", True, ("create", "delete", "get", "list", "watch"))
NAMESPACES = ResourceType("", "v1", "namespaces", "Namespace", "namespace", False,
                          ("create", "get", "list", "watch"), ("ns",))

ALL: tuple[ResourceType, ...] = (JOBS, PODS, EVENTS, SECRETS, NAMESPACES)
BY_PATH: dict[tuple[str, str, str], ResourceType] = {(r.group, r.version, r.resource): r for r in ALL}
GROUP_VERSIONS = {"batch": ["v1"]}


def find(group: str, version: str, resource: str) -> ResourceType | None:
    return BY_PATH.get((group, version, resource))


def version_info(kubernetes_version: str) -> dict[str, Any]:
    """`/version`, answering as a release of the pinned minor version."""
    major, minor = kubernetes_version.lstrip("v").split(".")[:2]
    return {"major": major, "minor": minor, "gitVersion": f"v{major}.{minor}.0-fake",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
            "platform": "linux/amd64", "emulationMajor": major, "emulationMinor": minor,
            "minCompatibilityMajor": major, "minCompatibilityMinor": str(max(int(minor) - 1, 0))}


def api_versions(server_address: str) -> dict[str, Any]:
    """`/api`."""
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def _group(name: str) -> dict[str, Any]:
    versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in GROUP_VERSIONS[name]]
    return {"name": name, "versions": versions, "preferredVersion": versions[0]}


def api_group_list() -> dict[str, Any]:
    """`/apis`."""
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(name) for name in GROUP_VERSIONS]}


def api_group(name: str) -> dict[str, Any] | None:
    """`/apis/<group>`."""
    if name not in GROUP_VERSIONS:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name)}


def api_resource_list(group: str, version: str) -> dict[str, Any] | None:
    """`/api/v1` and `/apis/<group>/<version>`: every resource and subresource with its verbs."""
    entries = []
    for rt in ALL:
        if rt.group != group or rt.version != version:
            continue
        entry: dict[str, Any] = {"name": rt.resource, "singularName": rt.singular, "namespaced": rt.namespaced,
                                 "kind": rt.kind, "verbs": list(rt.verbs)}
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.categories:
            entry["categories"] = list(rt.categories)
        entries.append(entry)
        for sub, verbs in rt.subresources.items():
            entries.append({"name": f"{rt.resource}/{sub}", "singularName": "", "namespaced": rt.namespaced,
                            "kind": rt.kind if sub != "log" else "Pod", "verbs": list(verbs)})
    if not entries:
        return None
    group_version = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": entries}
