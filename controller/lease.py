"""One writer per output: a lease named `pipeline.lease` in the output, taken by every command that writes
there (`nexlify train`, `backtest`, `report`, paper trading) through `acquire_output_lease`.

The rule is written once, in `verdict`, a pure function of the lease record found, who asks, the time,
and what the backend knows about the holder's liveness. The backends only read and write the record
atomically:

- a local folder: an exclusive `fcntl.flock` on the lease file, held for the life of the controller. The
  kernel drops it when the process dies (even by kill -9), so the OS answers "is the holder alive?"
  (`alive=True` while someone else holds the flock, `False` once it is free) and expiry is not needed.
- S3: a lease object created with a conditional put (`If-None-Match: *`), renewed and stolen with
  `If-Match: <etag>`, so two controllers can never both believe they hold it. SeaweedFS (the tests'
  real server, 4.x) and AWS S3 honour both headers: a second create or a stale-etag put answers 412
  PreconditionFailed. The holder renews it every ttl/3; another controller may take it only once it
  has expired. A restarted pod of the same controller Job (parallelism 1, podReplacementPolicy
  Failed: the old pod has ended before the new one starts) takes it over at once, and so does a
  controller on the host of a holder whose process is gone (kill -9 on a laptop).

A controller that finds the lease held exits 2 naming the holder (host, pid, start time, Job).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import structlog

from nexlify.errors import NexlifyError

log = structlog.get_logger("nexlify.lease")

LEASE_KEY = "pipeline.lease"
DEFAULT_TTL_S = 60.0  # an S3 lease not renewed for this long may be taken by another controller

FREE, MINE, HELD, STEALABLE = "free", "mine", "held", "stealable"


class LeaseHeld(NexlifyError):
    """Another live controller holds the output. Exit code 2: nothing was written, start it elsewhere."""

    exit_code = 2


class LeaseLost(NexlifyError):
    """This controller's lease was taken over (it was not renewed in time): stop before writing more."""


def new_holder(job: str | None = None, command: str = "train") -> dict:
    """Who this controller is: host, pid, start time, a random token, its Kubernetes Job if any, and the
    command that writes the output (train, backtest, report, ...)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "token": uuid.uuid4().hex, "job": job if job is not None else os.environ.get("NEXLIFY_OWNER_JOB", ""),
            "command": command}


def lease_record(holder: dict, now: float, ttl: float) -> dict:
    return {"holder": holder, "renewed_at": now, "expires_at": now + ttl}


def verdict(record: Any, me: dict, now: float, alive: bool | None = None) -> str:
    """What `me` may do with the lease `record` found at time `now` (seconds since the epoch).

    `alive`: what the backend knows of the holder's process (True: running, False: gone, None: unknown).
    FREE: no lease; MINE: this controller holds it; HELD: another live holder; STEALABLE: the holder is
    gone (dead process, expired lease, a restarted pod of the same Job) or the record is unreadable.
    """
    if record is None:
        return FREE
    if not isinstance(record, dict) or not isinstance(record.get("holder"), dict):
        return HELD if alive else STEALABLE  # unreadable: only the OS can still say someone holds it
    holder = record["holder"]
    if holder.get("token") == me.get("token"):
        return MINE
    if alive is not None:
        return HELD if alive else STEALABLE
    if me.get("job") and holder.get("job") == me.get("job"):
        return STEALABLE  # the same controller Job's previous pod: it has ended (parallelism 1)
    try:
        expires = float(record["expires_at"])
    except (KeyError, TypeError, ValueError):
        return STEALABLE
    return STEALABLE if now >= expires else HELD


def describe(record: Any, output: str, now: float | None = None) -> str:
    """The one line a second controller prints: who holds `output`."""
    holder = record.get("holder") if isinstance(record, dict) else None
    command = holder.get("command") if isinstance(holder, dict) else None
    what = "pipeline controller" if command in (None, "train") else f"`nexlify {command}`"
    if not isinstance(holder, dict):
        who = "another controller (its lease record is unreadable)"
    else:
        who = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started_at')}"
        if holder.get("job"):
            who += f", Job {holder.get('job')}"
    until = ""
    if isinstance(record, dict) and isinstance(record.get("expires_at"), (int, float)) and now is not None:
        until = f"; the lease expires in {max(0.0, record['expires_at'] - now):.0f} s unless renewed"
    return (f"output {output} is in use by another {what} ({who}){until}; wait for it to finish, "
            "or use another --output")


def _dead_on_this_host(record: Any, me: dict) -> bool | None:
    """False when the lease's holder ran on this host and its process is gone (a controller killed with -9
    on a laptop: its successor need not wait for the expiry); None (unknown) otherwise. A live process is
    not trusted over the expiry: a holder that stopped renewing has lost the lease either way."""
    holder = record.get("holder") if isinstance(record, dict) else None
    if not isinstance(holder, dict) or holder.get("host") != me.get("host") or not isinstance(holder.get("pid"), int):
        return None
    if holder["pid"] == os.getpid():
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return None
    return None


def _parse(blob: bytes) -> Any:
    try:
        return json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        return "unreadable"


# ------------------------------------------------------------------------------------- local folder


class LocalLease:
    def __init__(self, root: str, holder: dict | None = None, *, clock=time.time) -> None:
        self.path = os.path.join(root, LEASE_KEY)
        self.holder = holder or new_holder()
        self.clock = clock
        self.fd: int | None = None
        self.lost = False

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alive = False
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                alive = True
            record = _parse(os.pread(fd, 1 << 16, 0)) if os.fstat(fd).st_size else None
            decision = verdict(record, self.holder, self.clock(), alive=alive)
            if decision == HELD:
                os.close(fd)
                raise LeaseHeld(describe(record, os.path.dirname(self.path)))
            # locked: make sure the file we locked is still the one at the path (a holder releasing
            # unlinks it; a lock on the unlinked inode would guard nothing)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            blob = json.dumps(lease_record(self.holder, self.clock(), DEFAULT_TTL_S)).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, blob, 0)
            os.fsync(fd)
            self.fd = fd
            if decision == STEALABLE and record is not None:
                log.warning("lease_taken_over", output=os.path.dirname(self.path),
                            previous=record.get("holder") if isinstance(record, dict) else None)
            return
        raise LeaseHeld(f"output {os.path.dirname(self.path)}: the lease file keeps being replaced; "
                        "is another controller starting there?")

    def check(self) -> None:
        """A local flock cannot be lost while the process lives."""

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: a waiter re-checks the inode and starts afresh
        os.close(self.fd)
        self.fd = None


# ----------------------------------------------------------------------------------------------- S3


class S3Lease:
    """The lease object under the output prefix, created and replaced only by conditional puts."""

    def __init__(self, store, holder: dict | None = None, *, ttl: float = DEFAULT_TTL_S, clock=time.time) -> None:
        self.store = store
        self.key = store._object_key(LEASE_KEY)
        self.holder = holder or new_holder()
        self.ttl = ttl
        self.clock = clock
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _get(self) -> tuple[Any, str | None]:
        from botocore.exceptions import ClientError

        try:
            with self.store._errors("reading", self.store.url(LEASE_KEY)):
                response = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key)
                return _parse(response["Body"].read()), response.get("ETag")
        except FileNotFoundError:
            return None, None
        except ClientError:  # pragma: no cover - translated above
            raise

    def _put(self, *, if_match: str | None) -> bool:
        """Conditional put of our record; False when the condition failed (412: someone else wrote first)."""
        from botocore.exceptions import ClientError

        blob = json.dumps(lease_record(self.holder, self.clock(), self.ttl)).encode()
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        try:
            response = self.store.client.put_object(Bucket=self.store.bucket, Key=self.key, Body=blob, **condition)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            with self.store._errors("writing", self.store.url(LEASE_KEY)):
                raise
        self.etag = response.get("ETag")
        return True

    def acquire(self) -> None:
        for _ in range(10):
            record, etag = self._get()
            decision = verdict(record, self.holder, self.clock(), alive=_dead_on_this_host(record, self.holder))
            if decision == HELD:
                raise LeaseHeld(describe(record, self.store.root_url, self.clock()))
            if self._put(if_match=etag if record is not None else None):
                if decision == STEALABLE:
                    log.warning("lease_taken_over", output=self.store.root_url,
                                previous=record.get("holder") if isinstance(record, dict) else None)
                self._thread = threading.Thread(target=self._renew_loop, name="nexlify-lease", daemon=True)
                self._thread.start()
                return
        raise LeaseHeld(f"output {self.store.root_url}: the lease keeps changing hands; is another controller "
                        "starting there?")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._put(if_match=self.etag):
                    self.lost = True
                    log.error("lease_lost", output=self.store.root_url)
                    return
            except NexlifyError as exc:  # a temporary S3 error: try again at the next tick
                log.warning("lease_renew_failed", error=str(exc))

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"the lease on {self.store.root_url} was taken by another controller (not renewed "
                            f"within {self.ttl:.0f} s); this controller stops")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.etag is None or self.lost:
            return
        record, etag = self._get()
        if etag == self.etag and verdict(record, self.holder, self.clock()) == MINE:
            with contextlib.suppress(NexlifyError, FileNotFoundError):
                self.store.delete(LEASE_KEY)
        self.etag = None


@contextlib.contextmanager
def acquire_output_lease(store, *, command: str):
    """Hold `store`'s output lease while the block writes there: every command that writes an output
    (train, backtest, report, paper trading) takes this one lease, so two writers never meet; a second
    one gets LeaseHeld (exit 2) naming the holder and its command. Released on every exit path (a
    process killed with -9 loses its flock at once; an S3 lease expires)."""
    lease = open_lease(store, new_holder(command=command))
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


def open_lease(store, holder: dict | None = None):
    """The lease backend for a store: a file lock in a folder, a conditional-put lease in a bucket."""
    from controller.stores.s3 import S3Store

    if isinstance(store, S3Store):
        return S3Lease(store, holder)
    return LocalLease(store.root, holder)
