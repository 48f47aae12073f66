"""A busy core beside a measurement: a child process that spins on one CPU of this process's affinity, as
another program on a shared machine (or a noisy neighbour of a pod) would, so that a benchmark can show how
its threads fare when one core is taken.

The spinner ends on every exit path: when the `with` block ends (normally or by an exception) it is
terminated and reaped, and if this process dies without running its cleanup (SIGKILL, a crash) the spinner
sees that its parent is gone and exits by itself within a fraction of a second."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Says it is up (one line), then spins while the process that started it (argv[1]) is its parent; checks
# about every 0.05 s of spinning.
SPIN = ("import os, sys\nparent = int(sys.argv[1])\nprint('spinning', flush=True)\nwhile os.getppid() == parent:\n"
        "    for _ in range(200_000):\n        pass\n")
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BusyCore:
    pid: int  # the spinner's process id
    cpu: int | None  # the CPU it is pinned to (None where the platform cannot pin)


def busy_cpu(affinity: set[int]) -> int:
    """The CPU to keep busy: the highest of the affinity (the OS tends to place a lone thread on the lowest)."""
    return max(affinity)


@contextmanager
def busy_core() -> Iterator[BusyCore]:
    """Run the block with one CPU of this process's affinity kept busy by a spinning child process."""
    proc = subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        cpu = None
        if hasattr(os, "sched_setaffinity"):
            cpu = busy_cpu(os.sched_getaffinity(0))
            os.sched_setaffinity(proc.pid, {cpu})
        if proc.stdout.readline().strip() != "spinning":  # the measurement starts with the core already busy
            raise RuntimeError(f"the busy-core spinner (pid {proc.pid}) did not start")
        yield BusyCore(pid=proc.pid, cpu=cpu)
    finally:
        proc.stdout.close()
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
