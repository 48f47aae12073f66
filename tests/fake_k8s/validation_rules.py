"""The apiserver's validation rules that an OpenAPI schema cannot express (pure functions).

Each function returns a list of `Cause`s (field path + message worded as in
`k8s.io/apimachinery/pkg/util/validation` and `pkg/apis/batch/validation`), empty when the value is
valid. Only the rules a Job-running controller can trip over are here: object names, labels,
annotations, the Job's restartPolicy / podFailurePolicy / podReplacementPolicy constraints, counts
that must not be negative, container names and env vars. `FAKE_LIMITS` rules reject what the fake
cannot run (several containers, Indexed Jobs) loudly instead of running it wrongly.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .status import Cause

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
LABEL_VALUE_MAX = 63
QUALIFIED_NAME_MAX = 63
ANNOTATIONS_MAX_BYTES = 256 * 1024

_DNS1123_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = _DNS1123_LABEL + r"(\." + _DNS1123_LABEL + ")*"
_LABEL_VALUE = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
_QUALIFIED_NAME = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"

DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    "validation is '" + _DNS1123_SUBDOMAIN + "')")
DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
    "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
    "validation is '" + _DNS1123_LABEL + "')")
LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
    "'12345', regex used for validation is '" + _LABEL_VALUE + "')")
QUALIFIED_NAME_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
    "an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
    "validation is '" + _QUALIFIED_NAME + "')")


def _too_long(limit: int) -> str:
    return f"must be no more than {limit} characters"


def _quote(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def invalid_value(path: str, value: Any, message: str) -> Cause:
    return Cause(path, f"Invalid value: {_quote(value)}: {message}", "FieldValueInvalid")


def required(path: str, message: str = "") -> Cause:
    return Cause(path, "Required value" + (f": {message}" if message else ""), "FieldValueRequired")


def not_supported(path: str, value: Any, supported: list[str]) -> Cause:
    listed = ", ".join(_quote(s) for s in supported)
    return Cause(path, f"Unsupported value: {_quote(value)}: supported values: {listed}",
                 "FieldValueNotSupported")


def forbidden(path: str, message: str) -> Cause:
    return Cause(path, f"Forbidden: {message}", "FieldValueForbidden")


def duplicate(path: str, value: Any) -> Cause:
    return Cause(path, f"Duplicate value: {_quote(value)}", "FieldValueDuplicate")


# --- names and labels (apimachinery/pkg/util/validation) -----------------------------------------

def dns1123_subdomain_errors(value: str) -> list[str]:
    errors = []
    if len(value) > DNS1123_SUBDOMAIN_MAX:
        errors.append(_too_long(DNS1123_SUBDOMAIN_MAX))
    if not re.fullmatch(_DNS1123_SUBDOMAIN, value):
        errors.append(DNS1123_SUBDOMAIN_MSG)
    return errors


def dns1123_label_errors(value: str) -> list[str]:
    errors = []
    if len(value) > DNS1123_LABEL_MAX:
        errors.append(_too_long(DNS1123_LABEL_MAX))
    if not re.fullmatch(_DNS1123_LABEL, value):
        errors.append(DNS1123_LABEL_MSG)
    return errors


def label_value_errors(value: str) -> list[str]:
    errors = []
    if len(value) > LABEL_VALUE_MAX:
        errors.append(_too_long(LABEL_VALUE_MAX))
    if not re.fullmatch(_LABEL_VALUE, value):
        errors.append(LABEL_VALUE_MSG)
    return errors


def label_key_errors(key: str) -> list[str]:
    """A qualified name: optional DNS-subdomain prefix + '/' + a name of at most 63 characters."""
    parts = key.split("/")
    if len(parts) == 1:
        prefix, name = "", parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return ["prefix part must be non-empty"]
    else:
        return ["a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start "
                "and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', "
                "regex used for validation is '" + _QUALIFIED_NAME + "') with an optional DNS subdomain "
                "prefix and '/' (e.g. 'example.com/MyName')"]
    errors = []
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > QUALIFIED_NAME_MAX:
        errors.append("name part " + _too_long(QUALIFIED_NAME_MAX))
    if name and not re.fullmatch(_QUALIFIED_NAME, name):
        errors.append(QUALIFIED_NAME_MSG)
    if prefix:
        errors.extend("prefix part " + e for e in dns1123_subdomain_errors(prefix))
    return errors


def labels_errors(labels: Any, path: str) -> list[Cause]:
    if labels is None:
        return []
    causes = []
    for key, value in labels.items():
        causes += [invalid_value(path, key, e) for e in label_key_errors(key)]
        causes += [invalid_value(path, value, e) for e in label_value_errors(value)]
    return causes


def annotations_errors(annotations: Any, path: str) -> list[Cause]:
    if annotations is None:
        return []
    causes = []
    for key in annotations:
        causes += [invalid_value(path, key, e) for e in label_key_errors(key.lower())]
    size = sum(len(k) + len(v) for k, v in annotations.items())
    if size > ANNOTATIONS_MAX_BYTES:
        causes.append(Cause(path, f"Too long: may not be more than {ANNOTATIONS_MAX_BYTES} bytes",
                            "FieldValueTooLong"))
    return causes


def object_meta_errors(meta: dict[str, Any], *, name_is_label: bool = False) -> list[Cause]:
    """Name or generateName, labels, annotations, owner references, finalizers of any object."""
    check = dns1123_label_errors if name_is_label else dns1123_subdomain_errors
    causes: list[Cause] = []
    name, generate_name = meta.get("name"), meta.get("generateName")
    if name:
        causes += [invalid_value("metadata.name", name, e) for e in check(name)]
    elif generate_name:
        # A prefix may end in '-': the apiserver masks a trailing dash before checking.
        masked = generate_name[:-1] + "a" if generate_name.endswith("-") else generate_name
        causes += [invalid_value("metadata.generateName", generate_name, e) for e in check(masked)]
    else:
        causes.append(required("metadata.name", "name or generateName is required"))
    causes += labels_errors(meta.get("labels"), "metadata.labels")
    causes += annotations_errors(meta.get("annotations"), "metadata.annotations")
    for index, ref in enumerate(meta.get("ownerReferences") or []):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(key):
                causes.append(required(f"metadata.ownerReferences[{index}].{key}"))
    for index, finalizer in enumerate(meta.get("finalizers") or []):
        causes += [invalid_value(f"metadata.finalizers[{index}]", finalizer, e)
                   for e in label_key_errors(finalizer)]
    return causes


# --- pods -------------------------------------------------------------------------------------------

def _env_errors(env: list[dict[str, Any]], path: str) -> list[Cause]:
    causes = []
    for index, var in enumerate(env):
        var_path = f"{path}[{index}]"
        name = var.get("name", "")
        # RelaxedEnvironmentVariableValidation (beta, on in 1.32+): printable ASCII except '='.
        if not name or not all(32 <= ord(c) <= 126 for c in name) or "=" in name:
            causes.append(invalid_value(f"{var_path}.name", name,
                                        "a valid environment variable name must consist only of printable "
                                        "ASCII characters other than '='"))
        source = var.get("valueFrom")
        if source is not None:
            if var.get("value"):
                causes.append(invalid_value(f"{var_path}.valueFrom", "",
                                            "may not be specified when `value` is not empty"))
            kinds = [k for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef",
                                 "fileKeyRef") if source.get(k) is not None]
            if len(kinds) != 1:
                causes.append(invalid_value(f"{var_path}.valueFrom", "",
                                            "may not have more than one field specified at a time"
                                            if kinds else "must specify one of: `fieldRef`, "
                                            "`resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`"))
    return causes


def pod_spec_errors(spec: dict[str, Any], path: str) -> list[Cause]:
    """Container names (unique DNS-1123 labels), images, env vars and numeric bounds of a PodSpec."""
    causes: list[Cause] = []
    seen: set[str] = set()
    for group in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(group) or []):
            c_path = f"{path}.{group}[{index}]"
            name = container.get("name", "")
            causes += [invalid_value(f"{c_path}.name", name, e) for e in dns1123_label_errors(name)]
            if name in seen:
                causes.append(duplicate(f"{c_path}.name", name))
            seen.add(name)
            if not container.get("image"):
                causes.append(required(f"{c_path}.image"))
            causes += _env_errors(container.get("env") or [], f"{c_path}.env")
    if not spec.get("containers"):
        causes.append(required(f"{path}.containers"))
    for key, minimum in (("activeDeadlineSeconds", 1), ("terminationGracePeriodSeconds", 0)):
        value = spec.get(key)
        if value is not None and value < minimum:
            word = "greater than 0" if minimum == 1 else "greater than or equal to 0"
            causes.append(invalid_value(f"{path}.{key}", value, f"must be {word}"))
    return causes


# --- jobs (pkg/apis/batch/validation) ---------------------------------------------------------------

JOB_RESTART_POLICIES = ["OnFailure", "Never"]
POD_REPLACEMENT_POLICIES = ["TerminatingOrFailed", "Failed"]
POD_FAILURE_ACTIONS = ["Count", "FailIndex", "FailJob", "Ignore"]
MAX_POD_FAILURE_RULES = 20
MAX_EXIT_CODE_VALUES = 255


def _pod_failure_policy_errors(policy: dict[str, Any], spec: dict[str, Any]) -> list[Cause]:
    path = "spec.podFailurePolicy"
    template_spec = spec["template"].get("spec") or {}
    container_names = {c.get("name") for group in ("containers", "initContainers")
                       for c in template_spec.get(group) or []}
    causes: list[Cause] = []
    if template_spec.get("restartPolicy") != "Never":
        causes.append(invalid_value("spec.template.spec.restartPolicy", template_spec.get("restartPolicy"),
                                    'only "Never" is supported when podFailurePolicy is specified'))
    rules = policy.get("rules") or []
    if len(rules) > MAX_POD_FAILURE_RULES:
        causes.append(Cause(f"{path}.rules", f"Too many: {len(rules)}: must have at most "
                            f"{MAX_POD_FAILURE_RULES} items", "FieldValueTooMany"))
    for index, rule in enumerate(rules):
        r_path = f"{path}.rules[{index}]"
        action = rule.get("action")
        if action not in POD_FAILURE_ACTIONS:
            causes.append(not_supported(f"{r_path}.action", action, POD_FAILURE_ACTIONS))
        elif action == "FailIndex" and spec.get("backoffLimitPerIndex") is None:
            causes.append(forbidden(f"{r_path}.action", "requires the backoffLimitPerIndex to be set"))
        exit_codes, conditions = rule.get("onExitCodes"), rule.get("onPodConditions")
        if exit_codes is None and conditions is None:
            causes.append(invalid_value(r_path, "", "specifying one of OnExitCodes and OnPodConditions is required"))
        if exit_codes is not None and conditions is not None:
            causes.append(invalid_value(r_path, "", "specifying both OnExitCodes and OnPodConditions is not supported"))
        if exit_codes is not None:
            e_path = f"{r_path}.onExitCodes"
            operator = exit_codes.get("operator")
            if operator not in ("In", "NotIn"):
                causes.append(not_supported(f"{e_path}.operator", operator, ["In", "NotIn"]))
            values = exit_codes.get("values") or []
            if not values:
                causes.append(required(f"{e_path}.values", "at least one value is required"))
            if len(values) > MAX_EXIT_CODE_VALUES:
                causes.append(Cause(f"{e_path}.values", f"Too many: {len(values)}: must have at most "
                                    f"{MAX_EXIT_CODE_VALUES} items", "FieldValueTooMany"))
            for v_index, value in enumerate(values):
                if operator == "In" and value == 0:
                    causes.append(invalid_value(f"{e_path}.values[{v_index}]", value,
                                                "must not be 0 for the In operator"))
                if v_index and value == values[v_index - 1]:
                    causes.append(duplicate(f"{e_path}.values[{v_index}]", value))
                elif v_index and value < values[v_index - 1]:
                    causes.append(invalid_value(f"{e_path}.values[{v_index}]", value, "must be ordered"))
            name = exit_codes.get("containerName")
            if name is not None and name not in container_names:
                causes.append(invalid_value(f"{e_path}.containerName", name,
                                            "must be one of the container or initContainer names in the pod template"))
        for c_index, condition in enumerate(conditions or []):
            c_path = f"{r_path}.onPodConditions[{c_index}]"
            if condition.get("status") not in ("True", "False", "Unknown"):
                causes.append(not_supported(f"{c_path}.status", condition.get("status"), ["True", "False", "Unknown"]))
            causes += [invalid_value(f"{c_path}.type", condition.get("type"), e)
                       for e in label_key_errors(condition.get("type") or "")]
    return causes


def job_errors(job: dict[str, Any]) -> list[Cause]:
    """The Job rules a schema cannot state. Runs on the *defaulted* Job (generated labels included)."""
    spec = job.get("spec") or {}
    causes: list[Cause] = []
    template = spec.get("template") or {}
    template_spec = template.get("spec") or {}
    causes += labels_errors((template.get("metadata") or {}).get("labels"), "spec.template.labels")
    restart_policy = template_spec.get("restartPolicy")
    if restart_policy not in JOB_RESTART_POLICIES:
        causes.append(not_supported("spec.template.spec.restartPolicy", restart_policy or "Always",
                                    JOB_RESTART_POLICIES))
    causes += pod_spec_errors(template_spec, "spec.template.spec")
    for key in ("parallelism", "completions", "backoffLimit", "activeDeadlineSeconds",
                "ttlSecondsAfterFinished"):
        value = spec.get(key)
        if value is not None and value < 0:
            causes.append(invalid_value(f"spec.{key}", value, "must be greater than or equal to 0"))
    if spec.get("activeDeadlineSeconds") == 0:
        causes.append(invalid_value("spec.activeDeadlineSeconds", 0, "must be greater than 0"))
    if spec.get("podFailurePolicy") is not None:
        causes += _pod_failure_policy_errors(spec["podFailurePolicy"], spec)
    replacement = spec.get("podReplacementPolicy")
    if replacement is not None:
        if replacement not in POD_REPLACEMENT_POLICIES:
            causes.append(not_supported("spec.podReplacementPolicy", replacement, POD_REPLACEMENT_POLICIES))
        elif spec.get("podFailurePolicy") is not None and replacement != "Failed":
            causes.append(not_supported("spec.podReplacementPolicy", replacement, ["Failed"]))
    return causes


def job_received_errors(job: dict[str, Any]) -> list[Cause]:
    """Rules on the Job as the client sent it, before the apiserver generates selector and labels."""
    spec = job.get("spec") or {}
    if spec.get("selector") is not None and not spec.get("manualSelector"):
        return [invalid_value("spec.selector", json.dumps(spec["selector"]), "`selector` will be auto-generated")]
    return []


def fake_job_limits(job: dict[str, Any]) -> list[Cause]:
    """What the fake refuses to run rather than run differently from a real cluster (DIFFERENCES.md)."""
    spec = job.get("spec") or {}
    template_spec = (spec.get("template") or {}).get("spec") or {}
    causes = []
    if len(template_spec.get("containers") or []) != 1:
        causes.append(forbidden("spec.template.spec.containers",
                                "fake_k8s runs exactly one container per pod (see tests/fake_k8s/DIFFERENCES.md)"))
    if template_spec.get("initContainers"):
        causes.append(forbidden("spec.template.spec.initContainers",
                                "fake_k8s does not run init containers (see tests/fake_k8s/DIFFERENCES.md)"))
    if spec.get("completionMode", "NonIndexed") != "NonIndexed":
        causes.append(forbidden("spec.completionMode",
                                "fake_k8s runs only NonIndexed Jobs (see tests/fake_k8s/DIFFERENCES.md)"))
    for key in ("backoffLimitPerIndex", "maxFailedIndexes", "successPolicy", "managedBy"):
        if spec.get(key) is not None:
            causes.append(forbidden(f"spec.{key}", f"fake_k8s does not implement {key} "
                                    "(see tests/fake_k8s/DIFFERENCES.md)"))
    return causes


def job_update_errors(old: dict[str, Any], new: dict[str, Any]) -> list[Cause]:
    """Immutable Job fields on update/patch (pkg/apis/batch/validation ValidateJobSpecUpdate)."""
    causes = []
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    for key in ("template", "selector", "completions", "podFailurePolicy", "completionMode",
                "manualSelector", "podReplacementPolicy"):
        if old_spec.get(key) != new_spec.get(key):
            causes.append(invalid_value(f"spec.{key}", "<changed>", "field is immutable"))
    return causes


# --- secrets, events, namespaces -------------------------------------------------------------------

_CONFIG_KEY = r"[-._a-zA-Z0-9]+"
SECRET_MAX_BYTES = 1024 * 1024


def secret_errors(secret: dict[str, Any]) -> list[Cause]:
    causes = []
    total = 0
    for key, value in (secret.get("data") or {}).items():
        if not re.fullmatch(_CONFIG_KEY, key) or len(key) > DNS1123_SUBDOMAIN_MAX:
            causes.append(invalid_value("data", key, "a valid config key must consist of alphanumeric "
                                        "characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or "
                                        "'key-name', regex used for validation is '" + _CONFIG_KEY + "')"))
        total += len(value) * 3 // 4
    if total > SECRET_MAX_BYTES:
        causes.append(Cause("data", f"Too long: must have at most {SECRET_MAX_BYTES} bytes", "FieldValueTooLong"))
    return causes


def event_errors(event: dict[str, Any], namespace: str) -> list[Cause]:
    involved = event.get("involvedObject") or {}
    if involved.get("namespace") and involved["namespace"] != namespace:
        return [invalid_value("involvedObject.namespace", involved["namespace"],
                              "does not match event.namespace")]
    return []
