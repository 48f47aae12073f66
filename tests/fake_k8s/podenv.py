"""What the kubelet computes before starting a container: its environment and its argv.

Environment, in the kubelet's order: `envFrom` (secretRef), then `env` (literal values with
`$(VAR)` expansion, `valueFrom.secretKeyRef`, `valueFrom.fieldRef`); later entries win. A
reference the fake cannot resolve raises `ContainerConfigError`, which the kubelet reports as the
container waiting with reason `CreateContainerConfigError`, as on a real node (for a missing
secret the pod stays Pending until the secret exists).

argv: the image is replaced by the local install. `command_map` maps the container's `command[0]`
(or, when `command` is unset, the image reference, standing in for the image's ENTRYPOINT) to a
local argv prefix; a callable receives the container (after `$(VAR)` expansion) and returns argv.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Callable, Mapping, Sequence

CommandMap = Mapping[str, Sequence[str]] | Callable[[dict[str, Any]], list[str]]
SecretLookup = Callable[[str, str], dict[str, Any] | None]  # (namespace, name) -> Secret or None

_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class ContainerConfigError(Exception):
    """The container cannot be configured (reason CreateContainerConfigError)."""


class StartError(Exception):
    """The container's process cannot be started (terminated with reason StartError, exit code 128)."""


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known variables are replaced, unknown ones kept, `$$` -> `$`."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR_REF.sub(replace, value)


def _secret_value(namespace: str, ref: dict[str, Any], secrets: SecretLookup) -> str | None:
    secret = secrets(namespace, ref.get("name", ""))
    if secret is None:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(f'secret "{ref.get("name", "")}" not found')
    data = secret.get("data") or {}
    if ref.get("key") not in data:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(f"couldn't find key {ref.get('key')} in Secret {namespace}/{ref.get('name')}")
    return base64.b64decode(data[ref["key"]]).decode()


_LABEL_REF = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def _field_value(pod: dict[str, Any], path: str) -> str:
    simple = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": (pod.get("status") or {}).get("hostIP", ""),
        "status.podIP": (pod.get("status") or {}).get("podIP", ""),
    }
    if path in simple:
        return simple[path]
    if match := _LABEL_REF.match(path):
        return (pod["metadata"].get(match.group(1)) or {}).get(match.group(2), "")
    raise ContainerConfigError(f"fake_k8s: unsupported fieldRef fieldPath {path!r}")


def container_env(pod: dict[str, Any], container: dict[str, Any], secrets: SecretLookup) -> dict[str, str]:
    """The variables the container declares (without the fake's own PATH/TMPDIR additions)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if source.get("secretRef") is not None:
            ref = source["secretRef"]
            secret = secrets(namespace, ref.get("name", ""))
            if secret is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'secret "{ref.get("name", "")}" not found')
            for key, value in (secret.get("data") or {}).items():
                env[prefix + key] = base64.b64decode(value).decode()
        else:
            raise ContainerConfigError("fake_k8s: only envFrom.secretRef is supported (no ConfigMaps)")
    for var in container.get("env") or []:
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = expand(var.get("value", ""), env)
        elif source.get("secretKeyRef") is not None:
            value = _secret_value(namespace, source["secretKeyRef"], secrets)
            if value is not None:
                env[var["name"]] = value
        elif source.get("fieldRef") is not None:
            env[var["name"]] = _field_value(pod, source["fieldRef"]["fieldPath"])
        else:
            kind = next(iter(source), "?")
            raise ContainerConfigError(f"fake_k8s: env valueFrom.{kind} is not supported")
    return env


def container_argv(container: dict[str, Any], env: Mapping[str, str], command_map: CommandMap) -> list[str]:
    """The local argv for the container: `command` + `args` with `$(VAR)` expanded and the image mapped."""
    command = [expand(part, env) for part in container.get("command") or []]
    args = [expand(part, env) for part in container.get("args") or []]
    if callable(command_map):
        argv = list(command_map({**container, "command": command, "args": args}))
        if not argv:
            raise StartError("fake_k8s: the command resolver returned an empty argv")
        return argv
    if command:
        prefix = command_map.get(command[0])
        return (list(prefix) + command[1:] if prefix is not None else command) + args
    prefix = command_map.get(container.get("image", ""))
    if prefix is None:
        raise StartError(f"fake_k8s: the container has no command and its image {container.get('image')!r} is not "
                         "in image_command_map, so the fake cannot run the image's ENTRYPOINT")
    return list(prefix) + args
