"""The CPUs a process may use (nexlify.cpus): affinity capped by the cgroup quota, read from fake cgroup files."""

from __future__ import annotations

import os

import pytest

from nexlify.cpus import available_cpus, cgroup_dir, cgroup_quota, cpus_of_request, quota_cpus, usable_cpus


@pytest.mark.parametrize("cpu_max, want", [
    ("max 100000\n", None),            # no quota
    ("200000 100000\n", 2.0),          # two CPUs
    ("150000 100000", 1.5),
    ("50000 100000", 0.5),
    ("100000", 1.0),                   # the period left out: the kernel's default 100 ms
    ("", None), ("garbled", None), ("-1 100000", None), ("0 100000", None),
])
def test_quota_from_cgroup_v2_cpu_max(cpu_max, want):
    assert quota_cpus(cpu_max=cpu_max) == want


@pytest.mark.parametrize("quota, period, want", [("-1\n", "100000\n", None), ("300000", "100000", 3.0),
                                                 ("25000", "50000", 0.5), ("x", "100000", None)])
def test_quota_from_cgroup_v1_files(quota, period, want):
    assert quota_cpus(cfs_quota_us=quota, cfs_period_us=period) == want


@pytest.mark.parametrize("affinity, quota, want", [
    (2, None, 2), (16, 2.0, 2), (16, 1.5, 2), (16, 0.5, 1), (4, 8.0, 4), (1, None, 1), (0, None, 1), (8, 2.0001, 3),
])
def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(affinity, quota, want):
    assert usable_cpus(affinity, quota) == want


def test_the_tightest_quota_of_the_cgroup_and_its_parents_counts(tmp_path):
    (tmp_path / "kubepods" / "pod1" / "ctr").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "cpu.max").write_text("400000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "ctr" / "cpu.max").write_text("max 100000\n")
    own = "0::/kubepods/pod1/ctr\n"
    assert cgroup_dir(own, tmp_path) == tmp_path / "kubepods" / "pod1" / "ctr"
    assert cgroup_quota(tmp_path, own) == 1.5
    assert usable_cpus(8, cgroup_quota(tmp_path, own)) == 2


def test_v1_is_read_where_there_is_no_v2_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path, "12:cpu,cpuacct:/docker/abc\n") == 1.0
    assert cgroup_quota(tmp_path / "nothing", "0::/\n") is None


def test_this_process_gets_at_most_its_affinity():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("request_, want", [("2", 2), ("1500m", 2), ("250m", 1), ("1", 1), ("4000m", 4), ("0.5", 1)])
def test_a_kubernetes_cpu_request_gives_its_threads(request_, want):
    assert cpus_of_request(request_) == want
