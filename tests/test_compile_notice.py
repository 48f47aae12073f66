"""A kernel call that compiles says so (nexlify.env.fused_portfolio.announce_compiles): at once when numba's disk
cache has no index for it, after a delay when the index exists but lacks the call's argument types; a call that
finds its compiled code says nothing, and a process that waited for another's compile says only that."""

from __future__ import annotations

import os

import numba
import pytest
from structlog.testing import capture_logs

from nexlify.env.fused_portfolio import announce_compiles


def _fresh():
    return numba.njit(cache=False)(lambda x: x + 1)


@pytest.mark.parametrize("in_cache, calls, notices", [
    (True, [1, 2, 3], 1),  # an index on disk: one compile (int) said after the delay, then the code is found
    (True, [1, 1.5, 2, 2.5], 2),  # int, then float: two specialisations, two notices
    (False, [1, 2], 1),  # no index: the compile is said at once, once
    (False, [1, 1.5], 2),  # ... and so is every specialisation compiled while there is none
])
def test_each_compile_says_so_once(in_cache, calls, notices):
    kernel = _fresh()
    announce_compiles(kernel, "serial", after_s=0.0 if in_cache else 60.0, in_cache=lambda _: in_cache)
    with capture_logs() as logs:
        for x in calls:
            assert kernel(x) == x + 1
    said = [e for e in logs if e["event"] == "kernel_compiling"]
    assert len(said) == notices
    assert all(e["kernel"] == "environment step (serial)" for e in said)
    # said after the delay only where an index might have held the code
    assert all(e.get("new_argument_types", False) == in_cache for e in said)


def test_a_compile_shorter_than_the_delay_says_nothing():
    kernel = _fresh()
    announce_compiles(kernel, "serial", after_s=60.0, in_cache=lambda _: True)
    with capture_logs() as logs:
        assert kernel(1) == 2
    assert not [e for e in logs if e["event"] == "kernel_compiling"]


KERNEL = "import numba\n\n\n@numba.njit(cache=True)\ndef f(x):\n    return x + 1\n"

HOLDER = """
import sys
import kern
from nexlify.env.fused_portfolio import _compile_lock_path, compile_lock
with compile_lock(_compile_lock_path(kern.f), "serial"):
    print("locked", flush=True)
    sys.stdin.readline()  # until the test says go: the other process is waiting by then
    kern.f(1)  # compiles, and writes numba's disk cache
print(dict(kern.f.stats.cache_misses).__len__(), flush=True)
"""

WAITER = """
import json
import kern
from structlog.testing import capture_logs
from nexlify.env.fused_portfolio import announce_compiles
announce_compiles(kern.f, "serial", after_s=60.0)
with capture_logs() as logs:
    assert kern.f(1) == 2
print(json.dumps({"hits": len(kern.f.stats.cache_hits), "misses": len(kern.f.stats.cache_misses),
                  "events": [e["event"] for e in logs]}), flush=True)
"""


def test_processes_compiling_the_same_kernel_side_by_side_compile_it_once(tmp_path):
    """A process that finds another compiling the same kernel waits for it, then loads its code from the disk
    cache (numba counts a cache hit and no miss) instead of compiling it a second time; it says that it waited,
    and not that it compiles (it checks the cache for the kernel once it holds the lock)."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    (tmp_path / "kern.py").write_text(KERNEL)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), repo, os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, cwd=tmp_path, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        waiter = subprocess.Popen([sys.executable, "-c", WAITER], env=env, cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE)
        lock = next((tmp_path / "cache").rglob("*.compile.lock"))
        deadline = time.monotonic() + 120
        while not _locked_by_two(lock) and time.monotonic() < deadline:  # the waiter is blocked on the lock
            assert waiter.poll() is None, "the waiter ended without waiting for the lock"
            time.sleep(0.1)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "1"  # the holder compiled: one cache miss
        out = json.loads(waiter.communicate(timeout=300)[0])
    finally:
        holder.kill()
    assert out == {"hits": 1, "misses": 0, "events": ["kernel_compile_waiting"]}


def _locked_by_two(lock) -> bool:
    """Whether two processes hold or wait on the flock of `lock` (/proc/locks lists the waiter with '->')."""
    inode = os.stat(lock).st_ino
    lines = [ln for ln in open("/proc/locks").read().splitlines() if f":{inode} " in ln]
    return len(lines) >= 2
