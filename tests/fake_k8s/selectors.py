"""Label and field selectors, parsed and matched as the apiserver does (pure functions).

Label selector grammar (`k8s.io/apimachinery/pkg/labels`): requirements joined by commas, each one of
`key`, `!key`, `key=v`, `key==v`, `key!=v`, `key in (a,b)`, `key notin (a,b)`, `key>N`, `key<N`.
`!=` and `notin` also match objects that lack the key. Keys and values are checked with the same
rules as object labels; a bad selector is a 400 BadRequest.

Field selectors support `=`, `==` and `!=` on the few fields each resource registers
(`metadata.name` and `metadata.namespace` everywhere, plus `status.phase` and `spec.nodeName` for
pods and `status.successful` for jobs); any other field is a 400 `field label not supported`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from .status import bad_request
from .validation_rules import label_key_errors, label_value_errors

_OPERATORS_WITH_VALUE = ("==", "!=", "=")


@dataclass(frozen=True)
class Requirement:
    """One clause of a label selector."""

    key: str
    operator: str  # "exists", "!", "=", "!=", "in", "notin", "gt", "lt"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "in"):
            return present and value in self.values
        if self.operator in ("!=", "notin"):
            return not present or value not in self.values
        if self.operator in ("gt", "lt"):
            if not present:
                return False
            try:
                number = int(value)  # type: ignore[arg-type]
            except ValueError:
                return False
            bound = int(self.values[0])
            return number > bound if self.operator == "gt" else number < bound
        raise AssertionError(self.operator)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SET_RE = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s*\((.*)\)\s*$")
_NOT_EXISTS_RE = re.compile(rf"^\s*!\s*({_KEY})\s*$")
_EXISTS_RE = re.compile(rf"^\s*({_KEY})\s*$")
_EQUALITY_RE = re.compile(rf"^\s*({_KEY})\s*(==|!=|=)\s*([^=!\s]*)\s*$")
_ORDER_RE = re.compile(rf"^\s*({_KEY})\s*([<>])\s*(-?[0-9]+)\s*$")


def _check_key(key: str, selector: str) -> None:
    errors = label_key_errors(key)
    if errors:
        raise bad_request(f"unable to parse requirement: key: Invalid value: {key!r}: {errors[0]} "
                          f"(in label selector {selector!r})")


def _check_value(value: str, selector: str) -> None:
    errors = label_value_errors(value)
    if errors:
        raise bad_request(f"unable to parse requirement: values[0]: Invalid value: {value!r}: {errors[0]} "
                          f"(in label selector {selector!r})")


def parse_label_selector(selector: str | None) -> list[Requirement]:
    """Parse `?labelSelector=`; an empty or missing selector selects everything."""
    if not selector or not selector.strip():
        return []
    requirements = []
    for clause in _split_top_level(selector):
        if not clause.strip():
            raise bad_request(f"found '', expected: identifier (in label selector {selector!r})")
        if match := _SET_RE.match(clause):
            key, operator, inner = match.groups()
            values = tuple(v.strip() for v in inner.split(",")) if inner.strip() else ()
            if not values:
                raise bad_request(f"for 'in', 'notin' operators, values set can't be empty "
                                  f"(in label selector {selector!r})")
            _check_key(key, selector)
            for value in values:
                _check_value(value, selector)
            requirements.append(Requirement(key, operator, values))
        elif match := _NOT_EXISTS_RE.match(clause):
            _check_key(match.group(1), selector)
            requirements.append(Requirement(match.group(1), "!"))
        elif match := _EXISTS_RE.match(clause):
            _check_key(match.group(1), selector)
            requirements.append(Requirement(match.group(1), "exists"))
        elif match := _ORDER_RE.match(clause):
            key, sign, number = match.groups()
            _check_key(key, selector)
            requirements.append(Requirement(key, "gt" if sign == ">" else "lt", (number,)))
        elif match := _EQUALITY_RE.match(clause):
            key, operator, value = match.groups()
            _check_key(key, selector)
            _check_value(value, selector)
            requirements.append(Requirement(key, "!=" if operator == "!=" else "=", (value,)))
        else:
            raise bad_request(f"unable to parse requirement: {clause.strip()!r} (in label selector {selector!r})")
    return requirements


def labels_match(requirements: list[Requirement], obj: dict[str, Any]) -> bool:
    """True when every requirement holds for the object's `metadata.labels`."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(requirement.matches(labels) for requirement in requirements)


def _get(obj: dict[str, Any], dotted: str) -> str:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# The fields each resource registers for field selection (its GetAttrs in the apiserver).
FIELD_GETTERS: dict[str, dict[str, Callable[[dict[str, Any]], str]]] = {
    "pods": {name: (lambda o, n=name: _get(o, n)) for name in (
        "metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy",
        "spec.schedulerName", "spec.serviceAccountName", "status.phase", "status.podIP")},
    "jobs": {name: (lambda o, n=name: _get(o, n)) for name in (
        "metadata.name", "metadata.namespace", "status.successful")},
    "events": {name: (lambda o, n=name: _get(o, n)) for name in (
        "metadata.name", "metadata.namespace", "involvedObject.kind", "involvedObject.name",
        "involvedObject.namespace", "involvedObject.uid", "reason", "type", "reportingComponent")},
    "secrets": {name: (lambda o, n=name: _get(o, n)) for name in (
        "metadata.name", "metadata.namespace", "type")},
    "namespaces": {name: (lambda o, n=name: _get(o, n)) for name in ("metadata.name", "status.phase")},
}
FIELD_GETTERS["events"]["source"] = lambda o: _get(o, "source.component")
# `status.successful` of a job reads the field `status.succeeded` (a quirk kept from the apiserver).
FIELD_GETTERS["jobs"]["status.successful"] = lambda o: _get(o, "status.succeeded") or "0"


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    equal: bool
    value: str


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def parse_field_selector(selector: str | None, resource: str) -> list[FieldRequirement]:
    """Parse `?fieldSelector=` for `resource`; unknown fields are a 400 as in the apiserver."""
    if not selector or not selector.strip():
        return []
    supported = FIELD_GETTERS.get(resource, {"metadata.name": lambda o: _get(o, "metadata.name")})
    requirements = []
    for clause in _split_unescaped(selector, ","):
        for operator in _OPERATORS_WITH_VALUE:
            index = clause.find(operator)
            if index > 0:
                field, value = clause[:index].strip(), clause[index + len(operator):]
                break
        else:
            raise bad_request(f"invalid selector: '{selector}'; can't understand '{clause}'")
        if field not in supported:
            raise bad_request(f'field label not supported: {field}')
        requirements.append(FieldRequirement(field, operator != "!=", _unescape(value)))
    return requirements


def fields_match(requirements: list[FieldRequirement], obj: dict[str, Any], resource: str) -> bool:
    """True when every field requirement holds for the object."""
    getters = FIELD_GETTERS.get(resource, {"metadata.name": lambda o: _get(o, "metadata.name")})
    return all((getters[r.field](obj) == r.value) == r.equal for r in requirements)
