"""Market data: candle files, their checks, gap filling, alignment and train/val/test windows.

`fetch` (ccxt) is imported on demand only: `from nexlify.data.fetch import fetch_candles`.
"""

from nexlify.data.candles import (
    COLUMNS,
    AlignedArrays,
    GapReport,
    MarketData,
    Windows,
    align,
    bundled_dir,
    candle_filename,
    fill_gaps,
    gap_report,
    load_market,
    normalize_pair,
    parse_pair,
    read_candles,
    sha256_file,
    split_windows,
    validate_candles,
    write_candles,
)
from nexlify.data.timeframes import MS_PER_DAY, MS_PER_HOUR, iso_utc, parse_utc_ms, timeframe_ms

__all__ = [
    "COLUMNS", "MS_PER_DAY", "MS_PER_HOUR", "AlignedArrays", "GapReport", "MarketData", "Windows", "align",
    "bundled_dir", "candle_filename", "fill_gaps", "gap_report", "iso_utc", "load_market", "normalize_pair",
    "parse_pair", "parse_utc_ms", "read_candles", "sha256_file", "split_windows", "timeframe_ms",
    "validate_candles", "write_candles",
]
