"""The fake's container runtime: one container run = one local process in its own process group.

stdout and stderr are merged into one pipe, as a container runtime merges them into the container
log, and read line by line into a `LogBuffer` with the time each line arrived, so `pods/log` can
answer `tailLines`, `limitBytes`, `sinceSeconds`, `timestamps` and `follow`. When the main process
exits, every process left in its group is killed (a container ends with its main process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Iterator

import structlog

log = structlog.get_logger(__name__)

MAX_LOG_BYTES = 10 * 1024 * 1024  # the kubelet's default containerLogMaxSize


class LogBuffer:
    """Lines of one container run, each with its arrival time; the oldest are dropped past 10 MiB."""

    def __init__(self) -> None:
        self._lines: list[tuple[float, bytes]] = []
        self._bytes = 0
        self._partial = b""
        self._closed = False
        self._cond = threading.Condition()

    def feed(self, chunk: bytes) -> None:
        with self._cond:
            data = self._partial + chunk
            *complete, self._partial = data.split(b"\n")
            now = time.time()
            for line in complete:
                self._lines.append((now, line + b"\n"))
                self._bytes += len(line) + 1
            while self._bytes > MAX_LOG_BYTES and self._lines:
                self._bytes -= len(self._lines.pop(0)[1])
            self._cond.notify_all()

    def close(self) -> None:
        """End of output: a last line without newline is kept as it is (the kubelet does the same)."""
        with self._cond:
            if self._partial:
                self._lines.append((time.time(), self._partial))
                self._partial = b""
            self._closed = True
            self._cond.notify_all()

    @staticmethod
    def _format(entry: tuple[float, bytes], timestamps: bool) -> bytes:
        if not timestamps:
            return entry[1]
        stamp = datetime.fromtimestamp(entry[0], timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
        return stamp.encode() + b" " + entry[1]

    def text(self, *, tail_lines: int | None = None, limit_bytes: int | None = None,
             since_seconds: int | None = None, timestamps: bool = False) -> bytes:
        """The log as `pods/log` answers it without `follow`."""
        with self._cond:
            entries = list(self._lines)
            if self._partial:
                entries.append((time.time(), self._partial))
        if since_seconds is not None:
            cutoff = time.time() - since_seconds
            entries = [e for e in entries if e[0] >= cutoff]
        if tail_lines is not None:
            entries = entries[-tail_lines:] if tail_lines > 0 else []
        data = b"".join(self._format(e, timestamps) for e in entries)
        return data[:limit_bytes] if limit_bytes is not None else data

    def follow(self, *, tail_lines: int | None = None, timestamps: bool = False,
               stop: Callable[[], bool] = lambda: False) -> Iterator[bytes]:
        """Yield complete lines (the last `tail_lines` first) until the container's output ends."""
        with self._cond:
            start = len(self._lines) - tail_lines if tail_lines is not None else 0
            index = max(start, 0)
        while True:
            with self._cond:
                while index >= len(self._lines) and not self._closed and not stop():
                    self._cond.wait(0.2)
                batch = self._lines[index:]
                index += len(batch)
                done = self._closed and index >= len(self._lines)
            for entry in batch:
                yield self._format(entry, timestamps)
            if done or stop():
                return


class ContainerProcess:
    """One run of one container: start it, signal its process group, learn how it ended."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None,
                 on_exit: Callable[[], None]) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log = LogBuffer()
        self._on_exit = on_exit
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.returncode: int | None = None

    def start(self) -> None:
        """Spawn the process; OSError (missing executable, bad working dir) propagates to the caller."""
        self._process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.started_at = time.time()
        self._reader = threading.Thread(target=self._read, name=f"fake-k8s-log-{self._process.pid}", daemon=True)
        self._reader.start()
        threading.Thread(target=self._wait, name=f"fake-k8s-wait-{self._process.pid}", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self.returncode is None

    @property
    def exit_code(self) -> int | None:
        """The container's exit code: a process killed by signal N reports 128 + N, as runc does."""
        if self.returncode is None:
            return None
        return self.returncode if self.returncode >= 0 else 128 - self.returncode

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.log.feed(chunk)
        finally:
            self._process.stdout.close()
            self.log.close()

    def _wait(self) -> None:
        assert self._process is not None
        returncode = self._process.wait()
        self._signal_group(signal.SIGKILL)  # the container ends with its main process
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.finished_at = time.time()
        self.returncode = returncode
        log.debug("container_exited", argv0=self.argv[0], pid=self._process.pid, exit_code=self.exit_code)
        self._on_exit()

    def _signal_group(self, sig: int) -> None:
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def signal(self, sig: int) -> None:
        """Send `sig` to every process of the container (SIGTERM on deletion, SIGKILL after grace)."""
        if self.alive:
            self._signal_group(sig)

    def wait(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while self.alive and time.time() < deadline:
            time.sleep(0.01)
        return not self.alive
