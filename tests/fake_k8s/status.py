"""`metav1.Status` bodies and the exception that carries them through the fake API server.

The real apiserver answers every failed request with a `Status` object (kind Status, apiVersion v1)
whose `code` equals the HTTP status, whose `reason` is a machine-readable word (NotFound,
AlreadyExists, Invalid, ...) and whose `details` name the object. Clients (and our controller)
branch on `code` and `reason`, so the fake builds them the same way, with the same message texts
where the texts are stable in Kubernetes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ApiError(Exception):
    """An error answered to the client as a `Status` object with HTTP status `code`."""

    code: int
    reason: str
    message: str
    details: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code} {self.reason}: {self.message}"

    def status(self) -> dict[str, Any]:
        """The `metav1.Status` body of this error, as the apiserver serialises it."""
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def qualified_resource(group: str, resource: str) -> str:
    """`jobs.batch` for group resources, `pods` for the core group (as in apiserver messages)."""
    return f"{resource}.{group}" if group else resource


def _details(group: str, resource: str, name: str | None) -> dict[str, Any]:
    details: dict[str, Any] = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    details["kind"] = resource  # the apiserver puts the *resource* here, not the kind
    return details


def not_found(group: str, resource: str, name: str) -> ApiError:
    """404 for a named object that does not exist: `jobs.batch "x" not found`."""
    return ApiError(404, "NotFound", f'{qualified_resource(group, resource)} "{name}" not found',
                    _details(group, resource, name))


def path_not_found() -> ApiError:
    """404 for a path that names no resource the server serves."""
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def already_exists(group: str, resource: str, name: str) -> ApiError:
    """409 on creating a name that is taken: `jobs.batch "x" already exists`."""
    return ApiError(409, "AlreadyExists", f'{qualified_resource(group, resource)} "{name}" already exists',
                    _details(group, resource, name))


def conflict(group: str, resource: str, name: str, why: str) -> ApiError:
    """409 Conflict: an optimistic-concurrency or precondition failure."""
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {qualified_resource(group, resource)} "{name}": {why}',
                    _details(group, resource, name))


@dataclass(frozen=True)
class Cause:
    """One field error of a 422 Invalid answer (`details.causes[]` in the Status)."""

    field: str  # e.g. "metadata.name", "spec.template.spec.restartPolicy"
    message: str  # e.g. 'Invalid value: "X": a lowercase RFC 1123 subdomain must ...'
    reason: str = "FieldValueInvalid"  # FieldValueRequired, FieldValueNotSupported, ...

    def text(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def invalid(group: str, kind: str, name: str, causes: list[Cause]) -> ApiError:
    """422 Invalid listing every field error, formatted like the apiserver's aggregate message.

    Real text: `Job.batch "x" is invalid: spec.template.spec.restartPolicy: Unsupported value: ...`
    (several causes are joined as `[a, b]`).
    """
    qualified_kind = f"{kind}.{group}" if group else kind
    texts = [cause.text() for cause in causes]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: dict[str, Any] = {"name": name, "kind": kind,
                               "causes": [{"reason": c.reason, "message": c.message, "field": c.field}
                                          for c in causes]}
    if group:
        details["group"] = group
    return ApiError(422, "Invalid", f'{qualified_kind} "{name}" is invalid: {joined}', details)


def bad_request(message: str) -> ApiError:
    """400 BadRequest (unparseable body, unsupported selector, log of a container not started)."""
    return ApiError(400, "BadRequest", message)


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> ApiError:
    """405 MethodNotAllowed for a verb the resource does not support."""
    return ApiError(405, "MethodNotAllowed", message, {})


def unsupported_media_type(content_type: str) -> ApiError:
    """415 for a body type the fake cannot decode (for instance server-side apply YAML)."""
    return ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                    f"accepted media types include: application/json, application/merge-patch+json, "
                    f"application/strategic-merge-patch+json, application/json-patch+json "
                    f"(got {content_type!r})")


def expired(requested: int, oldest: int) -> ApiError:
    """410 Gone, reason Expired: the requested resourceVersion is older than the kept history.

    The watch cache words it `too old resource version: <requested> (<oldest kept - 1>)`.
    """
    return ApiError(410, "Expired", f"too old resource version: {requested} ({oldest})")


def unauthorized() -> ApiError:
    """401 for a missing or wrong bearer token."""
    return ApiError(401, "Unauthorized", "Unauthorized")


_INJECTED_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def injected(code: int) -> ApiError:
    """An error injected by a test through `FakeCluster.fail_next` (429 carries Retry-After: 1)."""
    reason = _INJECTED_REASONS.get(code, "InternalError" if code >= 500 else "BadRequest")
    error = ApiError(code, reason, f"fake_k8s: injected failure ({code} {reason})",
                     {"retryAfterSeconds": 1} if code == 429 else {})
    if code == 429:
        error.headers["Retry-After"] = "1"
    return error
