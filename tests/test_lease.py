"""One live controller per output: the lease rule (a pure function, table-driven) and its two thin
backends, a file lock in a folder and a conditional-put lease object on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from controller.lease import (
    FREE, HELD, LEASE_KEY, MINE, STEALABLE, LeaseHeld, LeaseLost, LocalLease, S3Lease, describe, lease_record,
    new_holder, verdict,
)
from controller.stores import LocalStore, S3Store
from tests.pipeline_support import REPO

ME = {"host": "a", "pid": 1, "started_at": "t0", "token": "me", "job": ""}
OTHER = {"host": "b", "pid": 2, "started_at": "t1", "token": "other", "job": ""}
POD_1 = {**OTHER, "job": "nexlify-train-3dbea7f1"}
POD_2 = {**ME, "job": "nexlify-train-3dbea7f1"}
OTHER_JOB = {**OTHER, "job": "nexlify-train-0000aaaa"}

# (record found, who asks, now, what the backend knows of the holder's process, verdict)
CASES = [
    ("no lease", None, ME, 100.0, None, FREE),
    ("mine", lease_record(ME, 0.0, 60.0), ME, 100.0, None, MINE),
    ("another, not expired", lease_record(OTHER, 50.0, 60.0), ME, 100.0, None, HELD),
    ("another, expires exactly now", lease_record(OTHER, 40.0, 60.0), ME, 100.0, None, STEALABLE),
    ("another, expired", lease_record(OTHER, 0.0, 60.0), ME, 100.0, None, STEALABLE),
    ("file lock held: alive beats expiry", lease_record(OTHER, 0.0, 60.0), ME, 100.0, True, HELD),
    ("file lock free: dead beats freshness", lease_record(OTHER, 99.0, 60.0), ME, 100.0, False, STEALABLE),
    ("restarted pod of the same Job", lease_record(POD_1, 99.0, 60.0), POD_2, 100.0, None, STEALABLE),
    ("another Job's pod, not expired", lease_record(OTHER_JOB, 99.0, 60.0), POD_2, 100.0, None, HELD),
    ("unreadable record, unknown liveness", "unreadable", ME, 100.0, None, STEALABLE),
    ("unreadable record, lock held", "unreadable", ME, 100.0, True, HELD),
    ("no expiry field", {"holder": OTHER}, ME, 100.0, None, STEALABLE),
]


@pytest.mark.parametrize("case, record, me, now, alive, expected", CASES, ids=[c[0] for c in CASES])
def test_verdict_table(case, record, me, now, alive, expected):
    assert verdict(record, me, now, alive) == expected


def test_describe_names_the_holder_and_the_expiry():
    text = describe(lease_record({**OTHER, "job": "nexlify-train-x"}, 100.0, 60.0), "s3://b/out", now=130.0)
    assert "pid 2 on host b, started t1, Job nexlify-train-x" in text
    assert "expires in 30 s" in text and "s3://b/out" in text and "\n" not in text


# ---- a local folder: fcntl lock --------------------------------------------------------------------

HOLD_PROGRAM = """
import sys, time
from controller.lease import LocalLease
lease = LocalLease(sys.argv[1])
lease.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_local_lease_second_holder_is_refused_naming_the_first(tmp_path):
    first = LocalLease(str(tmp_path), dict(OTHER, pid=os.getpid(), token="first"))
    first.acquire()
    second = LocalLease(str(tmp_path), dict(ME, token="second"))
    with pytest.raises(LeaseHeld) as info:
        second.acquire()
    assert info.value.exit_code == 2
    assert f"pid {os.getpid()} on host b" in str(info.value) and str(tmp_path) in str(info.value)
    first.release()
    assert not (tmp_path / LEASE_KEY).exists()
    second.acquire()  # free again
    record = json.loads((tmp_path / LEASE_KEY).read_text())
    assert record["holder"]["token"] == "second"
    second.release()


def test_local_lease_of_a_killed_holder_is_taken_at_once(tmp_path):
    """kill -9 leaves the lease file (with the dead holder's identity) but not its lock: the next
    controller takes it without waiting for any expiry."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_PROGRAM, str(tmp_path)], cwd=str(REPO),
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid} "):
            LocalLease(str(tmp_path)).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert json.loads((tmp_path / LEASE_KEY).read_text())["holder"]["pid"] == proc.pid  # left behind
    lease = LocalLease(str(tmp_path))
    lease.acquire()
    assert json.loads((tmp_path / LEASE_KEY).read_text())["holder"]["pid"] == os.getpid()
    lease.release()


# ---- S3: conditional puts on the real server -------------------------------------------------------


@pytest.fixture
def store(seaweed, s3_env) -> S3Store:
    return S3Store(seaweed.bucket, s3_env)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_s3_lease_is_exclusive_until_it_expires(store):
    clock = Clock(1000.0)
    first = S3Lease(store, dict(OTHER, token="first"), ttl=60.0, clock=clock)
    first.acquire()
    first._stop.set()  # no renewals in this test: time is the test's clock
    second = S3Lease(store, dict(ME, token="second"), ttl=60.0, clock=clock)
    with pytest.raises(LeaseHeld, match="pid 2 on host b.*expires in 60 s"):
        second.acquire()
    clock.now = 1059.0
    with pytest.raises(LeaseHeld, match="expires in 1 s"):
        second.acquire()
    clock.now = 1060.0  # expired: stealable, with a conditional put on the etag read
    second.acquire()
    second._stop.set()
    assert json.loads(store.read_bytes(LEASE_KEY))["holder"]["token"] == "second"
    # the first holder's next renewal fails its If-Match: it learns it lost the lease and stops
    assert first._put(if_match=first.etag) is False
    first.lost = True
    with pytest.raises(LeaseLost, match="taken by another controller"):
        first.check()
    first.release()  # must not delete the new holder's lease
    assert json.loads(store.read_bytes(LEASE_KEY))["holder"]["token"] == "second"
    second.release()
    assert not store.exists(LEASE_KEY)


def test_s3_lease_of_a_dead_process_on_this_host_is_taken_at_once(store):
    """kill -9 of a controller on this machine: the next one need not wait for the expiry."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    clock = Clock(1000.0)
    gone = S3Lease(store, {**new_holder(), "pid": dead.pid, "token": "gone"}, ttl=60.0, clock=clock)
    gone.acquire()
    gone._stop.set()
    elsewhere = S3Lease(store, {**new_holder(), "host": "another-host", "token": "elsewhere"}, ttl=60.0, clock=clock)
    with pytest.raises(LeaseHeld):  # from another host, liveness is unknown: the expiry rules
        elsewhere.acquire()
    here = S3Lease(store, {**new_holder(), "token": "here"}, ttl=60.0, clock=clock)
    here.acquire()
    here._stop.set()
    assert json.loads(store.read_bytes(LEASE_KEY))["holder"]["token"] == "here"
    here.release()


def test_s3_conditional_create_refuses_a_second_writer(store):
    """The server honours If-None-Match: * (412 for the second create): the base of the S3 lease."""
    a = S3Lease(store, dict(OTHER, token="a"))
    b = S3Lease(store, dict(ME, token="b"))
    assert a._put(if_match=None) is True
    assert b._put(if_match=None) is False
    assert json.loads(store.read_bytes(LEASE_KEY))["holder"]["token"] == "a"
    assert b._put(if_match='"0123456789abcdef0123456789abcdef"') is False  # a stale etag
    assert a._put(if_match=a.etag) is True  # the holder renews


def test_s3_lease_renews_while_running(store):
    lease = S3Lease(store, dict(ME, token="renewing"), ttl=0.6)
    lease.acquire()
    first = json.loads(store.read_bytes(LEASE_KEY))["renewed_at"]
    time.sleep(0.9)
    assert json.loads(store.read_bytes(LEASE_KEY))["renewed_at"] > first
    lease.check()
    lease.release()
    assert not store.exists(LEASE_KEY)


def test_local_store_lease_key_is_listed_like_any_output_file(tmp_path):
    LocalLease(str(tmp_path)).acquire()
    assert LocalStore(str(tmp_path)).list() == [LEASE_KEY]
