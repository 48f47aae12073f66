"""The control loop: one thread running the kubelet and the Job controller in passes.

A pass runs after every write to the store and every container exit, and at least every `tick`
seconds (for deadlines and timers). One thread for all controllers keeps their writes ordered and
the fake deterministic enough for tests; the real cluster runs them concurrently, which a
controller under test must not depend on either way.

`wait_idle()` returns once a whole pass wrote nothing, no container runs and no retry timer is
pending: every Job is then finished, suspended or blocked (for instance unschedulable).
"""

from __future__ import annotations

import threading
import time
import traceback

import structlog

from .jobcontroller import JobController
from .kubelet import Kubelet
from .store import Store

log = structlog.get_logger(__name__)

STALL_SECONDS = 1.0  # a 0.1 s wait that took longer than this means the process was not scheduled


class ControlPlane:
    def __init__(self, store: Store, kubelet: Kubelet, jobs: JobController, tick: float) -> None:
        self.store = store
        self.kubelet = kubelet
        self.jobs = jobs
        self.tick = tick
        self.errors: list[str] = []  # tracebacks of unexpected exceptions inside a pass
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._idle_at_rv: int | None = None
        self._thread = threading.Thread(target=self._run, name="fake-k8s-control-loop", daemon=True)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _pass(self) -> bool:
        busy = self.kubelet.sync()
        busy = self.jobs.sync() or busy
        return busy or self.kubelet.running_processes() > 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            rv_before = self.store.resource_version
            try:
                busy = self._pass()
            except Exception:  # noqa: BLE001 - a bug in the fake must not kill the loop silently
                busy = True
                self.errors.append(traceback.format_exc())
                log.error("fake_control_loop_error", error=self.errors[-1])
                time.sleep(self.tick)
            rv_after = self.store.resource_version
            with self._idle:
                self._idle_at_rv = rv_after if (rv_after == rv_before and not busy) else None
                self._idle.notify_all()

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until a pass changed nothing and nothing runs; TimeoutError after `timeout` seconds.

        Time during which this thread could not run at all (a paused VM, a starved CI runner: one
        0.1 s wait lasting over a second) is not counted against `timeout`.
        """
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        with self._idle:
            while True:
                if self.errors:
                    raise RuntimeError("fake_k8s control loop failed:\n" + self.errors[-1])
                if self._idle_at_rv is not None and self._idle_at_rv == self.store.resource_version:
                    return
                now = time.monotonic()
                if now - last > STALL_SECONDS:
                    deadline += now - last
                last = now
                if now >= deadline:
                    running = self.kubelet.describe_running()
                    raise TimeoutError(f"fake_k8s cluster not idle after {timeout} s "
                                       f"({len(running)} containers running: {running})")
                self._wake.set()
                self._idle.wait(min(deadline - now, 0.1))
