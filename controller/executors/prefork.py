"""A warm launcher for worker processes: one child that has already imported what a worker imports (torch,
numba, pandas, the trainer: about 5 s of a fresh process's start) forks each worker from itself, so a run
starts in a fraction of a second instead of importing everything again.

The launcher is started with the executor, before the first run is due, so its imports overlap the
controller's own start. It runs `python -m controller.executors.prefork FD`: FD is its end of a
SOCK_SEQPACKET socket pair, one message per request or answer:

    controller -> launcher  {"argv": [...], "main": "module:function"}, with the write end of the
                            worker's stderr pipe attached (SCM_RIGHTS)
    launcher -> controller  {"ready": true} once its imports are done ({"ready": false, "error": ...}
                            if they failed: the executor then starts plain processes)
                            {"spawned": PID} after each fork, in the order of the requests
                            {"exited": PID, "code": CODE} when a worker ends (CODE as subprocess's
                            returncode: -N for signal N)

A forked worker runs `controller.cli.main(argv)` as `python -m controller ARGV` would (or another
module's `main(argv)` as `python -m module ARGV` would: the report's evaluation of the final model): a
session of its own, stdin and stdout on /dev/null, stderr on its pipe, SIGTERM when the launcher dies
(PDEATHSIG), and on exit the interpreter's own shutdown (threads joined, atexit handlers run, streams
flushed). The launcher itself gets SIGTERM when the controller dies. It starts no thread of its own (the
one OpenBLAS starts when numpy is imported handles a fork itself), runs no torch operation and touches no
GPU (on a machine with one there is no launcher: see supported()), so forking it is safe.

Workers are then the controller's grandchildren: the executor learns their ends from the launcher's
messages (ForkedWorker below stands in for subprocess.Popen), and signals them by pid.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

# What a worker imports: its own modules before its first line, then on the way (torch.optim's optimizers
# import torch._dynamo when the first one is made: 1.1 s with the bytecode cached; the TensorBoard writer)
PRELOAD = ("controller.worker", "controller.cli", "torch._dynamo", "tensorboardX", "nexlify.report.final_model")
WORKER_MAIN = "controller.cli:main"  # `python -m controller`
MESSAGE_BYTES = 1 << 20  # one request: a worker's argv (a few hundred bytes)
READY_TIMEOUT_S = 120.0  # the launcher's imports: 5 s on a quiet core, much longer on a loaded machine
SPAWN_TIMEOUT_S = 30.0
REAP_EVERY_S = 0.05  # how often the launcher looks for ended workers while no request comes
PR_SET_PDEATHSIG = 1
GPU_DEVICE_NODES = ("nvidia[0-9]*", "kfd")  # NVIDIA's devices; AMD's ROCm compute device


def gpu_device_nodes(dev: str = "/dev") -> list[str]:
    """The GPU device nodes on this machine (no torch needed to look)."""
    return sorted(path for pattern in GPU_DEVICE_NODES for path in glob.glob(os.path.join(dev, pattern)))


def supported(dev: str = "/dev") -> bool:
    """fork, descriptor passing and PDEATHSIG (Linux), and no GPU: a GPU driver set up before a fork is not
    usable after it, so where a GPU may be used, each worker starts as a fresh process and inherits nothing."""
    return (sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "fork")
            and not gpu_device_nodes(dev))


def die_with_parent(parent_pid: int) -> None:
    """In a child between fork and exec (or its work): SIGTERM when its parent dies (Linux PDEATHSIG), even by
    SIGKILL. If the parent died before prctl took effect, no signal would ever come, so the child checks that
    its parent is still parent_pid and stops itself otherwise. Linux ties PDEATHSIG to the thread that forked:
    a process is started from the thread that waits for it (the executor's), which lives as long as it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


# ------------------------------------------------------------------------------------------- controller side


class ForkedWorker:
    """What the local executor uses of subprocess.Popen, for a worker the launcher forked."""

    def __init__(self, pid: int, stderr) -> None:
        self.pid = pid
        self.stderr = stderr  # the read end of the worker's stderr, text lines
        self.returncode: int | None = None
        self._ended = threading.Event()

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        assert self.returncode is not None
        return self.returncode

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class Launcher:
    """The controller's handle on the launcher process. Making one returns at once; the first spawn() waits
    for the launcher's imports. spawn() is called from one thread (the executor's); the launcher's answers
    are read on a thread of their own."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._workers: dict[int, ForkedWorker] = {}  # by pid, until the launcher says they ended
        self._spawned: list[ForkedWorker] = []  # forked, not yet handed to spawn()'s caller
        self._answer = threading.Condition()
        self._ready: bool | None = None
        self._forked = False
        self.error: str | None = None
        parent = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controller.executors.prefork", str(theirs.fileno())], env=env,
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=lambda: die_with_parent(parent))
        theirs.close()
        self._reader = threading.Thread(target=self._read, name="prefork-launcher", daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        """Not known to have failed or ended."""
        return self._ready is not False and self.process.poll() is None and self._sock.fileno() >= 0

    def busy(self) -> bool:
        """Some worker it forked has not ended yet."""
        with self._answer:
            return bool(self._workers)

    def ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Wait for the launcher's imports; False if they failed or it ended (self.error says why)."""
        with self._answer:
            self._answer.wait_for(lambda: self._ready is not None, timeout)
            if self._ready is None:
                self.error = f"the worker launcher was not ready within {timeout:g} s"
                return False
            return self._ready

    def spawn(self, argv: list[str], main: str = WORKER_MAIN) -> ForkedWorker:
        """Fork a worker running `nexlify ARGV` (the arguments after `python -m controller`), or `main(ARGV)`
        of another module ("module:function")."""
        read_fd, write_fd = os.pipe()
        self._forked = True
        try:
            with self._answer:
                if self._ready is False:
                    raise OSError(f"the worker launcher ended: {self.error}")
                try:
                    socket.send_fds(self._sock, [json.dumps({"argv": argv, "main": main}).encode()], [write_fd])
                except OSError as error:
                    raise OSError(f"the worker launcher ended: {error}") from error
                if not self._answer.wait_for(lambda: self._spawned or self._ready is False, SPAWN_TIMEOUT_S):
                    raise OSError(f"the worker launcher did not fork within {SPAWN_TIMEOUT_S:g} s")
                if not self._spawned:
                    raise OSError(f"the worker launcher ended: {self.error}")
                worker = self._spawned.pop(0)  # it may have ended already: the object has its code
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker.stderr = os.fdopen(read_fd, "r", encoding="utf-8", errors="replace")
        return worker

    def close(self) -> None:
        """End the launcher (it exits on the socket's end of file); the workers it forked are not touched.
        A launcher that forked nothing is killed: it may still be importing. Closing twice does nothing."""
        if self._sock.fileno() < 0:
            return
        if not self._forked:
            self.process.kill()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        self._sock.close()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(MESSAGE_BYTES)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            with self._answer:
                if "ready" in message:
                    self._ready = bool(message["ready"])
                    self.error = message.get("error")
                elif "spawned" in message:
                    worker = ForkedWorker(int(message["spawned"]), None)
                    self._workers[worker.pid] = worker
                    self._spawned.append(worker)
                elif "exited" in message:
                    worker = self._workers.pop(int(message["exited"]), None)
                    if worker is not None:
                        worker.ended(int(message["code"]))
                self._answer.notify_all()
        self._launcher_gone()

    def _launcher_gone(self) -> None:
        """The launcher ended (closed, or killed): its workers got SIGTERM from PDEATHSIG and may still be
        saving their resume checkpoints. Each counts as ended only once its process is gone."""
        with self._answer:
            self.error = self.error or "the worker launcher ended"
            self._ready = False
            orphans = list(self._workers.values())
            self._workers.clear()
            self._answer.notify_all()
        for worker in orphans:
            _wait_gone(worker.pid)
            worker.ended(-signal.SIGTERM)


_shared: Launcher | None = None  # shared()'s current launcher
_retired: list[Launcher] = []  # launchers shared() replaced while their workers still ran


def shared(env: dict[str, str]) -> Launcher:
    """This process's launcher for workers with environment `env`: the one already running when its
    environment is the same (the folds of a walk-forward, the pipelines of a benchmark, one after another, pay
    for the imports once), else a new one; the old one is closed once no worker of it runs (another executor's
    may). Those left are closed when the process exits."""
    global _shared
    for retired in [r for r in _retired if not r.busy()]:  # their workers have ended since
        retired.close()
        _retired.remove(retired)
    if _shared is not None and (_shared.env != env or not _shared.alive()):
        if _shared.busy():  # another executor's workers still run from it
            _retired.append(_shared)
        else:
            _shared.close()
        _shared = None
    if _shared is None:
        _shared = Launcher(env)
    return _shared


@atexit.register
def _close_shared() -> None:
    for launcher in [*_retired, _shared]:
        if launcher is not None:
            launcher.close()


def _wait_gone(pid: int) -> None:
    """Until pid (no child of ours: an orphan init reaps) no longer runs."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(REAP_EVERY_S)


# --------------------------------------------------------------------------------------------- launcher side


def _send(sock: socket.socket, message: dict) -> None:
    sock.send(json.dumps(message).encode())


def _run_worker(argv: list[str], target: str) -> int:
    """A worker's life after the fork, as `python -m module ARGV` would run it; returns its exit code
    (-SIGINT: it ended by an uncaught KeyboardInterrupt, which the interpreter turns into death by SIGINT)."""
    sys.argv = [sys.argv[0], *argv]
    code = 1
    try:
        module, function = target.split(":")
        code = int(getattr(importlib.import_module(module), function)(argv) or 0)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback on stderr, exit code 1
        traceback.print_exc()
    try:
        threading._shutdown()  # the interpreter's exit: wait for the worker's non-daemon threads
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return code


def _fork_worker(sock: socket.socket, argv: list[str], target: str, stderr_fd: int, launcher_pid: int) -> int:
    """Fork one worker; returns its pid in the launcher, never returns in the worker."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        sock.close()
        os.setsid()  # Ctrl-C on a terminal reaches the controller alone, which stops workers with SIGTERM
        die_with_parent(launcher_pid)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(stderr_fd, 2)
        os.close(null)
        os.close(stderr_fd)
        code = _run_worker(argv, target)
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
    finally:
        os._exit(code)


def serve(sock: socket.socket) -> None:
    """The launcher's loop: fork a worker per request, report each one's end, exit when the socket closes."""
    launcher_pid = os.getpid()
    try:
        for module in PRELOAD:
            importlib.import_module(module)
    except BaseException as error:  # noqa: BLE001 - the executor falls back to plain processes and says why
        _send(sock, {"ready": False, "error": f"{type(error).__name__}: {error}"})
        return
    _send(sock, {"ready": True})
    running: set[int] = set()
    while True:
        readable, _, _ = select.select([sock], [], [], REAP_EVERY_S)
        if readable:
            data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 1)
            if not data:
                break
            request = json.loads(data)
            pid = _fork_worker(sock, [str(a) for a in request["argv"]], request.get("main", WORKER_MAIN), fds[0],
                               launcher_pid)
            for fd in fds:
                os.close(fd)
            running.add(pid)
            _send(sock, {"spawned": pid})
        _reap(sock, running)
    while running:  # the controller closed the socket: let the workers it left end on their own
        _reap(sock, running, block=True)


def _reap(sock: socket.socket | None, running: set[int], block: bool = False) -> None:
    for pid in list(running):
        try:
            done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done:
            running.discard(pid)
            if sock is not None:
                try:
                    _send(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
