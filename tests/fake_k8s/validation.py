"""Validation of objects received on create/update: the strict OpenAPI schema, then the server rules.

Step 1, the schema: `kubernetes_validate.validate(obj, version, strict=True)` from the PyPI package
`kubernetes-validate`, against the pinned Kubernetes version. Strict means every field must be known
to the schema, so a typo like `spec.template.spec.containers[0].comand` is rejected instead of being
silently dropped. The validator reports the first error only; it becomes one 422 cause.

Step 2, the rules (`validation_rules`), run on the *defaulted* object as the apiserver does.

Differences from the real apiserver (also in DIFFERENCES.md): the real one answers unknown fields
with 400 BadRequest (`strict decoding error: unknown field ...`) when asked for
`fieldValidation=Strict`, and by default only drops them with a warning; the fake always answers 422
Invalid so a test can tell an invalid object from a malformed request.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate

from .resources import ResourceType
from .status import ApiError, Cause, bad_request, invalid
from . import validation_rules as rules


def check_version_supported(kubernetes_version: str) -> None:
    """ValueError naming the accepted versions when kubernetes-validate has no schema for this one."""
    from kubernetes_validate.utils import VersionNotSupportedError, all_versions
    probe = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "probe"}}
    try:
        kubernetes_validate.validate(probe, kubernetes_version, strict=True)
    except (VersionNotSupportedError, IndexError, ValueError):
        known = sorted({".".join(v.split(".")[:2]) for v in all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
        raise ValueError(f"kubernetes_version {kubernetes_version!r} is not supported by kubernetes-validate "
                         f"{kubernetes_validate.__version__}; use one of {', '.join(known)}") from None


def json_path(parts: list[Any] | Any) -> str:
    """['spec', 'containers', 0, 'name'] -> 'spec.containers[0].name' (the apiserver's field paths)."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _with(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _causes_from_schema_error(error: kubernetes_validate.ValidationError, version: str) -> list[Cause]:
    """Turn the validator's first error into apiserver-style causes naming the exact fields."""
    path = json_path(list(error.path))
    note = f"(kubernetes-validate {kubernetes_validate.__version__}, Kubernetes {version} strict schema: {error.message})"
    kind = getattr(error, "validator", None)
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        known = set((error.schema or {}).get("properties") or {})
        unknown = [key for key in error.instance if key not in known] or ["?"]
        return [Cause(_with(path, key), f'strict decoding error: unknown field "{_with(path, key)}" {note}',
                      "FieldValueInvalid") for key in unknown]
    if kind == "required":
        missing = error.message.split("'")[1] if error.message.count("'") >= 2 else "?"
        return [Cause(_with(path, missing), f"Required value {note}", "FieldValueRequired")]
    if kind == "type":
        return [Cause(path, f"Invalid value: {error.instance!r}: {note}", "FieldValueTypeInvalid")]
    if kind == "enum":
        return [Cause(path, f"Unsupported value: {error.instance!r}: {note}", "FieldValueNotSupported")]
    return [Cause(path, f"Invalid value: {note}", "FieldValueInvalid")]


def check_type_meta(rt: ResourceType, obj: Any, namespace: str | None) -> dict[str, Any]:
    """Body must be an object of this resource's apiVersion/kind (filled in when missing, like the
    apiserver does for JSON) in the request's namespace."""
    if not isinstance(obj, dict):
        raise bad_request(f"the body of the request was not a {rt.kind} object")
    obj.setdefault("apiVersion", rt.api_version)
    obj.setdefault("kind", rt.kind)
    if obj["apiVersion"] != rt.api_version:
        raise bad_request(f"the API version in the data ({obj['apiVersion']}) does not match the expected "
                          f"API version ({rt.api_version})")
    if obj["kind"] != rt.kind:
        raise bad_request(f"the kind in the data ({obj['kind']}) does not match the expected kind ({rt.kind})")
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise bad_request("metadata must be an object")
    if rt.namespaced and meta.get("namespace") not in (None, "", namespace):
        raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
    return obj


def check_schema(rt: ResourceType, obj: dict[str, Any], kubernetes_version: str) -> None:
    """422 when `obj` fails the strict schema of `kubernetes_version` (kubernetes-validate)."""
    name = (obj.get("metadata") or {}).get("name") or (obj.get("metadata") or {}).get("generateName") or ""
    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        raise invalid(rt.group, rt.kind, name, _causes_from_schema_error(error, kubernetes_version)) from None
    except kubernetes_validate.SchemaNotFoundError as error:
        raise ApiError(500, "InternalError", f"fake_k8s: {error.message}") from None


def check_received(rt: ResourceType, obj: dict[str, Any]) -> None:
    """422 for rules on the object as received, before defaulting (a Job's hand-written selector)."""
    causes = rules.job_received_errors(obj) if rt.resource == "jobs" else []
    if causes:
        meta = obj.get("metadata") or {}
        raise invalid(rt.group, rt.kind, meta.get("name") or meta.get("generateName") or "", causes)


def rule_causes(rt: ResourceType, obj: dict[str, Any], namespace: str | None) -> list[Cause]:
    """Every server-side rule for a (defaulted) object of `rt`."""
    meta = obj.get("metadata") or {}
    causes = rules.object_meta_errors(meta, name_is_label=rt.resource == "namespaces")
    if rt.resource == "jobs":
        causes += rules.job_errors(obj)
        causes += rules.fake_job_limits(obj)
    elif rt.resource == "secrets":
        causes += rules.secret_errors(obj)
    elif rt.resource == "events":
        causes += rules.event_errors(obj, namespace or "")
    return causes


def check_rules(rt: ResourceType, obj: dict[str, Any], namespace: str | None) -> None:
    """422 listing every rule the defaulted object breaks."""
    causes = rule_causes(rt, obj, namespace)
    if causes:
        meta = obj.get("metadata") or {}
        raise invalid(rt.group, rt.kind, meta.get("name") or meta.get("generateName") or "", causes)


def check_update(rt: ResourceType, old: dict[str, Any], new: dict[str, Any], kubernetes_version: str) -> None:
    """Schema, rules and immutable fields for an update or patch result."""
    check_schema(rt, new, kubernetes_version)
    causes = rule_causes(rt, new, old["metadata"].get("namespace"))
    if rt.resource == "jobs":
        causes += rules.job_update_errors(old, new)
    if new["metadata"].get("name") != old["metadata"]["name"]:
        causes.append(rules.invalid_value("metadata.name", new["metadata"].get("name"), "field is immutable"))
    if causes:
        raise invalid(rt.group, rt.kind, old["metadata"]["name"], causes)
