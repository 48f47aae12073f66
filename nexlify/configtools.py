"""Typed config dataclasses that map onto CLI flags, YAML files and JSON, with defaults written once.

A config is a tree of dataclasses. Every leaf field is declared with `setting(...)`, which records its
help text and its bounds. From that one declaration we derive:

- the CLI flag (`stop_loss` -> `--stop-loss`; booleans get `--x/--no-x`),
- the key accepted in a YAML config file, nested (`risk: {stop_loss: 0.02}`) or flat (`stop_loss: 0.02`),
- validation with one clear message naming the bad value and what is accepted,
- the JSON written into summaries and checkpoints, and read back.

Leaf names are unique across a tree, which is what makes flat keys and flags unambiguous.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, Field, field, fields
from typing import Any

from nexlify.errors import InputError


def setting(
    default: Any,
    help: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    choices: tuple | None = None,
    cli: bool = True,
) -> Any:
    """Declare a config leaf. `lo`/`hi` bound numbers (inclusive unless *_open); `choices` bounds strings
    and list items; `cli=False` keeps a setting out of the flags (file and code only). Mutable defaults
    (lists, dicts) are copied per instance."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, *, inline: bool = False) -> Any:
    """A nested config section with its own defaults. An inline section's sub-sections and leaves are
    written at its parent's level in files and flags (PipelineConfig inlines TrainConfig)."""
    return field(default_factory=cls, metadata={"section": True, "inline": inline})


# --------------------------------------------------------------------------------------------------
# Walking the tree


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]  # ("risk", "stop_loss")
    field: Field
    type: Any  # the resolved annotation

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def meta(self) -> dict:
        return dict(self.field.metadata)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    hints = _hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if f.metadata.get("section"):
            yield from iter_leaves(t, prefix + (f.name,))
        else:
            yield Leaf(prefix + (f.name,), f, t)


def leaf_index(cls: type) -> dict[str, Leaf]:
    """Leaves by their (unique) name."""
    index: dict[str, Leaf] = {}
    for leaf in iter_leaves(cls):
        if leaf.name in index:
            raise TypeError(f"config leaf name {leaf.name!r} is not unique in {cls.__name__}")
        index[leaf.name] = leaf
    return index


def get_path(cfg: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        cfg = getattr(cfg, part)
    return cfg


def set_path(cfg: Any, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        cfg = getattr(cfg, part)
    setattr(cfg, path[-1], value)


# --------------------------------------------------------------------------------------------------
# Values: coercion from text/YAML/JSON and validation


def _unwrap_optional(t: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(t)) == 2:
            return args[0], True
    return t, False


def type_name(t: Any) -> str:
    base, optional = _unwrap_optional(t)
    origin = typing.get_origin(base)
    if origin is list:
        name = f"list of {type_name(typing.get_args(base)[0])}"
    elif origin is dict or base is dict:
        name = "mapping"
    else:
        name = {int: "integer", float: "number", str: "string", bool: "true/false"}.get(base, str(base))
    return name + (" or null" if optional else "")


MAX_ECHO = 200  # characters of a bad value an error message repeats


def shown(value: Any, limit: int = MAX_ECHO) -> str:
    """repr(value) for an error message, cut to `limit` characters (a 28 MB value must not become a 28 MB
    line): the cut is marked with the value's full length."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def coerce(leaf: Leaf, value: Any, source: str) -> Any:
    """Turn a value from a flag (text), YAML or JSON into the leaf's type, or raise InputError."""
    base, optional = _unwrap_optional(leaf.type)
    where = leaf.flag if source == "flags" else f"'{leaf.name}' in {source}"
    if value is None or (isinstance(value, str) and optional and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise InputError(f"{where} must be {_a(type_name(leaf.type))}, got null")
    try:
        origin = typing.get_origin(base)
        if origin is list:
            item_t = typing.get_args(base)[0]
            items = value
            if isinstance(value, str):
                items = [v for v in value.replace(",", " ").split() if v]
            if not isinstance(items, (list, tuple)):
                raise ValueError
            return [_coerce_scalar(item_t, v) for v in items]
        if origin is dict or base is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        return _coerce_scalar(base, value)
    except (ValueError, TypeError):
        raise InputError(f"{where} must be {_a(type_name(leaf.type))}, got {shown(value)}") from None


def _coerce_scalar(t: Any, value: Any) -> Any:
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise ValueError
    if t is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            return int(value)
        return int(value)
    if t is float:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
        if not math.isfinite(out):
            raise ValueError
        return out
    if t is str:
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    if t is dict and not isinstance(value, dict):  # list[dict] items (tolerations): a mapping each
        raise ValueError
    return value


def check_leaf(leaf: Leaf, value: Any) -> None:
    """Bounds and choices of one leaf; InputError naming the flag, the value and what is accepted."""
    m = leaf.meta
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    if m.get("choices") is not None:
        for v in values:
            if v not in m["choices"]:
                accepted = ", ".join(str(c) for c in m["choices"])
                raise InputError(f"{leaf.flag}: {shown(v)} is not accepted; accepted: {accepted}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = m.get("lo"), m.get("hi")
        bad_lo = lo is not None and (value <= lo if m.get("lo_open") else value < lo)
        bad_hi = hi is not None and (value >= hi if m.get("hi_open") else value > hi)
        if bad_lo or bad_hi:
            rng = accepted_range(m)
            raise InputError(f"{leaf.flag}: {value!r} is out of range; accepted: {_a(type_name(leaf.type))} in {rng}")


def accepted_range(m: dict) -> str:
    """A setting's bounds as written in messages and --help: [1, 1000000], (0.0, 1.0)."""
    lo, hi = m.get("lo"), m.get("hi")
    left = "(" if m.get("lo_open") else "["
    right = ")" if m.get("hi_open") else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def check_bounds(flag: str, value: int, lo: int, hi: int) -> int:
    """A whole-number option outside a setting tree (a command's own flag): InputError unless lo <= value <= hi."""
    if not lo <= value <= hi:
        raise InputError(f"{flag}: {value!r} is out of range; accepted: an integer in [{lo}, {hi}]")
    return value


def validate_tree(cfg: Any) -> None:
    """Check every leaf's bounds, then each section's own `check()` for rules across fields."""
    for leaf in iter_leaves(type(cfg)):
        check_leaf(leaf, get_path(cfg, leaf.path))
    _run_checks(cfg)


def _run_checks(obj: Any) -> None:
    for f in fields(obj):
        if f.metadata.get("section"):
            _run_checks(getattr(obj, f.name))
    check = getattr(obj, "check", None)
    if callable(check):
        check()


# --------------------------------------------------------------------------------------------------
# Mappings (YAML / JSON), flags, serialisation


def apply_mapping(cfg: Any, mapping: dict, source: str) -> set[str]:
    """Apply a nested and/or flat mapping onto cfg. Returns the leaf names set. Unknown keys are errors."""
    if not isinstance(mapping, dict):
        raise InputError(f"{source}: expected a mapping of settings at the top level, got {type(mapping).__name__}")
    index = leaf_index(type(cfg))
    sections = _sections(cfg)
    touched: set[str] = set()
    where: dict[str, str] = {}  # leaf name -> how this mapping set it, to name both sides of a conflict
    for key, value in mapping.items():
        k = str(key).replace("-", "_")
        if k in sections and isinstance(value, dict):
            new = apply_mapping(sections[k], value, f"{source}: section '{k}'")
            how = f"in section '{k}'"
        elif k in sections and k not in index:
            raise InputError(f"{source}: '{k}' must be a mapping of its settings ({k}: {{name: value, ...}}), "
                             f"got {shown(value)}")
        elif k in index:
            leaf = index[k]
            set_path(cfg, leaf.path, coerce(leaf, value, source))
            new = {k}
            how = f"as '{key}'"
        else:
            accepted = ", ".join(sorted(list(index) + list(sections)))
            raise InputError(f"{source}: unknown setting {shown(key)}; accepted: {accepted}")
        twice = sorted(new & touched)
        if twice:  # flat `stop_loss` and `risk: {stop_loss}`: which one was meant? never last-wins
            name = twice[0]
            raise InputError(f"{source}: '{name}' is set twice ({where[name]} and {how}); accepted: one of them")
        touched |= new
        where.update(dict.fromkeys(new, how))
    return touched


class _UniqueKeyLoader:
    """Built lazily: a yaml SafeLoader that refuses a key written twice in one mapping."""

    loader = None


def load_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, except that a duplicated key is an InputError naming it (YAML would keep the last
    one silently). Syntax errors are InputErrors naming `source`."""
    import yaml

    if _UniqueKeyLoader.loader is None:
        class Loader(yaml.SafeLoader):
            def compose_node(self, parent, index):  # anchors and aliases: a 300-byte file must not expand to GB
                if self.check_event(yaml.AliasEvent):
                    mark = self.peek_event().start_mark
                    raise InputError(f"{self.source}: line {mark.line + 1} uses a YAML alias (*name); accepted: "
                                     "plain values (anchors and aliases are refused)")
                return super().compose_node(parent, index)

        def construct_mapping(loader, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = loader.construct_object(key_node, deep=deep)
                if key in seen:
                    raise InputError(f"{loader.source}: key {shown(key)} appears twice in one mapping (lines "
                                     f"{seen[key] + 1} and {key_node.start_mark.line + 1}); accepted: each key once")
                seen[key] = key_node.start_mark.line
            return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
        _UniqueKeyLoader.loader = Loader
    loader = _UniqueKeyLoader.loader(text)
    loader.source = source
    try:
        return loader.get_single_data()  # a SafeLoader subclass: plain data only
    except yaml.YAMLError as exc:
        raise InputError(f"{source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    finally:
        loader.dispose()


def _sections(cfg: Any) -> dict[str, Any]:
    """Section objects reachable by name from cfg's level (inline sections' children included)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        if f.metadata.get("section"):
            child = getattr(cfg, f.name)
            if f.metadata.get("inline"):
                out.update(_sections(child))
            else:
                out[f.name] = child
    return out


def to_dict(cfg: Any) -> dict:
    """The nested file form: one key per section, inline sections merged into their parent."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("section"):
            if f.metadata.get("inline"):
                out.update(to_dict(value))
            else:
                out[f.name] = to_dict(value)
        else:
            out[f.name] = json.loads(json.dumps(value))
    return out


def from_dict(cls: type, data: dict, source: str = "config") -> Any:
    cfg = cls()
    apply_mapping(cfg, data, source)
    return cfg


def config_hash(data: dict) -> str:
    """A short, stable hash of a config mapping (canonical JSON)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def add_flags(parser: argparse.ArgumentParser, cls: type, *, only: set[str] | None = None) -> None:
    """Add one flag per CLI leaf of cls. Defaults are SUPPRESSed so that only flags the user typed appear
    in the namespace: explicit flags then win over presets and the config file."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for leaf in iter_leaves(cls):
        if not leaf.meta.get("cli", True) or (only is not None and leaf.name not in only):
            continue
        group_name = leaf.path[-2] if len(leaf.path) > 1 else "general"
        group = groups.get(group_name) or parser.add_argument_group(f"{group_name} settings")
        groups[group_name] = group
        base, _ = _unwrap_optional(leaf.type)
        default = leaf.field.default if leaf.field.default is not MISSING else leaf.field.default_factory()  # type: ignore[misc]
        bounds = f"; accepted: {accepted_range(leaf.meta)}" if leaf.meta.get("hi") is not None else ""
        help_text = f"{leaf.meta['help']} (default: {default}{bounds})".replace("%", "%%")  # argparse formats with %
        if base is bool:
            group.add_argument(leaf.flag, dest=leaf.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(base) is list:
            group.add_argument(leaf.flag, dest=leaf.name, nargs="+", default=argparse.SUPPRESS, help=help_text,
                               metavar=leaf.name.upper())
        else:
            group.add_argument(leaf.flag, dest=leaf.name, default=argparse.SUPPRESS, help=help_text,
                               metavar=leaf.name.upper())


def flags_to_mapping(ns: argparse.Namespace, cls: type) -> dict:
    """The leaves the user typed, as a flat mapping of raw values (coerced by apply_mapping)."""
    index = leaf_index(cls)
    out = {}
    for key, value in vars(ns).items():
        if key in index:
            if isinstance(value, list):
                value = [v for item in value for v in str(item).replace(",", " ").split() if v]
            out[key] = value
    return out


def json_schema(cls: type) -> dict:
    """A JSON schema of the config tree (nested form), rejecting unknown keys: used by the Helm chart."""
    hints = _hints(cls)
    props: dict[str, Any] = {}
    for f in fields(cls):
        t = hints[f.name]
        if f.metadata.get("section"):
            if f.metadata.get("inline"):
                props.update(json_schema(t)["properties"])
            else:
                props[f.name] = json_schema(t)
            continue
        props[f.name] = _leaf_schema(t, f.metadata)
    return {"type": "object", "additionalProperties": False, "properties": props}


def _leaf_schema(t: Any, meta: Any) -> dict:
    base, optional = _unwrap_optional(t)
    origin = typing.get_origin(base)
    if origin is list:
        item = _leaf_schema(typing.get_args(base)[0], {"choices": meta.get("choices")})
        schema: dict[str, Any] = {"type": "array", "items": item}
    elif origin is dict or base is dict:
        schema = {"type": "object"}
    else:
        schema = {"type": {int: "integer", float: "number", str: "string", bool: "boolean"}[base]}
        if meta.get("choices") is not None:
            schema["enum"] = list(meta["choices"])
        if meta.get("lo") is not None:
            schema["exclusiveMinimum" if meta.get("lo_open") else "minimum"] = meta["lo"]
        if meta.get("hi") is not None:
            schema["exclusiveMaximum" if meta.get("hi_open") else "maximum"] = meta["hi"]
    if meta.get("help"):
        schema["description"] = meta["help"]
    if optional:
        schema = {"anyOf": [schema, {"type": "null"}], **({"description": meta["help"]} if meta.get("help") else {})}
    return schema
