"""The second venue of cross-exchange arbitrage: its candles for the primary's pairs, on the primary's bars.

The primary exchange quotes BTC/USDT; the second venue (Coinbase by default) quotes the same coin in
another currency (BTC/USD). Its file is named like any candle file, `coinbase_BTC-USD_1h.csv.gz`, and
read with the same checks (`read_candles`, `validate_candles`).

Alignment is as-of on the primary's timestamps and never looks ahead: bar t of the primary takes the
second venue's candle that opens at the same time. A candle the second venue does not have (before its
history starts, a gap, after it ends) is NOT forward-filled: the bar is marked unavailable and arbitrage
is masked there, so no price is ever imagined. A pair whose file is missing is unavailable throughout
(logged as `second_venue_missing`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import structlog

from nexlify.data.candles import (
    MarketData, bundled_dir, candle_filename, find_candle_file, parse_pair, read_candles, sha256_file, validate_candles,
)
from nexlify.data.timeframes import timeframe_ms

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class SecondVenue:
    """OHLCV [T, N] of the second venue on the primary's bars (NaN where `available` is False)."""

    exchange: str
    quote: str
    pairs: list[str]  # the second venue's own symbols, in the primary's pair order (BTC/USD)
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    available: np.ndarray  # [T, N] bool
    sources: dict[str, dict] = field(default_factory=dict)  # primary pair -> file, sha256, rows

    def slice(self, i0: int, i1: int) -> "SecondVenue":
        return replace(self, open=self.open[i0:i1], high=self.high[i0:i1], low=self.low[i0:i1],
                       close=self.close[i0:i1], volume=self.volume[i0:i1], available=self.available[i0:i1],
                       sources=dict(self.sources))


def second_venue_pair(pair: str, quote: str) -> str:
    """The same coin on the second venue: ("BTC/USDT", "USD") -> "BTC/USD"."""
    base, _ = parse_pair(pair)
    return f"{base}/{str(quote).strip().upper()}"


def asof_rows(venue_timestamps: np.ndarray, bar_timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each bar, the row of the venue's last candle opening at or before it, and whether that candle
    opens exactly at the bar (only then is it the same hour; an older one would be a stale price)."""
    ts = np.asarray(venue_timestamps, dtype=np.int64)
    bars = np.asarray(bar_timestamps, dtype=np.int64)
    if ts.size == 0:
        return np.zeros(bars.shape, dtype=np.int64), np.zeros(bars.shape, dtype=bool)
    row = np.searchsorted(ts, bars, side="right") - 1
    safe = row.clip(min=0)
    return safe, (row >= 0) & (ts[safe] == bars)


def load_second_venue(market: MarketData, exchange: str, quote: str,
                      data_dir: str | os.PathLike | None = None) -> SecondVenue:
    """The second venue's candles for every pair of `market`, aligned as of its bars (see the module doc).
    `data_dir` None reads the bundled sample. A bad file raises InputError (as for the primary)."""
    tf_ms = timeframe_ms(market.timeframe)
    folder = bundled_dir() if data_dir is None else Path(data_dir)
    shape = (market.n_bars, market.n_pairs)
    columns = {name: np.full(shape, np.nan) for name in ("open", "high", "low", "close", "volume")}
    available = np.zeros(shape, dtype=bool)
    symbols, sources = [], {}
    for j, pair in enumerate(market.pairs):
        symbol = second_venue_pair(pair, quote)
        symbols.append(symbol)
        path = find_candle_file(folder, exchange, symbol, market.timeframe) or \
            folder / candle_filename(exchange, symbol, market.timeframe)
        if not path.is_file():
            log.warning("second_venue_missing", exchange=exchange, pair=symbol, file=str(path),
                        effect="arbitrage masked for this pair")
            continue
        frame = read_candles(path)
        validate_candles(frame, str(path), tf_ms)
        row, exact = asof_rows(frame["timestamp"].to_numpy(), market.timestamps)
        for name, values in columns.items():
            values[:, j] = np.where(exact, frame[name].to_numpy(dtype=np.float64)[row], np.nan)
        available[:, j] = exact
        sources[pair] = {"file": str(path), "sha256": sha256_file(path), "rows": int(len(frame))}
    log.info("second_venue_loaded", exchange=exchange, quote=quote, pairs=symbols,
             available_bars={p: int(available[:, j].sum()) for j, p in enumerate(market.pairs)})
    return SecondVenue(exchange=exchange, quote=str(quote).upper(), pairs=symbols, available=available,
                       sources=sources, **columns)
