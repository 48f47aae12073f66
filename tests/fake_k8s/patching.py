"""PATCH bodies: JSON merge patch (RFC 7386), strategic merge patch (simplified), JSON patch (RFC 6902).

The official Python client sends a dict body as `application/strategic-merge-patch+json` and a list
body as `application/json-patch+json`. The strategic merge implemented here is a merge patch whose
lists of named items (containers, env, volumes, ports, conditions...) are merged by their key
instead of replaced, which is what the real one does for those lists; `$patch`/`$retainKeys`
directives are answered 400 instead of being guessed at.
"""

from __future__ import annotations

import copy
from typing import Any

from .status import bad_request, unsupported_media_type

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"

# List fields that strategic merge merges by a key (patchMergeKey in the Kubernetes types).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "conditions": "type",
              "ownerReferences": "uid", "imagePullSecrets": "name", "tolerations": None}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Merge patch, except that lists of keyed items are merged item by item."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise bad_request(f"fake_k8s: strategic merge patch directive {key!r} is not supported")
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and MERGE_KEYS.get(key) and isinstance(result.get(key), list):
            merge_key = MERGE_KEYS[key]
            merged = copy.deepcopy(result[key])
            for item in value:
                if not isinstance(item, dict) or merge_key not in item:
                    raise bad_request(f"fake_k8s: list {key!r} items need the merge key {merge_key!r}")
                for index, existing in enumerate(merged):
                    if existing.get(merge_key) == item[merge_key]:
                        merged[index] = strategic_merge_patch(existing, item)
                        break
                else:
                    merged.append(copy.deepcopy(item))
            result[key] = merged
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, parts[-1]


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 add / remove / replace / test / copy / move."""
    if not isinstance(operations, list):
        raise bad_request("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        try:
            kind, parts = op["op"], _pointer(op["path"])
            if not parts:
                raise bad_request("fake_k8s: JSON patch on the whole document is not supported")
            parent, last = _parent(doc, parts)
            if kind == "test":
                current = parent[int(last)] if isinstance(parent, list) else parent[last]
                if current != op["value"]:
                    raise bad_request(f"testing value {op['path']} failed")
            elif kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind in ("add", "replace", "copy", "move"):
                if kind in ("copy", "move"):
                    source_parent, source_last = _parent(doc, _pointer(op["from"]))
                    key = int(source_last) if isinstance(source_parent, list) else source_last
                    value = copy.deepcopy(source_parent[key])
                    if kind == "move":
                        del source_parent[key]
                    parent, last = _parent(doc, parts)
                else:
                    value = copy.deepcopy(op["value"])
                if isinstance(parent, list):
                    index = len(parent) if last == "-" else int(last)
                    if kind == "replace":
                        parent[index] = value
                    else:
                        parent.insert(index, value)
                else:
                    if kind == "replace" and last not in parent:
                        raise bad_request(f"replace operation does not apply: doc is missing key: {op['path']}")
                    parent[last] = value
            else:
                raise bad_request(f"unexpected JSON patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as error:
            raise bad_request(f"the JSON patch could not be applied: {error!r} in {op!r}") from None
    return doc


def apply_patch(content_type: str, target: dict[str, Any], patch: Any) -> dict[str, Any]:
    """Apply a PATCH body of `content_type` to `target` (a deep copy is returned)."""
    kind = (content_type or "").split(";")[0].strip()
    if kind == MERGE:
        return merge_patch(target, patch)
    if kind == STRATEGIC:
        return strategic_merge_patch(target, patch)
    if kind == JSON_PATCH:
        return json_patch(target, patch)
    raise unsupported_media_type(kind)
