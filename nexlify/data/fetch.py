"""Download candles from an exchange with ccxt into an incremental cache folder.

The cache holds one file per exchange/pair/timeframe, named and formatted exactly like the bundled
sample (`binance_BTC-USDT_1h.csv.gz`), so `load_market(..., data_dir=cache_dir)` reads it. The file
name never contains a date: a later call extends the same file, asking the exchange only for the
candles after the last cached one (and before the first, when an earlier start is requested), so the
cache always covers one unbroken range. The candle still open at the time of the call is never stored.

Network trouble (ccxt.NetworkError, which includes RateLimitExceeded and timeouts) is retried with
exponential backoff and becomes a TemporaryError after `max_tries`; an exchange refusing the symbol
or the request (ccxt.BadSymbol, ccxt.ExchangeError) is an InputError naming the pair.
"""

from __future__ import annotations

import os

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ccxt
import numpy as np
import pandas as pd
import structlog

from nexlify.data.candles import (
    COLUMNS, candle_filename, normalize_pair, read_candles, validate_candles, write_candles,
)
from nexlify.data.timeframes import iso_utc, parse_utc_ms, timeframe_ms
from nexlify.errors import InputError, TemporaryError

log = structlog.get_logger(__name__)

PAGE_LIMIT = 1000
DEFAULT_MAX_TRIES = 5
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0

T = TypeVar("T")


def make_client(exchange: str) -> Any:
    """A ccxt exchange object with ccxt's own rate limiting switched on."""
    name = str(exchange).strip().lower()
    factory = getattr(ccxt, name, None) if name in getattr(ccxt, "exchanges", []) else None
    if factory is None:
        raise InputError(f"unknown exchange {exchange!r}; accepted: a ccxt exchange id such as binance, "
                         "coinbase, kraken, okx (see ccxt.exchanges)")
    return factory({"enableRateLimit": True})


def backoff_delays(max_tries: int, backoff_s: float, cap_s: float = MAX_BACKOFF_S) -> list[float]:
    """Seconds to wait after failed try 1, 2, ...: backoff_s * 2**k, capped (max_tries - 1 waits)."""
    return [min(backoff_s * (2 ** k), cap_s) for k in range(max(max_tries - 1, 0))]


def call_with_retry(
    action: Callable[[], T],
    what: str,
    *,
    max_tries: int = DEFAULT_MAX_TRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `action`, retrying ccxt.NetworkError (and RateLimitExceeded, a subclass) with backoff.

    After `max_tries` failures raises TemporaryError naming `what` and the last error. Other
    exceptions pass through unchanged (the caller decides what they mean).
    """
    delays = backoff_delays(max_tries, backoff_s)
    for attempt in range(1, max_tries + 1):
        try:
            return action()
        except ccxt.NetworkError as exc:  # RateLimitExceeded, RequestTimeout, ExchangeNotAvailable, ...
            if attempt >= max_tries:
                raise TemporaryError(f"{what} failed {max_tries} times; last error "
                                     f"{type(exc).__name__}: {exc}") from exc
            delay = delays[attempt - 1]
            log.warning("exchange_retry", what=what, attempt=attempt, delay_s=delay, error=type(exc).__name__)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _now_ms(client: Any) -> int:
    """The exchange object's clock (ccxt's `milliseconds()`), else this machine's."""
    clock = getattr(client, "milliseconds", None)
    return int(clock()) if callable(clock) else int(time.time() * 1000)


def _check_symbol(client: Any, exchange: str, symbol: str, retry: dict) -> None:
    """InputError if the exchange's market list is known and lacks the symbol."""
    markets = getattr(client, "markets", None)
    if not markets and callable(getattr(client, "load_markets", None)):
        try:
            markets = call_with_retry(client.load_markets, f"{exchange} load_markets", **retry)
        except ccxt.ExchangeError as exc:
            raise InputError(f"{exchange} refused to list its markets: {exc}") from exc
    if markets and symbol not in markets:
        base = symbol.split("/")[0]
        similar = sorted(s for s in markets if str(s).split("/")[0] == base)[:12]
        hint = f"; {base} markets there: {', '.join(similar)}" if similar else ""
        raise InputError(f"pair {symbol} is not listed on {exchange}{hint}; accepted: a symbol of "
                         f"{exchange}'s spot markets such as BTC/USDT")


def _fetch_range(
    client: Any, exchange: str, symbol: str, timeframe: str, start_ms: int, end_ms: int, retry: dict,
) -> pd.DataFrame:
    """Every candle with start_ms <= open time < end_ms, page by page (`limit=1000` each).

    The next page starts one timeframe after the last candle received, so pages never overlap and
    a page shorter than asked (the exchange's own cap) is no reason to stop; an empty page, or
    one that does not move forward, ends the range.
    """
    tf_ms = timeframe_ms(timeframe)
    pages: list[np.ndarray] = []
    cursor = start_ms
    while cursor < end_ms:
        since = cursor

        def page() -> list:
            return client.fetch_ohlcv(symbol, timeframe, since=since, limit=PAGE_LIMIT)

        try:
            rows = call_with_retry(page, f"{exchange} fetch_ohlcv {symbol} {timeframe} since {iso_utc(since)}",
                                   **retry)
        except ccxt.ExchangeError as exc:  # BadSymbol, BadRequest, PermissionDenied, ...
            raise InputError(f"{exchange} refused candles for {symbol} {timeframe} since {iso_utc(since)}: "
                             f"{type(exc).__name__}: {exc}; accepted: a pair and timeframe the exchange lists") from exc
        if not rows:
            break
        block = np.asarray([row[:6] for row in rows], dtype=np.float64)  # a None field becomes NaN
        last_open = int(block[:, 0].max())
        pages.append(block[(block[:, 0] >= start_ms) & (block[:, 0] < end_ms)])
        if last_open < since:
            break  # the exchange went backwards: nothing newer to get
        cursor = last_open + tf_ms
    if not pages:
        return pd.DataFrame({col: np.array([], dtype=np.int64 if col == "timestamp" else np.float64)
                             for col in COLUMNS})
    data = np.concatenate(pages)
    frame = pd.DataFrame({"timestamp": data[:, 0].astype(np.int64)})
    for j, column in enumerate(COLUMNS[1:], start=1):
        frame[column] = data[:, j]
    return frame


def fetch_candles(
    exchange: str,
    pair: str,
    timeframe: str,
    since: str,
    until: str | None,
    cache_dir: str | Path,
    *,
    client: Any = None,
    max_tries: int = DEFAULT_MAX_TRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Bring the cache file of exchange/pair/timeframe up to [since, until) and return its path.

    `since`/`until` are ISO dates or datetimes (UTC); `until` is exclusive and None means "up to
    the last closed candle now". Only candles missing from the cache are requested; the merge
    dedupes by timestamp (the cached row wins) and sorts. `client` replaces the ccxt exchange
    object (anything with `fetch_ohlcv`, `rateLimit` and `markets`/`load_markets`).
    """
    tf_ms = timeframe_ms(timeframe)
    symbol = normalize_pair(pair)
    path = Path(cache_dir) / candle_filename(exchange, symbol, timeframe)
    client = make_client(exchange) if client is None else client
    # Waiting less than the exchange's own pace between retries would only earn another refusal.
    backoff_s = max(backoff_s, float(getattr(client, "rateLimit", 0) or 0) / 1000.0)
    retry = {"max_tries": max_tries, "backoff_s": backoff_s, "sleep": sleep}

    since_ms = -(-parse_utc_ms(since, "since") // tf_ms) * tf_ms  # first grid bar at or after since
    open_bar = _now_ms(client) // tf_ms * tf_ms  # the candle still forming now: never stored
    until_ms = open_bar if until is None else min(parse_utc_ms(until, "until"), open_bar)
    if since_ms >= until_ms:
        raise InputError(f"nothing to fetch for {symbol} on {exchange} {timeframe}: since {since} is not before "
                         f"until {until or 'now'} ({iso_utc(until_ms)}, the open time of the candle still forming "
                         "or the until given); accepted: since < until")

    cached = None
    if path.is_file():
        cached = read_candles(path)
        validate_candles(cached, str(path), tf_ms)
    ranges: list[tuple[int, int]] = []
    if cached is None or cached.empty:
        ranges.append((since_ms, until_ms))
    else:
        first, last = int(cached["timestamp"].iloc[0]), int(cached["timestamp"].iloc[-1])
        if since_ms < first:
            ranges.append((since_ms, first))
        if last + tf_ms < until_ms:
            ranges.append((last + tf_ms, until_ms))
    if not ranges:
        log.info("candles_cache_fresh", exchange=exchange, pair=symbol, timeframe=timeframe, file=str(path))
        return path

    _check_symbol(client, exchange, symbol, retry)
    fetched = [_fetch_range(client, exchange, symbol, timeframe, lo, hi, retry) for lo, hi in ranges]
    new_rows = sum(len(f) for f in fetched)
    if cached is None and new_rows == 0:
        raise InputError(f"{exchange} has no {timeframe} candles for {symbol} in [{iso_utc(since_ms)}, "
                         f"{iso_utc(until_ms)}); accepted: a range after the pair's listing date")
    merged = pd.concat(([cached] if cached is not None else []) + fetched, ignore_index=True)
    merged = merged.drop_duplicates(subset="timestamp", keep="first").sort_values("timestamp", kind="stable")
    merged = merged.reset_index(drop=True)
    validate_candles(merged, f"{exchange} {symbol} {timeframe} candles (fetched into {path})", tf_ms)
    if new_rows:
        write_candles(merged, path)
    log.info("candles_fetched", exchange=exchange, pair=symbol, timeframe=timeframe, new_rows=new_rows,
             rows=len(merged), first=iso_utc(int(merged["timestamp"].iloc[0])),
             last=iso_utc(int(merged["timestamp"].iloc[-1])), file=str(path))
    return path


def check_cache_dir(cache_dir: str | Path) -> Path:
    """The cache folder exists and is writable, or can be created: InputError naming it otherwise (a file
    where the folder or one of its parents should be, no permission). Creates nothing."""
    folder = Path(cache_dir).expanduser().absolute()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == folder else f"cannot be created: {probe} is a file"
        raise InputError(f"--cache-dir {cache_dir} {where}; accepted: a folder (existing or creatable)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"--cache-dir {cache_dir}: {probe} is not writable; accepted: a folder you may write to")
    return folder


def fetch_many(
    exchange: str,
    pairs: list[str],
    timeframe: str,
    since: str,
    until: str | None,
    cache_dir: str | Path,
    *,
    client: Any = None,
    **options: Any,
) -> dict[str, Path]:
    """`fetch_candles` for each pair with one shared exchange object; {"BTC/USDT": path, ...}.

    The same `until` is resolved once, so every pair ends at the same candle even if the clock
    crosses a candle boundary while the pairs download.
    """
    names = [normalize_pair(p) for p in pairs]
    if not names:
        raise InputError("no pairs to fetch; accepted: one or more pairs such as BTC/USDT")
    check_cache_dir(cache_dir)  # before any download: a bad folder must not cost a fetch
    client = make_client(exchange) if client is None else client
    if until is None:
        tf_ms = timeframe_ms(timeframe)
        until = iso_utc(_now_ms(client) // tf_ms * tf_ms)
    return {pair: fetch_candles(exchange, pair, timeframe, since, until, cache_dir, client=client, **options)
            for pair in names}


def fetch_second_venue(
    exchange: str,
    quote: str,
    pairs: list[str],
    timeframe: str,
    since: str,
    until: str | None,
    cache_dir: str | Path,
    *,
    client: Any = None,
    **options: Any,
) -> dict[str, Path]:
    """The arbitrage strategy's second venue: the same coins as `pairs` quoted in `quote` on `exchange`
    (BTC/USDT -> BTC/USD on coinbase), fetched into the same cache folder, where `load_market` and
    `nexlify.data.second_venue` find them ({"BTC/USD": path, ...})."""
    from nexlify.data.second_venue import second_venue_pair

    symbols = [second_venue_pair(pair, quote) for pair in pairs]
    return fetch_many(exchange, symbols, timeframe, since, until, cache_dir, client=client, **options)
