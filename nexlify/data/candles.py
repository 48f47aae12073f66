"""Candle files in, aligned market arrays out.

A candle file is a gzip CSV with the header `timestamp,open,high,low,close,volume`; `timestamp` is
the candle's OPEN time in ms since the epoch (UTC) and volume is in the base coin. Files are named
`{exchange}_{BASE}-{QUOTE}_{timeframe}.csv.gz` (freqtrade's layout), e.g. `binance_BTC-USDT_1h.csv.gz`.

The path from file to training arrays, each step a function the tests can call alone:

    read_candles -> validate_candles -> fill_gaps -> align -> (crop to [start, end)) = MarketData

Gaps in real exchange data (maintenance, outages) are filled, never skipped: a missing bar becomes a
flat candle at the previous close with zero volume and `tradable=False`, so that bar i of every pair
is the same hour and no real row ever moves to another timestamp.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import structlog

from nexlify.data.timeframes import MS_PER_DAY, iso_utc, parse_utc_ms, timeframe_ms, timeframe_text
from nexlify.errors import InputError

log = structlog.get_logger(__name__)

COLUMNS: tuple[str, ...] = ("timestamp", "open", "high", "low", "close", "volume")
VALUE_COLUMNS: tuple[str, ...] = COLUMNS[1:]
HEADER = ",".join(COLUMNS)
CANDLE_SUFFIX = ".csv.gz"

PAIR_FORM = "BASE/QUOTE such as BTC/USDT (BTC-USDT is also accepted)"
_PAIR_RE = re.compile(r"^([A-Za-z0-9]+)[/-]([A-Za-z0-9]+)$")
_EXCHANGE_RE = re.compile(r"^[a-z][a-z0-9]*$")


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def parse_pair(pair: str) -> tuple[str, str]:
    """("BTC", "USDT") from "BTC/USDT" or "BTC-USDT" (case-insensitive, upper-cased)."""
    match = _PAIR_RE.match(str(pair).strip())
    if not match:
        raise InputError(f"invalid pair {pair!r}; accepted: {PAIR_FORM}")
    return match.group(1).upper(), match.group(2).upper()


def normalize_pair(pair: str) -> str:
    """The canonical spelling "BASE/QUOTE" of a pair."""
    base, quote = parse_pair(pair)
    return f"{base}/{quote}"


def fetch_hint(exchange: str, pair: str, timeframe: str, data_dir, start: str | None, end: str | None) -> str:
    """The exact command that fetches a missing pair's candles, and how to use them."""
    folder = "./data" if data_dir is None else str(data_dir)
    since = (start or "2023-06-01")[:10]
    cmd = (f"nexlify data fetch --exchange {exchange} --pairs {pair} --timeframe {timeframe} --since {since}"
           + (f" --until {end[:10]}" if end else "") + f" --cache-dir {shlex.quote(folder)}")
    if data_dir is None:
        return f"fetch them with `{cmd}`, then pass --data-dir {shlex.quote(folder)}"
    return f"fetch them with `{cmd}`"


def _check_exchange(exchange: str) -> str:
    name = str(exchange).strip().lower()
    if not _EXCHANGE_RE.match(name):
        raise InputError(f"invalid exchange {exchange!r}; accepted: a ccxt exchange id such as binance or coinbase")
    return name


def candle_filename(exchange: str, pair: str, timeframe: str) -> str:
    """File name of one exchange/pair/timeframe series: "binance_BTC-USDT_1h.csv.gz"."""
    base, quote = parse_pair(pair)
    timeframe_ms(timeframe)  # refuse a timeframe that has no grid before naming a file after it
    return f"{_check_exchange(exchange)}_{base}-{quote}_{timeframe}{CANDLE_SUFFIX}"


# A --data-dir may hold each series in any of these forms (looked for in this order): gzip CSV (what
# `nexlify data fetch` and the pipeline's snapshot write), plain CSV, or Parquet with the same columns.
# Parquet is read by pandas with the optional extra `nexlify-train[parquet]` (fastparquet, small; pyarrow
# works too when it is installed).
CANDLE_SUFFIXES = (".csv.gz", ".csv", ".parquet")


def find_candle_file(folder: Path, exchange: str, pair: str, timeframe: str) -> Path | None:
    """The file of one series in `folder`, in the first accepted format present, or None."""
    stem = candle_filename(exchange, pair, timeframe)[: -len(CANDLE_SUFFIX)]
    for suffix in CANDLE_SUFFIXES:
        path = Path(folder) / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def accepted_names(exchange: str, pair: str, timeframe: str) -> str:
    stem = candle_filename(exchange, pair, timeframe)[: -len(CANDLE_SUFFIX)]
    return " or ".join(f"{stem}{suffix}" for suffix in CANDLE_SUFFIXES)


def _present_files(folder: Path) -> str:
    """A short phrase listing the candle files in a folder, for error messages."""
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(CANDLE_SUFFIXES))
    return "present: " + (", ".join(names) if names else "no candle files") + \
        " (accepted formats: " + ", ".join(CANDLE_SUFFIXES) + ")"


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (streamed, so large files cost no memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_candles(path: str | os.PathLike) -> pd.DataFrame:
    """One candle file as a DataFrame: timestamp int64, open/high/low/close/volume float64.

    Raises InputError naming the file when it is missing (listing the files that are there), is not
    a readable gzip CSV, lacks or adds columns, or holds a value that is not a number. NaN (an empty
    field) is read as NaN and refused later by `validate_candles`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"candle file {path} not found; {_present_files(path.parent)}")
    if path.name.endswith(".parquet"):
        frame = _read_parquet(path)
    else:
        frame = _read_csv(path)
    return _typed_candles(frame, path)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except ImportError:
        raise InputError(f"candle file {path} is Parquet, which needs the optional extra: pip install "
                         "'nexlify-train[parquet]' (or convert it to .csv / .csv.gz)") from None
    except Exception as exc:  # noqa: BLE001 - the engines raise their own types for a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"candle file {path} is not a readable Parquet file ({reason}); expected the columns "
                         f"{HEADER}") from None


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, compression="gzip" if path.name.endswith(".gz") else None)
    except pd.errors.EmptyDataError:
        raise InputError(f"candle file {path} is empty; expected the header {HEADER}") from None
    except (pd.errors.ParserError, OSError, EOFError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "gzip CSV" if path.name.endswith(".gz") else "CSV"
        raise InputError(f"candle file {path} is not a readable {kind} ({reason}); "
                         f"expected the header {HEADER}") from None


def _typed_candles(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    columns = [str(c) for c in frame.columns]
    missing = [c for c in COLUMNS if c not in columns]
    extra = [c for c in columns if c not in COLUMNS]
    if missing or extra or len(columns) != len(COLUMNS):
        problems = []
        if missing:
            problems.append("missing columns " + ", ".join(missing))
        if extra:
            problems.append("extra columns " + ", ".join(extra))
        if not problems:
            problems.append("repeated columns")
        raise InputError(f"candle file {path}: {'; '.join(problems)}; expected the header {HEADER}")
    frame = frame.loc[:, list(COLUMNS)]
    if frame.empty:  # a header and no rows: typed and empty; validate_candles refuses it by name
        frame = frame.astype({col: np.int64 if col == "timestamp" else np.float64 for col in COLUMNS})
    out = {}
    for column in COLUMNS:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            coerced = pd.to_numeric(values, errors="coerce")
            bad = np.flatnonzero((coerced.isna() & values.notna()).to_numpy())
            row = int(bad[0]) if bad.size else 0
            raise InputError(f"candle file {path}: {column} value {values.iloc[row]!r} on line {row + 2} "
                             "is not a number")
        out[column] = values
    timestamps = out["timestamp"]
    if not pd.api.types.is_integer_dtype(timestamps):
        as_float = timestamps.to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(as_float) | (as_float != np.floor(as_float)))
        if bad.size:
            row = int(bad[0])
            raise InputError(f"candle file {path}: timestamp {float(timestamps.iloc[row])!r} on line {row + 2} is not "
                             "an integer number of milliseconds")
    result = pd.DataFrame({"timestamp": timestamps.to_numpy(dtype=np.int64)})
    for column in VALUE_COLUMNS:
        result[column] = out[column].to_numpy(dtype=np.float64)
    return result


def write_candles(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write candles as a reproducible gzip CSV (mtime 0, no file name in the gzip header).

    Floats are written in their shortest round-trip form, so `write_candles(read_candles(f))` gives
    back the rows of f byte for byte. The write is atomic: a temporary file in the same folder is
    renamed over the target, so a reader never sees half a file.
    """
    frame = pd.DataFrame({"timestamp": np.asarray(df["timestamp"], dtype=np.int64)})
    for column in VALUE_COLUMNS:
        frame[column] = np.asarray(df[column], dtype=np.float64)
    return write_gzip_text(frame.to_csv(index=False, lineterminator="\n"), path)


def write_gzip_text(text: str, path: str | os.PathLike) -> Path:
    """Gzip `text` into `path` reproducibly (mtime 0, empty name, level 9) and atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("ascii"))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


MIN_TIMESTAMP_MS = 1_230_768_000_000  # 2009-01-01T00:00:00Z: no crypto candle is older
MAX_TIMESTAMP_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z: beyond it, a timestamp is a unit mistake
MAX_PRICE = 1e12  # a price at or above it (or inf, 1e308) is a corrupt row: float64 arithmetic would overflow


def validate_candles(df: pd.DataFrame, source: str, timeframe_ms: int) -> None:
    """Refuse candles that would corrupt training; InputError names the source, row and rule.

    Rules: no NaN; timestamps within 2009-01-01 .. 2100-01-01, unique, strictly increasing and on the
    timeframe grid; prices > 0, finite and below 1e12; volume >= 0 and finite; high >= max(open, close);
    low <= min(open, close). The error reports the earliest offending row (its open time in ISO UTC and
    its line in the file) and the first rule it breaks.
    """
    if len(df) == 0:
        raise InputError(f"{source}: no candles (the file has a header but no rows)")
    if pd.api.types.is_integer_dtype(df["timestamp"]):
        ts = df["timestamp"].to_numpy(dtype=np.int64)
    else:  # a frame built by hand may carry NaN timestamps; compare them as floats (NaN breaks every rule)
        ts = pd.to_numeric(df["timestamp"], errors="coerce").to_numpy(dtype=np.float64)
    o, h, l, c, v = (df[col].to_numpy(dtype=np.float64) for col in VALUE_COLUMNS)
    step = np.diff(ts)
    with np.errstate(invalid="ignore"):
        rules: list[tuple[str, np.ndarray]] = [
            ("no NaN values", df.loc[:, list(COLUMNS)].isna().any(axis=1).to_numpy()),
            (f"timestamps in ms since the epoch within {iso_utc(MIN_TIMESTAMP_MS)} .. {iso_utc(MAX_TIMESTAMP_MS)}",
             (ts < MIN_TIMESTAMP_MS) | (ts >= MAX_TIMESTAMP_MS)),
            ("timestamps unique (duplicate timestamp)", np.r_[False, step == 0]),
            ("timestamps strictly increasing", np.r_[False, step < 0]),
            (f"timestamps on the {timeframe_text(timeframe_ms)} grid (a multiple of {timeframe_ms} ms)",
             ts % timeframe_ms != 0),
            ("prices > 0", (o <= 0) | (h <= 0) | (l <= 0) | (c <= 0)),
            ("prices finite and below 1e12", ~(np.abs(np.stack([o, h, l, c])) < MAX_PRICE).all(axis=0)),
            ("volume >= 0", v < 0),
            ("volume finite", np.isinf(v)),
            ("high >= max(open, close)", h < np.maximum(o, c)),
            ("low <= min(open, close)", l > np.minimum(o, c)),
        ]
    broken = np.vstack([mask for _, mask in rules])  # [rules, rows]
    any_broken = broken.any(axis=0)
    if not any_broken.any():
        return
    row = int(np.argmax(any_broken))
    rule_index = int(np.argmax(broken[:, row]))
    name = rules[rule_index][0]
    values = ", ".join(f"{col}={float(df[col].iloc[row])!r}" for col in VALUE_COLUMNS)
    hint = ""
    if np.isfinite(ts[row]) and 0 < ts[row] < 100_000_000_000:  # before 1973 in ms: likely seconds
        hint = "; the timestamps look like seconds, expected milliseconds since the epoch"
    when = iso_utc(ts[row]) if MIN_TIMESTAMP_MS <= ts[row] < MAX_TIMESTAMP_MS else f"timestamp {int(ts[row]) if np.isfinite(ts[row]) else float(ts[row])}"
    raise InputError(
        f"{source}: candle at {when} (row {row + 1}, line {row + 2}) breaks the rule '{name}' "
        f"[{values}]; {int(broken[rule_index].sum())} row(s) break this rule, "
        f"{int(any_broken.sum())} row(s) break some rule{hint}"
    )


# --------------------------------------------------------------------------------------------
# Gaps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GapReport:
    """Missing bars in a series: how many gaps, how many bars in all, the longest and where it starts.

    `longest_start` is the open time (ISO UTC) of the first missing bar of the longest gap (the
    earliest one if several are equally long), "" when there is no gap.
    """

    count: int
    missing_bars: int
    longest_bars: int
    longest_start: str

    def as_dict(self) -> dict:
        return {"count": self.count, "missing_bars": self.missing_bars,
                "longest_bars": self.longest_bars, "longest_start": self.longest_start}


NO_GAPS = GapReport(0, 0, 0, "")


def gap_report(timestamps: np.ndarray, tradable: np.ndarray) -> GapReport:
    """GapReport of a gridded series from its `tradable` mask: each run of False bars is one gap."""
    mask = np.asarray(tradable, dtype=bool)
    if mask.size == 0 or mask.all():
        return NO_GAPS
    edges = np.diff(np.r_[0, (~mask).astype(np.int8), 0])
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts
    longest = int(np.argmax(lengths))
    return GapReport(count=int(starts.size), missing_bars=int(lengths.sum()),
                     longest_bars=int(lengths[longest]),
                     longest_start=iso_utc(int(np.asarray(timestamps)[starts[longest]])))


def fill_gaps(df: pd.DataFrame, timeframe_ms: int) -> tuple[pd.DataFrame, GapReport]:
    """Put validated candles on the full grid from their first to their last bar.

    A missing bar becomes open = high = low = close = the previous bar's close, volume 0,
    `tradable=False`; real rows keep their values and timestamp (`tradable=True`). Returns the
    filled frame (columns timestamp, open, high, low, close, volume, tradable) and its GapReport.
    """
    ts = np.asarray(df["timestamp"], dtype=np.int64)
    if ts.size == 0:
        empty = pd.DataFrame({col: np.array([], dtype=np.int64 if col == "timestamp" else np.float64)
                              for col in COLUMNS})
        empty["tradable"] = np.array([], dtype=bool)
        return empty, NO_GAPS
    slot = (ts - ts[0]) // timeframe_ms  # validated: on the grid and strictly increasing
    n_bars = int(slot[-1]) + 1
    source_row = np.full(n_bars, -1, dtype=np.int64)
    source_row[slot] = np.arange(ts.size)
    real = source_row >= 0
    last_real = np.maximum.accumulate(source_row)  # slot 0 is always real, so never -1
    close = np.asarray(df["close"], dtype=np.float64)[last_real]
    filled = pd.DataFrame({"timestamp": ts[0] + np.arange(n_bars, dtype=np.int64) * timeframe_ms})
    for column in ("open", "high", "low"):
        filled[column] = np.where(real, np.asarray(df[column], dtype=np.float64)[last_real], close)
    filled["close"] = close
    filled["volume"] = np.where(real, np.asarray(df["volume"], dtype=np.float64)[last_real], 0.0)
    filled["tradable"] = real
    return filled, gap_report(filled["timestamp"].to_numpy(), real)


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


class AlignedArrays(NamedTuple):
    """Several pairs on one time axis: timestamps (T,), the rest (T, P) in the order of the pairs."""

    timestamps: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    tradable: np.ndarray


def align(frames: dict[str, pd.DataFrame], timeframe_ms: int | None = None) -> AlignedArrays:
    """Align pairs by timestamp (never by row number) over their common range.

    The common range runs from the latest first candle to the earliest last candle. Its bars are
    the full grid of `timeframe_ms` when given, else the union of the pairs' timestamps inside it.
    A pair lacking a bar is filled as in `fill_gaps` (previous close, volume 0, not tradable); a
    frame's own `tradable` column, if present, is kept.
    """
    if not frames:
        raise InputError("no pairs to align; accepted: one or more pairs such as BTC/USDT")
    stamps = {pair: np.asarray(frame["timestamp"], dtype=np.int64) for pair, frame in frames.items()}
    for pair, ts in stamps.items():
        if ts.size == 0:
            raise InputError(f"no candles for {pair} to align")
    lo = max(int(ts[0]) for ts in stamps.values())
    hi = min(int(ts[-1]) for ts in stamps.values())
    if lo > hi:
        covers = "; ".join(f"{pair} covers {iso_utc(ts[0])} .. {iso_utc(ts[-1])}" for pair, ts in stamps.items())
        raise InputError(f"the pairs have no time in common: {covers}")
    if timeframe_ms:
        grid = np.arange(lo, hi + 1, timeframe_ms, dtype=np.int64)
    else:
        grid = np.unique(np.concatenate([ts[(ts >= lo) & (ts <= hi)] for ts in stamps.values()]))
    shape = (grid.size, len(frames))
    arrays = {col: np.empty(shape, dtype=np.float64) for col in VALUE_COLUMNS}
    tradable = np.empty(shape, dtype=bool)
    for j, (pair, frame) in enumerate(frames.items()):
        ts = stamps[pair]
        row = np.searchsorted(ts, grid, side="right") - 1  # last candle at or before each bar; >= 0
        exact = ts[row] == grid
        close = np.asarray(frame["close"], dtype=np.float64)[row]
        for column in ("open", "high", "low"):
            arrays[column][:, j] = np.where(exact, np.asarray(frame[column], dtype=np.float64)[row], close)
        arrays["close"][:, j] = close
        arrays["volume"][:, j] = np.where(exact, np.asarray(frame["volume"], dtype=np.float64)[row], 0.0)
        own = np.asarray(frame["tradable"], dtype=bool)[row] if "tradable" in frame else True
        tradable[:, j] = exact & own
    return AlignedArrays(grid, arrays["open"], arrays["high"], arrays["low"], arrays["close"],
                         arrays["volume"], tradable)


# --------------------------------------------------------------------------------------------
# MarketData
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class MarketData:
    """Candles of several pairs on one hourly (or other) grid, ready for the environment.

    Row t of every array is the bar that opens at `timestamps[t]`; column p is `pairs[p]`.
    `tradable[t, p]` is False where the bar was missing on the exchange and forward-filled.
    `gaps` describe the bars held here (not the whole file); `sources` name each file read,
    its sha256 and its row count, so a run can record exactly which data it saw.
    """

    exchange: str
    pairs: list[str]
    timeframe: str
    timestamps: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    tradable: np.ndarray
    gaps: dict[str, GapReport] = field(default_factory=dict)
    sources: dict[str, dict] = field(default_factory=dict)
    # The arbitrage strategy's second venue on these bars (nexlify.data.second_venue.SecondVenue), or None.
    second_venue: Any = None

    @property
    def n_bars(self) -> int:
        return int(self.timestamps.shape[0])

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def timeframe_ms(self) -> int:
        return timeframe_ms(self.timeframe)

    @property
    def start_iso(self) -> str:
        """Open time of the first bar (inclusive start of the window)."""
        return iso_utc(int(self.timestamps[0])) if self.n_bars else ""

    @property
    def last_iso(self) -> str:
        """Open time of the last bar."""
        return iso_utc(int(self.timestamps[-1])) if self.n_bars else ""

    @property
    def end_iso(self) -> str:
        """Exclusive end of the window: the close time of the last bar.

        `load_market(..., start=md.start_iso, end=md.end_iso)` loads the same bars again.
        """
        return iso_utc(int(self.timestamps[-1]) + self.timeframe_ms) if self.n_bars else ""

    def index_of(self, ts: int | str) -> int:
        """Row of the bar that opens at `ts` (ms, or ISO text); InputError if there is no such bar."""
        ts_ms = parse_utc_ms(ts, "timestamp")
        row = int(np.searchsorted(self.timestamps, ts_ms))
        if row >= self.n_bars or int(self.timestamps[row]) != ts_ms:
            raise InputError(f"no {self.timeframe} bar opens at {iso_utc(ts_ms)}; the data has bars from "
                             f"{self.start_iso} to {self.last_iso} on the {self.timeframe} grid")
        return row

    def select(self, pairs: list[str]) -> "MarketData":
        """These bars for `pairs` only (each one of self.pairs), in the order given; before a second venue is
        attached (nexlify.data.prepare.attach_second_venue loads it for the pairs then held)."""
        if self.second_venue is not None:
            raise ValueError("select the pairs before attaching the second venue")
        cols = [self.pairs.index(p) for p in pairs]
        return replace(
            self, pairs=list(pairs), open=self.open[:, cols], high=self.high[:, cols], low=self.low[:, cols],
            close=self.close[:, cols], volume=self.volume[:, cols], tradable=self.tradable[:, cols],
            gaps={p: self.gaps[p] for p in pairs if p in self.gaps},
            sources={p: self.sources[p] for p in pairs if p in self.sources},
        )

    def slice(self, i0: int, i1: int) -> "MarketData":
        """Bars [i0, i1) as a new MarketData (arrays are views; gaps recomputed for the slice)."""
        if not 0 <= i0 < i1 <= self.n_bars:
            raise ValueError(f"slice [{i0}, {i1}) is not a non-empty range inside [0, {self.n_bars})")
        timestamps = self.timestamps[i0:i1]
        tradable = self.tradable[i0:i1]
        return replace(
            self, timestamps=timestamps, open=self.open[i0:i1], high=self.high[i0:i1], low=self.low[i0:i1],
            close=self.close[i0:i1], volume=self.volume[i0:i1], tradable=tradable,
            gaps={pair: gap_report(timestamps, tradable[:, p]) for p, pair in enumerate(self.pairs)},
            sources=dict(self.sources),
            second_venue=self.second_venue.slice(i0, i1) if self.second_venue is not None else None,
        )


def bundled_dir() -> Path:
    """Folder of the candle sample shipped inside the package."""
    return Path(str(resources.files("nexlify.data").joinpath("bundled")))


def load_market(
    exchange: str,
    pairs: list[str],
    timeframe: str = "1h",
    data_dir: str | os.PathLike | None = None,
    start: str | None = None,
    end: str | None = None,
    *,
    min_bars: int = 1,
    asked: str | None = None,
) -> MarketData:
    """Read, check, gap-fill and align the candles of `pairs`, keeping bars with start <= t < end.

    `data_dir` None reads the bundled sample. `start`/`end` are ISO dates or datetimes (UTC); `asked` names
    the window in errors when they are derived from what the user typed (a warm-up before --start).
    InputError when a pair has no file (listing the files present), a file breaks a rule, a pair
    has no candles in [start, end) (naming the range its file covers), or fewer than `min_bars`
    bars remain.
    """
    tf_ms = timeframe_ms(timeframe)
    exchange = _check_exchange(exchange)
    if isinstance(pairs, str):
        pairs = [pairs]
    names = [normalize_pair(p) for p in pairs]
    if not names:
        raise InputError(f"no pairs given; accepted: one or more pairs, each {PAIR_FORM}")
    repeated = sorted({p for p in names if names.count(p) > 1})
    if repeated:
        raise InputError(f"pair(s) given twice: {', '.join(repeated)}; accepted: each pair once")
    start_ms = parse_utc_ms(start, "start") if start is not None else None
    end_ms = parse_utc_ms(end, "end") if end is not None else None
    if start_ms is not None and end_ms is not None and start_ms >= end_ms:
        raise InputError(f"start {start} is not before end {end}; accepted: start < end (end is exclusive)")
    folder = bundled_dir() if data_dir is None else Path(data_dir)
    # the window as the user typed it (`asked`, e.g. "--start 2025-07-01"), when start / end are derived from it
    window = asked or f"[{start or 'first candle'}, {end or 'last candle'})"

    frames: dict[str, pd.DataFrame] = {}
    sources: dict[str, dict] = {}
    for pair in names:
        path = find_candle_file(folder, exchange, pair, timeframe)
        if path is None:
            where = "the bundled sample" if data_dir is None else folder
            raise InputError(f"no candles for {pair} on {exchange} {timeframe} in {where} "
                             f"(expected {accepted_names(exchange, pair, timeframe)}); {_present_files(folder)}; "
                             + fetch_hint(exchange, pair, timeframe, data_dir, start, end))
        raw = read_candles(path)
        validate_candles(raw, str(path), tf_ms)
        filled, file_gaps = fill_gaps(raw, tf_ms)
        if file_gaps.count:
            log.info("candle_gaps_filled", file=path.name, **file_gaps.as_dict())
        first, last = int(filled["timestamp"].iloc[0]), int(filled["timestamp"].iloc[-1])
        if (start_ms is not None and last < start_ms) or (end_ms is not None and first >= end_ms):
            raise InputError(f"no candles for {pair} on {exchange} {timeframe} in {window}; "
                             f"{path.name} covers {iso_utc(first)} .. {iso_utc(last)}")
        frames[pair] = filled
        sources[pair] = {"file": str(path), "sha256": sha256_file(path), "rows": int(len(raw))}

    aligned = align(frames, tf_ms)
    ts = aligned.timestamps
    i0 = 0 if start_ms is None else int(np.searchsorted(ts, start_ms, side="left"))
    i1 = ts.size if end_ms is None else int(np.searchsorted(ts, end_ms, side="left"))
    if i1 - i0 < max(min_bars, 1):
        raise InputError(
            f"only {max(i1 - i0, 0)} {timeframe} bar(s) of {', '.join(names)} on {exchange} in {window} "
            f"(the pairs share {iso_utc(ts[0])} .. {iso_utc(ts[-1])}); need at least {max(min_bars, 1)}"
        )
    tradable = aligned.tradable[i0:i1]
    market = MarketData(
        exchange=exchange, pairs=names, timeframe=timeframe, timestamps=ts[i0:i1].copy(),
        open=aligned.open[i0:i1].copy(), high=aligned.high[i0:i1].copy(), low=aligned.low[i0:i1].copy(),
        close=aligned.close[i0:i1].copy(), volume=aligned.volume[i0:i1].copy(), tradable=tradable.copy(),
        gaps={pair: gap_report(ts[i0:i1], tradable[:, p]) for p, pair in enumerate(names)},
        sources=sources,
    )
    log.info("market_loaded", exchange=exchange, pairs=names, timeframe=timeframe, bars=market.n_bars,
             start=market.start_iso, end=market.end_iso,
             missing_bars={pair: gap.missing_bars for pair, gap in market.gaps.items()})
    return market


# --------------------------------------------------------------------------------------------
# Train / validation / test windows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    """Half-open row ranges [i0, i1): train < val < test (test None when not requested)."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int] | None = None

    def as_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val),
                "test": list(self.test) if self.test else None}


def split_windows(
    data: MarketData | np.ndarray,
    val_days: int,
    test_days: int = 0,
    *,
    timeframe_ms: int | None = None,
) -> Windows:
    """Split bars by time: test = the final `test_days` days, val = the `val_days` days before it,
    train = everything earlier.

    Day boundaries are measured back from the close of the last bar in whole days of 24 h, using
    timestamps (so a hole in the rows never stretches a window). `data` is a MarketData or a sorted
    array of open times; for an array, `timeframe_ms` defaults to its smallest step.
    InputError when a window would be empty or training would be shorter than validation.
    """
    if isinstance(data, MarketData):
        ts = np.asarray(data.timestamps, dtype=np.int64)
        step = data.timeframe_ms
    else:
        ts = np.asarray(data, dtype=np.int64)
        if ts.ndim != 1:
            raise ValueError("split_windows needs a 1-D array of timestamps or a MarketData")
        step = timeframe_ms if timeframe_ms else (int(np.diff(ts).min()) if ts.size > 1 else 0)
    if int(val_days) != val_days or val_days < 1:
        raise InputError(f"val_days {val_days!r} is invalid; accepted: a whole number of days >= 1")
    if int(test_days) != test_days or test_days < 0:
        raise InputError(f"test_days {test_days!r} is invalid; accepted: a whole number of days >= 0 (0 = no test)")
    if ts.size < 2:
        raise InputError(f"{ts.size} bar(s) cannot be split into train and {val_days} validation days")
    end = int(ts[-1]) + step  # close of the last bar
    test_start = end - int(test_days) * MS_PER_DAY
    val_start = test_start - int(val_days) * MS_PER_DAY
    i_val = int(np.searchsorted(ts, val_start, side="left"))
    i_test = int(np.searchsorted(ts, test_start, side="left"))
    n = int(ts.size)
    span = f"the data covers {iso_utc(ts[0])} .. {iso_utc(end)} ({(end - int(ts[0])) / MS_PER_DAY:.2f} days)"
    if test_days and i_test >= n:
        raise InputError(f"the test window of {test_days} day(s) holds no bars; {span}")
    if i_val >= i_test:
        raise InputError(f"the validation window of {val_days} day(s) holds no bars; {span}")
    if i_val == 0 or i_val < i_test - i_val:
        raise InputError(
            f"training would have {i_val} bar(s), fewer than the {i_test - i_val} validation bar(s) "
            f"({val_days} days) - {span}; accepted: at least {2 * val_days + test_days} days of data, "
            f"or a smaller val_days/test_days"
        )
    return Windows(train=(0, i_val), val=(i_val, i_test), test=(i_test, n) if test_days else None)
