"""Store key rules shared by every store, so a key valid for a folder is valid for a bucket.

A key is a relative, '/'-separated path ("initial_runs/run_1/result.json"). Keys that could leave
the store's root (an absolute path, a '..' part) are refused: on a folder they would write outside
the output, and on S3 they would mean something else than on a folder.
"""

from __future__ import annotations

import secrets

from nexlify.errors import PermanentError

PROBE_PREFIX = ".nexlify-probe-"  # check_writable's probe objects


def _key_parts(key: str) -> list[str]:
    """The key's path parts without '.' and empty ones; PermanentError if the key escapes the root."""
    if not isinstance(key, str):
        raise PermanentError(f"store key must be a string, got {type(key).__name__}: {key!r}")
    if key.startswith("/") or "\\" in key:
        raise PermanentError(
            f"store key {key!r} is not a relative '/'-separated path; keys look like 'runs/run_1/result.json'"
        )
    parts = [part for part in key.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PermanentError(f"store key {key!r} contains '..' and would escape the store's root")
    return parts


def clean_key(key: str) -> str:
    """The key in canonical form ('.' and empty parts dropped); PermanentError if it escapes the root.

    >>> clean_key("a//b/./c.json")
    'a/b/c.json'
    """
    parts = _key_parts(key)
    if not parts:
        raise PermanentError(f"store key {key!r} is empty; keys look like 'runs/run_1/result.json'")
    return "/".join(parts)


def clean_prefix(prefix: str) -> str:
    """A listing prefix: like a key, but may be empty and keeps a trailing '/' (it means 'a folder').

    A prefix matches keys by their leading characters, as in S3: "run_1" matches "run_1/x" and
    "run_10/x"; "run_1/" matches only the folder.
    """
    parts = _key_parts(prefix)
    if not parts:
        return ""
    cleaned = "/".join(parts)
    return cleaned + "/" if prefix.endswith("/") else cleaned


def new_probe_key() -> str:
    """A random key for a write probe (".nexlify-probe-<16 hex>"), unlikely to clash with anything real."""
    return PROBE_PREFIX + secrets.token_hex(8)
