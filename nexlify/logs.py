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

# A run's progress bar: name, share, bar, episodes done of all, time spent < time left, the last return.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} ep [{elapsed}<{remaining}{postfix}]"
# The forecast learner runs no episodes: its bar is the share of its fit's gradient steps (at most) done.
FIT_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| fit [{elapsed}<{remaining}{postfix}]"


def bar_format(algorithm: str) -> str:
    """The progress bar's format for a run of `algorithm` (AgentConfig.algorithm)."""
    return FIT_BAR_FORMAT if algorithm == "forecast" else BAR_FORMAT


SECRET_WORDS = ("secret", "password", "token", "credential", "access_key")


def redact(_logger, _name, event: dict) -> dict:
    for key in list(event):
        if any(word in key.lower() for word in SECRET_WORDS):
            event[key] = "***"
    return event


class _Tee:
    """Writes each rendered line to the terminal stream and, when set, to a file.

    On a terminal a line goes out through `tqdm.write`, which clears the progress bars, prints the line
    and draws the bars again below it: log lines and bars never share a line (without it a relayed event
    lands right after a bar's `...10.37%/s]` and both are garbled). With no bar open it is a plain write."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.files: list[IO[str]] = []
        self.around_bars = False

    def write(self, text: str) -> None:
        if getattr(self.stream, "closed", False):  # a stream swapped out under us (a test's capture): stderr now
            self.stream = sys.stderr
        if self.around_bars:
            from tqdm import tqdm

            tqdm.write(text.rstrip("\n"), file=self.stream)
        else:
            self.stream.write(text)
        for fh in self.files:
            fh.write(text)

    def flush(self) -> None:
        self.stream.flush()
        for fh in self.files:
            fh.flush()


_tee = _Tee(sys.stderr)


# The accepted `fmt` of configure (and --log-format): auto = JSON unless stderr is a terminal.
FORMATS = ("auto", "console", "json")


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
    _tee.stream = sys.stderr
    _json_mode = use_json(fmt)
    _tee.around_bars = sys.stderr.isatty()
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
        # one write per event (PrintLogger writes the line and its newline separately)
        logger_factory=structlog.WriteLoggerFactory(file=_tee),
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
