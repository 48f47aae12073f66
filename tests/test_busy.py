"""The busy core beside a benchmark (nexlify.busy, `nexlify bench env|train --busy-core`): the spinner runs,
pinned to one CPU of ours, while the block runs, and is gone afterwards on every exit path. No timings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from nexlify import bench
from nexlify.busy import busy_core, busy_cpu


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (R running, S sleeping, Z zombie), None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if _state(pid) in (None, "Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("affinity, expected", [({0}, 0), ({0, 1}, 1), ({2, 5, 3}, 5)])
def test_busy_cpu_is_the_highest_of_the_affinity(affinity, expected):
    assert busy_cpu(affinity) == expected


def test_spinner_runs_pinned_during_the_block_and_is_gone_after():
    with busy_core() as busy:
        assert busy.pid != os.getpid()
        assert _state(busy.pid) in ("R", "S")  # alive (R while it spins on its CPU)
        assert os.sched_getaffinity(busy.pid) == {max(os.sched_getaffinity(0))} == {busy.cpu}
        with open(f"/proc/{busy.pid}/cmdline", "rb") as fh:
            assert fh.read().split(b"\0")[-2] == str(os.getpid()).encode()  # it watches us
    assert _state(busy.pid) is None  # terminated and reaped, not a zombie


def test_spinner_is_stopped_when_the_block_raises():
    with pytest.raises(RuntimeError, match="measurement failed"):
        with busy_core() as busy:
            pid = busy.pid
            raise RuntimeError("measurement failed")
    assert _state(pid) is None


def test_spinner_exits_by_itself_when_its_parent_is_killed():
    """SIGKILL runs no cleanup: the spinner notices that its parent is gone and ends."""
    code = ("import sys, time\nfrom nexlify.busy import busy_core\nwith busy_core() as b:\n"
            "    print(b.pid, flush=True)\n    time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        pid = int(parent.stdout.readline())
        assert _state(pid) in ("R", "S")
        parent.kill()
        parent.wait()
        assert _gone(pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_bench_env_busy_core_reports_the_cpu_and_stops_the_spinner(monkeypatch):
    seen = []

    @contextmanager
    def recording():
        with busy_core() as busy:
            assert _state(busy.pid) in ("R", "S")
            seen.append(busy)
            yield busy

    monkeypatch.setattr(bench, "start_busy_core", recording)
    out = bench.bench_env(["BTC/USDT"], 2, 3, strategies=["spot"], kernel="torch", busy_core=True)
    [busy] = seen
    assert out["busy_core"] == busy.cpu == max(os.sched_getaffinity(0))
    assert _state(busy.pid) is None
    quiet = bench.bench_env(["BTC/USDT"], 2, 3, strategies=["spot"], kernel="torch")
    assert quiet["busy_core"] is None and len(seen) == 1
