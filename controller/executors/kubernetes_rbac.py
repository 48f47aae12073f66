"""Every Kubernetes API call the controller makes, as RBAC rules: the one list the Helm chart's Role is
checked against (tests compare the calls recorded by the fake API server, this list and the chart).

Namespaced only; no wildcards. Workers need no API access at all.
"""

from __future__ import annotations

# (apiGroup, resource, verbs)
CONTROLLER_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("batch", "jobs", ("create", "get", "list", "watch", "delete")),
    ("", "pods", ("get", "list", "watch")),
    ("", "pods/log", ("get",)),
    ("", "events", ("list",)),
    # preflight: does the namespace exist? (a Role in that namespace may grant get on its own Namespace)
    ("", "namespaces", ("get",)),
    # ownerReferences with blockOwnerDeletion on the controller's own Job: clusters that enforce owner
    # reference permissions (OwnerReferencesPermissionEnforcement, e.g. OpenShift) require this
    ("batch", "jobs/finalizers", ("update",)),
)


def as_role_rules() -> list[dict]:
    """The rules in a Role's shape."""
    return [{"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}
            for group, resource, verbs in CONTROLLER_RULES]


def allows(group: str, resource: str, verb: str) -> bool:
    return any(g == group and r == resource and verb in verbs for g, r, verbs in CONTROLLER_RULES)
