"""The utilization series of the Aave model, read from a `timestamp,utilization` CSV. Torch-free: the
controller's preflight reads it with the same function the runs use, before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import structlog

from nexlify.errors import InputError

log = structlog.get_logger("nexlify.strategies.aave")


def load_utilization_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a `timestamp,utilization` CSV (ms since the epoch, fraction in [0, 1]), strictly increasing
    in time. Returns (timestamps int64, utilization float64). Bad files raise InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"utilization CSV {str(path)!r} does not exist; accepted: a file with columns "
                         "timestamp,utilization")
    try:
        frame = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"utilization CSV {str(path)!r} cannot be read ({exc}); accepted: a CSV file with "
                         "columns timestamp,utilization") from exc
    missing = {"timestamp", "utilization"} - set(frame.columns)
    if missing or frame.empty:
        raise InputError(f"utilization CSV {str(path)!r} lacks rows or columns {sorted(missing)}; accepted: "
                         "columns timestamp (ms since the epoch, UTC) and utilization (a fraction)")
    timestamps = pd.to_numeric(frame["timestamp"], errors="coerce").to_numpy(dtype=np.float64)
    utilization = pd.to_numeric(frame["utilization"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(timestamps) | ~np.isfinite(utilization) | (utilization < 0) | (utilization > 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"utilization CSV {str(path)!r} row {row + 2} has timestamp "
                         f"{frame['timestamp'].iloc[row]!r}, utilization {frame['utilization'].iloc[row]!r}; "
                         "accepted: a whole number of ms and a fraction in [0, 1]")
    timestamps_ms = timestamps.astype(np.int64)
    if len(timestamps_ms) > 1 and not (np.diff(timestamps_ms) > 0).all():
        row = int(np.flatnonzero(np.diff(timestamps_ms) <= 0)[0]) + 1
        raise InputError(f"utilization CSV {str(path)!r} row {row + 2}: timestamp {int(timestamps_ms[row])} "
                         "does not come after the previous one; accepted: strictly increasing timestamps")
    log.info("utilization_series_loaded", path=str(path), rows=len(timestamps_ms),
             first_ms=int(timestamps_ms[0]), last_ms=int(timestamps_ms[-1]))
    return timestamps_ms, utilization
