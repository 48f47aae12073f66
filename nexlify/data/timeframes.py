"""Time on the candle grid: timeframe strings, UTC instants as epoch milliseconds, ISO text.

Every candle timestamp in nexlify is the candle's OPEN time in milliseconds since the epoch, UTC.
These helpers are the one place that turns user text ("1h", "2024-01-01") into those integers and
back, so that every error about a bad time reads the same way.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone

from nexlify.errors import InputError

MS_PER_MINUTE = 60_000
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000

_UNIT_MS = {"m": MS_PER_MINUTE, "h": MS_PER_HOUR, "d": MS_PER_DAY, "w": 7 * MS_PER_DAY}
_TIMEFRAME_RE = re.compile(r"^([1-9][0-9]*)([mhdw])$")
TIMEFRAME_FORM = "a ccxt timeframe such as 1m, 5m, 15m, 1h, 4h, 1d or 1w"
DATETIME_FORM = "an ISO date or datetime in UTC, e.g. 2024-01-01 or 2024-01-01T12:00 (or ...Z / +00:00)"


def timeframe_ms(timeframe: str) -> int:
    """Length of one candle in milliseconds ("1h" -> 3_600_000).

    Months ("1M") are refused: they have no fixed length, so they have no grid.
    """
    match = _TIMEFRAME_RE.match(str(timeframe).strip())
    if not match:
        raise InputError(f"unknown timeframe {timeframe!r}; accepted: {TIMEFRAME_FORM}")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def timeframe_text(ms: int) -> str:
    """The inverse of `timeframe_ms` for display: 3_600_000 -> "1h" (largest whole unit)."""
    for unit in ("w", "d", "h", "m"):
        if ms > 0 and ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms} ms"


def parse_utc_ms(value: str | int | datetime | date, what: str = "time") -> int:
    """An instant as epoch milliseconds UTC.

    Accepts an ISO date ("2024-01-01" = midnight UTC), an ISO datetime (naive = UTC; an explicit
    offset or "Z" is honoured), a datetime/date object, or an int already in milliseconds.
    `what` names the value in the error ("start", "--until", ...).
    """
    if isinstance(value, bool):
        raise InputError(f"{what} {value!r} is not a time; accepted: {DATETIME_FORM}")
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        text = str(value).strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise InputError(f"{what} {value!r} is not a date; accepted: {DATETIME_FORM}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    # Integer arithmetic on the timedelta keeps milliseconds exact (no float rounding).
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def iso_utc(ms: int | float) -> str:
    """Epoch milliseconds as ISO text in UTC, e.g. "2023-03-24T13:00:00Z" (no fraction if whole seconds)."""
    try:
        ms_int = int(ms)
    except (TypeError, ValueError, OverflowError):
        return "(no timestamp)"
    if ms_int != ms:
        return "(no timestamp)"
    moment = datetime.fromtimestamp(ms_int // 1000, tz=timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if ms_int % 1000:
        text += f".{ms_int % 1000:03d}"
    return text + "Z"
