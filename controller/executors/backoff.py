"""Exponential backoff with a cap and a time budget, for calls that may fail for a while.

A caller reports each failure with `failed(error)`: it sleeps (0.5 s, 1 s, 2 s ... at most `cap`, or
what the server asked for with Retry-After) and raises TemporaryError once failures have lasted longer
than `budget` seconds without a success in between. `succeeded()` starts the next outage afresh.
Clock and sleep are injectable so the rule can be tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from nexlify.errors import TemporaryError

log = structlog.get_logger("nexlify.executor.kubernetes")


def delay_for(attempt: int, initial: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1-based): initial * 2**(attempt-1), capped;
    a server's Retry-After wins when it is longer, still within the cap."""
    delay = min(cap, initial * (2 ** max(attempt - 1, 0)))
    if retry_after is not None and retry_after > delay:
        delay = min(cap, retry_after)
    return delay


@dataclass
class Backoff:
    initial: float = 0.5
    cap: float = 30.0
    budget: float = 15 * 60.0  # seconds of consecutive failures before giving up
    what: str = "the Kubernetes API"
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    attempts: int = field(default=0, init=False)
    _first_failure: float | None = field(default=None, init=False)

    def succeeded(self) -> None:
        self.attempts = 0
        self._first_failure = None

    def failed(self, error: BaseException, *, retry_after: float | None = None, action: str = "") -> None:
        """Sleep before the next attempt, or raise TemporaryError when the budget is spent."""
        now = self.clock()
        if self._first_failure is None:
            self._first_failure = now
        self.attempts += 1
        elapsed = now - self._first_failure
        if elapsed >= self.budget:
            raise TemporaryError(
                f"{self.what} kept failing for {elapsed:.0f} s ({self.attempts} attempts) while {action or 'working'}; "
                f"last error: {error}; the run Jobs keep running: start the controller again later and it "
                "adopts them") from error
        delay = delay_for(self.attempts, self.initial, self.cap, retry_after)
        delay = min(delay, max(self.budget - elapsed, 0.0)) or min(self.initial, self.cap)
        log.warning("kubernetes_api_retry", action=action, attempt=self.attempts, delay_s=round(delay, 2),
                    error=str(error)[:300])
        self.sleep(delay)
