"""How many CPUs this process may use: its CPU affinity, capped by the cgroup's CPU quota (cgroup v2
`cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), as a container under a CPU limit or a pod with a
Kubernetes CPU limit sees it. os.cpu_count() counts the machine's cores, which such a process may not have.

`usable_cpus` is a pure function of what it is given (the tests feed it fake cgroup files); `available_cpus`
reads this process's."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus(cpu_max: str | None = None, cfs_quota_us: str | None = None, cfs_period_us: str | None = None) -> float | None:
    """The CPUs a cgroup quota allows (quota / period), None where there is no quota: v2 `cpu.max` holds
    "max 100000" (no quota) or "<quota> <period>" in microseconds; v1 holds the quota (-1: none) and the period
    in two files. Text that is not a quota (empty, garbled, non-positive) counts as none."""
    if cpu_max is not None:
        parts = cpu_max.split()
        if len(parts) >= 1 and parts[0] != "max":
            try:
                quota = float(parts[0])
                period = float(parts[1]) if len(parts) > 1 else 100_000.0
            except ValueError:
                return None
            if quota > 0 and period > 0:
                return quota / period
        return None
    if cfs_quota_us is not None and cfs_period_us is not None:
        try:
            quota, period = float(cfs_quota_us.strip()), float(cfs_period_us.strip())
        except ValueError:
            return None
        if quota > 0 and period > 0:
            return quota / period
    return None


def usable_cpus(affinity: int, quota: float | None) -> int:
    """The threads worth starting: the CPUs the affinity mask allows, no more than the quota rounded up (a
    quota of 1.5 CPUs lets two threads run half the time each), and at least one."""
    n = max(1, int(affinity))
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return n


def cgroup_dir(proc_self_cgroup: str, root: Path = CGROUP_ROOT) -> Path:
    """This process's cgroup v2 folder from /proc/self/cgroup ("0::/path"); the root where there is no v2 line."""
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return root / path.lstrip("/")
    return root


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_self_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota of this process's cgroup and its parents (v2), else v1's, else None."""
    if proc_self_cgroup is None:
        proc_self_cgroup = _read(Path("/proc/self/cgroup")) or ""
    here = cgroup_dir(proc_self_cgroup, root)
    quotas = []
    for folder in [here, *here.parents]:
        if root != folder and root not in folder.parents:
            break
        q = quota_cpus(cpu_max=_read(folder / "cpu.max")) if (folder / "cpu.max").exists() else None
        if q is not None:
            quotas.append(q)
    if quotas:
        return min(quotas)
    v1 = root / "cpu"
    return quota_cpus(cfs_quota_us=_read(v1 / "cpu.cfs_quota_us"), cfs_period_us=_read(v1 / "cpu.cfs_period_us"))


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """usable_cpus for this process: its affinity (os.sched_getaffinity) and its cgroup's quota."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return usable_cpus(affinity, cgroup_quota(root))


def cpus_of_request(quantity: str) -> int:
    """The threads a Kubernetes CPU request gives a worker: "2" -> 2, "1500m" -> 2 (rounded up), "250m" -> 1."""
    text = str(quantity).strip()
    value = float(text[:-1]) / 1000.0 if text.endswith("m") else float(text)
    return max(1, math.ceil(value - 1e-9))
