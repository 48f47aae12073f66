"""Closed candles from an exchange's public REST API, through ccxt: `load_markets`, `fetch_time` and
`fetch_ohlcv`, nothing else. The client is built without credentials and only these public calls are made:
there is no path to an order.

- A candle is closed when its open + timeframe <= the exchange's time (`fetch_time`); the still-open candle
  that fetch_ohlcv returns is dropped. This machine's clock never decides what is closed.
- Network trouble (ccxt.NetworkError: DDoSProtection for 429 and 418, ExchangeNotAvailable for a 5xx,
  RequestTimeout for 504 or a timeout) is retried with exponential backoff (nexlify.data.fetch.call_with_retry)
  and becomes a TemporaryError after the tries (the service waits and tries again later).
- A symbol the exchange does not list, or a refusal (ccxt.AuthenticationError, PermissionDenied, BadSymbol,
  any other ExchangeError) is an InputError: one line, exit 2.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ccxt
import numpy as np

from nexlify.data.fetch import PAGE_LIMIT, call_with_retry, make_client
from nexlify.data.timeframes import iso_utc, timeframe_ms
from nexlify.errors import InputError

NO_CANDLE = np.full(5, np.nan)


def public_client(exchange: str, api_url: str | None = None, *, rate_limit: bool = True) -> Any:
    """A ccxt client for the public market data only: spot markets, no currency list (a private call on
    some exchanges), no keys. `api_url` points every API of the client at one base URL (a local replay):
    the public API at <url>/api/v3 as Binance serves it, every other at <url>/<name> (a replay refuses
    those)."""
    client = make_client(exchange)
    client.enableRateLimit = rate_limit
    client.apiKey = client.secret = ""
    client.options["fetchMarkets"] = {"types": ["spot"]}
    client.options["fetchCurrencies"] = False
    client.options["defaultType"] = "spot"
    if api_url:
        base = api_url.rstrip("/")
        api = client.urls.get("api")
        if isinstance(api, dict):
            client.urls["api"] = {name: (f"{base}/api/v3" if name == "public" else f"{base}/{name}") for name in api}
        else:
            client.urls["api"] = base
    return client


class Feed:
    """The model's pairs on one exchange, closed candles only. `on_error(kind)` is told of every exchange
    error (the service counts them)."""

    def __init__(self, exchange: str, pairs: list[str], timeframe: str, *, api_url: str | None = None,
                 max_tries: int = 5, backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep,
                 on_error: Callable[[str], None] | None = None, client: Any = None) -> None:
        self.exchange = exchange
        self.pairs = list(pairs)
        self.timeframe = timeframe
        self.tf_ms = timeframe_ms(timeframe)
        self.client = client if client is not None else public_client(exchange, api_url,
                                                                      rate_limit=api_url is None)
        self.sleep = sleep
        self.max_tries = max_tries
        self.backoff_s = backoff_s
        self.on_error = on_error or (lambda kind: None)

    def _call(self, action: Callable[[], Any], what: str) -> Any:
        def counted() -> Any:
            try:
                return action()
            except ccxt.NetworkError as exc:
                self.on_error(type(exc).__name__)
                raise
        try:
            return call_with_retry(counted, f"{self.exchange} {what}", max_tries=self.max_tries,
                                   backoff_s=self.backoff_s, sleep=self.sleep)
        except ccxt.NetworkError:  # pragma: no cover - call_with_retry turns the last one into TemporaryError
            raise
        except ccxt.BaseError as exc:  # AuthenticationError, PermissionDenied, BadSymbol, ExchangeError, ...
            self.on_error(type(exc).__name__)
            raise InputError(f"{self.exchange} refused {what}: {type(exc).__name__}: {' '.join(str(exc).split())}"
                             f"; accepted: a pair and timeframe the exchange lists, no credentials needed") from None

    def check_markets(self) -> None:
        """InputError naming a pair the exchange does not list."""
        markets = self._call(self.client.load_markets, "load_markets")
        for pair in self.pairs:
            if pair not in markets:
                raise InputError(f"pair {pair} is not listed on {self.exchange}; accepted: a spot symbol of "
                                 f"{self.exchange} such as BTC/USDT")
            if self.timeframe not in (getattr(self.client, "timeframes", None) or {self.timeframe: None}):
                raise InputError(f"timeframe {self.timeframe} is not offered by {self.exchange}")

    def now_ms(self) -> int:
        """The exchange's time."""
        return int(self._call(self.client.fetch_time, "fetch_time"))

    def last_closed_open(self, now_ms: int) -> int:
        """The open of the latest candle closed at exchange time now_ms (open + timeframe <= now)."""
        return (int(now_ms) // self.tf_ms) * self.tf_ms - self.tf_ms

    def closed_candles(self, pair: str, since_ms: int, now_ms: int) -> dict[int, np.ndarray]:
        """{open ms: [open, high, low, close, volume]} of every candle of `pair` on the grid with since_ms <=
        open and open + timeframe <= now_ms, page by page; rows off the grid or not finite are left out."""
        out: dict[int, np.ndarray] = {}
        last = self.last_closed_open(now_ms)
        cursor = int(since_ms)
        while cursor <= last:
            since = cursor
            rows = self._call(lambda: self.client.fetch_ohlcv(pair, self.timeframe, since=since, limit=PAGE_LIMIT),
                              f"fetch_ohlcv {pair} {self.timeframe} since {iso_utc(since)}")
            newest = None
            for row in rows or []:
                ts = int(row[0])
                newest = ts if newest is None else max(newest, ts)
                if ts < since_ms or ts % self.tf_ms or ts + self.tf_ms > now_ms:
                    continue  # before the range, off the grid, or still open
                values = np.asarray([np.nan if v is None else float(v) for v in row[1:6]], dtype=np.float64)
                if values.shape == (5,) and np.isfinite(values).all():
                    out[ts] = values
            if newest is None or newest < since:
                break
            cursor = newest + self.tf_ms
        return out
