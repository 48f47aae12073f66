"""Scratch folders in the system's temporary directory, named <prefix><pid>-<random>, so that the
next process removes those of a process killed with -9 (which cannot clean its own). Torch-free."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import structlog

log = structlog.get_logger("nexlify.scratch")

SCRATCH_PREFIX = "nexlify-worker-"  # + <pid>-<random>: the owner's pid tells a live copy from a stale one


def clean_stale_scratch(tmp_root: str | None = None, prefix: str = SCRATCH_PREFIX) -> list[str]:
    """Remove the scratch folders (<tmp>/<prefix><pid>-*) of processes that are gone: a worker's snapshot
    copy, a report's model and data; a process killed with -9 cannot clean its own. A folder whose owning
    pid is alive (another process) is left alone, and so is one not named by this scheme. Returns the
    folders removed."""
    tmp_root = tmp_root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp_root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        path = os.path.join(tmp_root, name)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    if removed:
        log.info("stale_scratch_removed", folders=removed)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A TemporaryDirectory named for this process (removed on every exit path but -9; a later process
    removes that one), after the stale folders of dead processes with the same prefix are removed."""
    clean_stale_scratch(prefix=prefix)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


def sha256_file(path: str) -> str:
    """The hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
