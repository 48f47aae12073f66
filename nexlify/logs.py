"""Logging: structlog events, JSON lines in a cluster, a readable console on a terminal.

Events are facts with fields (`run_finished run=init-2 seed=1042 val_score=12.3`), not prose. The same
events can also go to a file (the pipeline's training.log). Secrets never belong in an
event; `redact` masks values whose key looks like one, as a last line of defence.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import IO

import structlog

SECRET_WORDS = ("secret", "password", "token", "credential", "access_key")


def redact(_logger, _name, event: dict) -> dict:
    for key in list(event):
        if any(word in key.lower() for word in SECRET_WORDS):
            event[key] = "***"
    return event


class _Tee:
    """Writes each rendered line to the terminal stream and, when set, to a file. The stream is looked up
    at every write (sys.stderr unless one was given): a stream captured when logging was configured may
    be closed since (a test's capture, a redirected stderr), and a log line must never raise."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self.files: list[IO[str]] = []

    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None and not self.stream.closed else sys.stderr

    def write(self, text: str) -> None:
        self._out().write(text)
        for fh in self.files:
            fh.write(text)

    def flush(self) -> None:
        self._out().flush()
        for fh in self.files:
            fh.flush()


_tee = _Tee()


def use_json(fmt: str, stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stderr
    return fmt == "json" or (fmt == "auto" and not stream.isatty())


_json_mode = False


def json_mode() -> bool:
    """Whether the last `configure` chose JSON lines (then everything on stderr must be JSON)."""
    return _json_mode


def configure(fmt: str = "auto", level: int = logging.INFO) -> None:
    """fmt: auto (JSON unless stderr is a terminal) | console | json."""
    global _json_mode
    _tee.stream = None  # sys.stderr, looked up at every write
    _json_mode = use_json(fmt)
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    if use_json(fmt):
        processors.append(structlog.processors.dict_tracebacks)
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=_tee),
        cache_logger_on_first_use=False,
    )


def add_file(fh: IO[str]) -> None:
    """Also write every event to fh, as rendered, without terminal colours (the pipeline's training.log)."""
    _tee.files.append(_PlainFile(fh))


def remove_files() -> None:
    _tee.files.clear()


class _PlainFile:
    _ansi = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh

    def write(self, text: str) -> None:
        self.fh.write(self._ansi.sub("", text))

    def flush(self) -> None:
        self.fh.flush()
