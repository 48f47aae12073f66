"""Error types shared by the trainer and the pipeline.

Two kinds, as in kopf: a *temporary* error may succeed when retried (a dropped connection, a
throttled S3 call, a 5xx); a *permanent* error will not, and stops the work with a message a
user can act on. Bad user input is permanent and maps to exit code 2.
"""

from __future__ import annotations


class NexlifyError(Exception):
    """Base of every error nexlify raises on purpose."""

    exit_code = 1


class PermanentError(NexlifyError):
    """Retrying will not help: stop and tell the user why."""


class InputError(PermanentError):
    """Bad input from the user (a flag, a config file, a data file).

    The message names the bad value and what is accepted. The CLI prints it on one line and exits
    with code 2, before anything is written.
    """

    exit_code = 2


class TemporaryError(NexlifyError):
    """May succeed on retry (network, throttling, a server's 5xx)."""


class NonFiniteError(PermanentError):
    """A reward, observation, loss or weight became NaN or infinite. The run stops at the first one (a
    retry would meet it again: runs are deterministic) and the message names the run, the episode, the
    quantity and the step. `details` holds the same as plain data for result.json. A worker stopped by one
    exits with code 3, which fails its Kubernetes Job at once (no retry); the pipeline then exits 1."""

    exit_code = 3

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details
