"""Rebuild the bundled candle sample (`nexlify/data/bundled/`) from the full real files.

    python -m nexlify.data.make_bundle --source ../shared/data

Rows are copied as text, byte for byte, from the source files (never re-formatted), and gzipped
with mtime 0, so running this twice gives files with the same sha256. The README written next to
them records the source, range, row count, sha256 and gaps of each file.
"""

from __future__ import annotations

import argparse
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import structlog

from nexlify.data.candles import (
    HEADER, GapReport, bundled_dir, fill_gaps, read_candles, sha256_file, validate_candles, write_gzip_text,
)
from nexlify.data.timeframes import iso_utc, parse_utc_ms, timeframe_ms

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Slice:
    """One bundled file: the source file name and the first candle open time kept (None = all)."""

    name: str
    since: str | None


SAMPLE: tuple[Slice, ...] = (
    Slice("binance_BTC-USDT_1h.csv.gz", "2023-06-01"),
    Slice("binance_ETH-USDT_1h.csv.gz", "2023-06-01"),
    Slice("binance_SOL-USDT_1h.csv.gz", "2023-06-01"),
    Slice("coinbase_BTC-USD_1h.csv.gz", None),
    Slice("coinbase_ETH-USD_1h.csv.gz", None),
    Slice("coinbase_SOL-USD_1h.csv.gz", None),
)

SOURCE_NOTE = (
    "Real exchange candles from the project's shared data folder (`../shared/data`), which gathered them "
    "from public freqtrade data folders: Binance spot from Roshan7869/algotrading "
    "(user_data/data/binance), Coinbase spot from saijayanth888/trading-bot (user_data/data/coinbase)."
)


def slice_text(source: Path, since_ms: int | None) -> str:
    """The header plus every source line whose timestamp is >= since_ms, unchanged."""
    with gzip.open(source, "rt", encoding="ascii", newline="") as handle:
        lines = handle.read().splitlines(keepends=True)
    if lines[0].strip() != HEADER:
        raise ValueError(f"{source}: header {lines[0].strip()!r} is not {HEADER!r}")
    kept = [line for line in lines[1:] if since_ms is None or int(line.split(",", 1)[0]) >= since_ms]
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    return HEADER + "\n" + "".join(kept)


def gap_text(gaps: GapReport) -> str:
    """A GapReport in one table cell."""
    if not gaps.count:
        return "none"
    return f"{gaps.count} ({gaps.missing_bars} bars, longest {gaps.longest_bars} from {gaps.longest_start})"


def file_gaps(path: Path) -> tuple[pd.DataFrame, GapReport, str]:
    """Read and check one candle file; return its rows, its gaps and the first missing bar of its latest gap."""
    candles = read_candles(path)
    tf_ms = timeframe_ms(path.name.rsplit("_", 1)[1].split(".", 1)[0])
    validate_candles(candles, str(path), tf_ms)
    filled, gaps = fill_gaps(candles, tf_ms)
    missing = filled["timestamp"].to_numpy()[~filled["tradable"].to_numpy()]
    gap_starts = missing[np.r_[True, np.diff(missing) != tf_ms]] if missing.size else missing
    return candles, gaps, iso_utc(int(gap_starts[-1])) if gap_starts.size else ""


def build(source_dir: Path, out_dir: Path) -> list[dict]:
    """Write every file of SAMPLE into out_dir and return one summary row per file."""
    rows = []
    for item in SAMPLE:
        since_ms = parse_utc_ms(item.since, "since") if item.since else None
        target = write_gzip_text(slice_text(source_dir / item.name, since_ms), out_dir / item.name)
        candles, gaps, _ = file_gaps(target)
        _, source_gaps, source_latest = file_gaps(source_dir / item.name)
        rows.append({
            "name": item.name, "first": iso_utc(int(candles["timestamp"].iloc[0])),
            "last": iso_utc(int(candles["timestamp"].iloc[-1])), "rows": len(candles),
            "sha256": sha256_file(target), "bytes": target.stat().st_size, "gaps": gaps,
            "source_gaps": source_gaps, "source_latest_gap": source_latest,
        })
    return rows


def readme_text(rows: list[dict]) -> str:
    """The bundled README: where the data came from and what each file holds."""
    lines = [
        "# Bundled candle sample",
        "",
        "The data `load_market(..., data_dir=None)` reads: real hourly OHLCV candles for offline runs and tests.",
        "",
        SOURCE_NOTE,
        "",
        "Format: gzip CSV (mtime 0, reproducible), header `timestamp,open,high,low,close,volume`; `timestamp` is",
        "the candle OPEN time in ms since the epoch, UTC; volume is in the base coin. Every row is a byte-for-byte",
        "copy of the source row. Binance files keep the candles from 2023-06-01 00:00 UTC on; Coinbase files are",
        "copied whole. Rebuild with `python -m nexlify.data.make_bundle --source ../shared/data`.",
        "",
        "| file | first candle (UTC) | last candle (UTC) | rows | gaps | sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['name']} | {row['first']} | {row['last']} | {row['rows']:,} | "
                     f"{gap_text(row['gaps'])} | `{row['sha256']}` |")
    total = sum(row["bytes"] for row in rows)
    lines += [
        "",
        f"Total size: {total:,} bytes.",
        "",
        "## Gaps",
        "",
        "A gap is a run of missing hours between a file's first and last candle; the loader forward-fills each",
        "missing bar as a flat candle at the previous close, volume 0, `tradable=False`, and never shifts a row.",
        "Gaps of the full source files (most lie before this sample starts; tests read them from ../shared/data):",
        "",
        "| source file | gaps (missing bars, longest from) | latest gap starts |",
        "|---|---|---|",
    ]
    lines += [f"| {row['name']} | {gap_text(row['source_gaps'])} | {row['source_latest_gap'] or '-'} |"
              for row in rows]
    complete = [row["name"] for row in rows if not row["source_gaps"].count]
    if complete:
        lines += ["", "No missing hour at all in: " + ", ".join(complete) + " (the shared README's \"a few hours\" "
                  "for Coinbase is not borne out by these files)."]
    lines += [
        "",
        "Coinbase quotes USD and Binance USDT: a spread between the two includes USDT/USD drift.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder of the full candle files")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the package's bundled/)")
    args = parser.parse_args(argv)
    out_dir = args.out or bundled_dir()
    rows = build(args.source, out_dir)
    (out_dir / "README.md").write_text(readme_text(rows), encoding="utf-8")
    for row in rows:
        log.info("bundled_file_written", file=row["name"], rows=row["rows"], first=row["first"],
                 last=row["last"], sha256=row["sha256"], gaps=row["gaps"].count)


if __name__ == "__main__":
    main()
