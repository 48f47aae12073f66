"""fetch_candles against a small in-test exchange that serves the real bundled candles.

There is no network here, so this is the one place a stand-in is right: `FakeExchange` answers
`fetch_ohlcv` the way ccxt exchanges do (candles with open time >= since, at most `limit`, the
still-forming candle included), and raises real ccxt exceptions when told to.
"""

from __future__ import annotations

import gzip

import ccxt
import numpy as np
import pandas as pd
import pytest

from nexlify.data import bundled_dir, load_market, parse_utc_ms, read_candles, sha256_file, write_candles
from nexlify.data.fetch import backoff_delays, fetch_candles, fetch_many, make_client
from nexlify.errors import InputError, TemporaryError

H = 3_600_000
BTC = read_candles(bundled_dir() / "binance_BTC-USDT_1h.csv.gz")
ETH = read_candles(bundled_dir() / "binance_ETH-USDT_1h.csv.gz")


class FakeExchange:
    """Serves real candles like a ccxt exchange; counts calls; raises queued errors on given calls."""

    rateLimit = 0

    def __init__(self, candles: dict[str, pd.DataFrame], now: str, page_cap: int = 1000,
                 errors: dict[int, Exception] | None = None, list_markets: bool = True):
        self.candles = {symbol: (frame["timestamp"].to_numpy(), frame.to_numpy().tolist())
                        for symbol, frame in candles.items()}
        self.now_ms = parse_utc_ms(now)
        self.page_cap = page_cap
        self.errors = dict(errors or {})
        self.list_markets = list_markets
        self.markets: dict = {}
        self.calls: list[tuple[str, int, int]] = []

    def load_markets(self) -> dict:
        self.markets = {symbol: {"symbol": symbol} for symbol in self.candles} if self.list_markets else {}
        return self.markets

    def milliseconds(self) -> int:
        return self.now_ms

    def fetch_ohlcv(self, symbol, timeframe="1m", since=None, limit=None, params=None):
        self.calls.append((symbol, since, limit))
        error = self.errors.pop(len(self.calls), None)
        if error is not None:
            raise error
        if symbol not in self.candles:
            raise ccxt.BadSymbol(f"binance does not have market symbol {symbol}")
        stamps, rows = self.candles[symbol]
        first = int(np.searchsorted(stamps, since))
        forming = int(np.searchsorted(stamps, self.now_ms, side="right"))  # open time <= now
        page = rows[first:min(first + min(limit, self.page_cap), forming)]
        return [[int(row[0])] + row[1:] for row in page]

    def sinces(self) -> list[int]:
        return [since for _, since, _ in self.calls]


def rows_between(frame: pd.DataFrame, start: str, end: str) -> pd.DataFrame:
    ts = frame["timestamp"]
    return frame[(ts >= parse_utc_ms(start)) & (ts < parse_utc_ms(end))].reset_index(drop=True)


def no_sleep(delays: list[float]):
    return delays.append


def test_pagination_follows_the_returned_candles_and_drops_the_forming_one(tmp_path):
    # "now" is 00:30 on Jan 5th: the 00:00 candle is still forming and the exchange returns it.
    exchange = FakeExchange({"BTC/USDT": BTC}, now="2024-01-05T00:30", page_cap=300)
    path = fetch_candles("binance", "BTC/USDT", "1h", "2023-12-01", None, tmp_path, client=exchange)
    t0 = parse_utc_ms("2023-12-01")
    assert path == tmp_path / "binance_BTC-USDT_1h.csv.gz"
    assert exchange.sinces() == [t0, t0 + 300 * H, t0 + 600 * H]  # 300 + 300 + 241 candles served
    assert all(limit == 1000 for _, _, limit in exchange.calls)
    stored = read_candles(path)
    assert len(stored) == 35 * 24 and stored["timestamp"].iloc[-1] == parse_utc_ms("2024-01-04T23:00")
    pd.testing.assert_frame_equal(stored, rows_between(BTC, "2023-12-01", "2024-01-05"))
    # Same bytes as the bundled rows: the source lines are kept exactly.
    with gzip.open(path, "rt") as handle:
        lines = handle.read().splitlines()
    with gzip.open(bundled_dir() / "binance_BTC-USDT_1h.csv.gz", "rt") as handle:
        source = handle.read().splitlines()
    start = next(i for i, line in enumerate(source) if line.startswith(f"{t0},"))
    assert lines[1:] == source[start:start + 840]


def test_until_on_a_page_boundary_costs_no_extra_call(tmp_path):
    exchange = FakeExchange({"BTC/USDT": BTC}, now="2025-01-01", page_cap=300)
    fetch_candles("binance", "BTC-USDT", "1h", "2024-03-01", "2024-03-26", tmp_path, client=exchange)
    t0 = parse_utc_ms("2024-03-01")
    assert exchange.sinces() == [t0, t0 + 300 * H]  # 25 days = 600 h = exactly two pages
    assert len(read_candles(tmp_path / "binance_BTC-USDT_1h.csv.gz")) == 600


def test_second_call_fetches_only_after_the_last_cached_candle(tmp_path):
    exchange = FakeExchange({"BTC/USDT": BTC}, now="2025-01-01")
    path = fetch_candles("binance", "BTC/USDT", "1h", "2024-01-01", "2024-01-10", tmp_path, client=exchange)
    assert len(read_candles(path)) == 9 * 24 and exchange.sinces() == [parse_utc_ms("2024-01-01")]

    exchange.calls.clear()
    fetch_candles("binance", "BTC/USDT", "1h", "2024-01-01", "2024-01-20", tmp_path, client=exchange)
    assert exchange.sinces() == [parse_utc_ms("2024-01-10")]
    expected = rows_between(BTC, "2024-01-01", "2024-01-20")
    pd.testing.assert_frame_equal(read_candles(path), expected)
    assert sha256_file(path) == sha256_file(write_candles(expected, tmp_path / "expected" / path.name))

    exchange.calls.clear()
    fetch_candles("binance", "BTC/USDT", "1h", "2024-01-05", "2024-01-15", tmp_path, client=exchange)
    assert exchange.calls == []  # already cached: the exchange is not asked

    # An earlier start fills in before the first cached candle, keeping one unbroken range.
    fetch_candles("binance", "BTC/USDT", "1h", "2023-12-25", "2024-01-20", tmp_path, client=exchange)
    assert exchange.sinces() == [parse_utc_ms("2023-12-25")]
    pd.testing.assert_frame_equal(read_candles(path), rows_between(BTC, "2023-12-25", "2024-01-20"))

    market = load_market("binance", ["BTC/USDT"], data_dir=tmp_path, start="2024-01-01")
    assert market.n_bars == 19 * 24 and market.tradable.all()


def test_a_network_error_is_retried_once_with_backoff(tmp_path):
    exchange = FakeExchange({"BTC/USDT": BTC}, now="2025-01-01", page_cap=100,
                            errors={2: ccxt.NetworkError("connection reset")})
    delays: list[float] = []
    fetch_candles("binance", "BTC/USDT", "1h", "2024-06-01", "2024-06-10", tmp_path, client=exchange,
                  sleep=no_sleep(delays), backoff_s=0.5)
    t0 = parse_utc_ms("2024-06-01")
    assert delays == [0.5]
    assert exchange.sinces() == [t0, t0 + 100 * H, t0 + 100 * H, t0 + 200 * H]
    pd.testing.assert_frame_equal(read_candles(tmp_path / "binance_BTC-USDT_1h.csv.gz"),
                                  rows_between(BTC, "2024-06-01", "2024-06-10"))


def test_rate_limit_errors_back_off_exponentially_then_give_up(tmp_path):
    errors = {n: ccxt.RateLimitExceeded("429 Too Many Requests") for n in range(1, 10)}
    exchange = FakeExchange({"BTC/USDT": BTC}, now="2025-01-01", errors=errors)
    delays: list[float] = []
    with pytest.raises(TemporaryError) as info:
        fetch_candles("binance", "BTC/USDT", "1h", "2024-06-01", "2024-06-10", tmp_path, client=exchange,
                      sleep=no_sleep(delays), max_tries=4, backoff_s=1.0)
    assert delays == [1.0, 2.0, 4.0] == backoff_delays(4, 1.0)
    assert len(exchange.calls) == 4
    assert "BTC/USDT" in str(info.value) and "RateLimitExceeded" in str(info.value)
    assert not (tmp_path / "binance_BTC-USDT_1h.csv.gz").exists()


def test_backoff_is_never_shorter_than_the_exchange_rate_limit(tmp_path):
    exchange = FakeExchange({"BTC/USDT": BTC}, now="2025-01-01", errors={1: ccxt.RequestTimeout("timed out")})
    exchange.rateLimit = 2000  # ms between requests, as ccxt exchanges declare it
    delays: list[float] = []
    fetch_candles("binance", "BTC/USDT", "1h", "2024-06-01", "2024-06-02", tmp_path, client=exchange,
                  sleep=no_sleep(delays), backoff_s=0.1)
    assert delays == [2.0]


def test_unlisted_pair_is_an_input_error_naming_it(tmp_path):
    exchange = FakeExchange({"BTC/USDT": BTC, "ETH/USDT": ETH}, now="2025-01-01")
    with pytest.raises(InputError) as info:
        fetch_candles("binance", "BTC/EUR", "1h", "2024-06-01", "2024-06-02", tmp_path, client=exchange)
    assert "BTC/EUR" in str(info.value) and "BTC/USDT" in str(info.value)
    assert exchange.calls == []


def test_bad_symbol_from_fetch_ohlcv_is_an_input_error_naming_the_pair(tmp_path):
    exchange = FakeExchange({"BTC/USDT": BTC}, now="2025-01-01", list_markets=False)
    with pytest.raises(InputError) as info:
        fetch_candles("binance", "DOGE/USDT", "1h", "2024-06-01", "2024-06-02", tmp_path, client=exchange)
    assert "DOGE/USDT" in str(info.value) and "BadSymbol" in str(info.value)
    exchange = FakeExchange({"BTC/USDT": BTC}, now="2025-01-01",
                            errors={1: ccxt.ExchangeError("binance {\"code\":-1100}")})
    with pytest.raises(InputError, match="BTC/USDT"):
        fetch_candles("binance", "BTC/USDT", "1h", "2024-06-01", "2024-06-02", tmp_path, client=exchange)


def test_empty_or_inverted_ranges_are_refused(tmp_path):
    exchange = FakeExchange({"BTC/USDT": BTC}, now="2025-01-01")
    with pytest.raises(InputError, match="no 1h candles for BTC/USDT"):
        fetch_candles("binance", "BTC/USDT", "1h", "2020-01-01", "2020-02-01", tmp_path, client=exchange)
    with pytest.raises(InputError, match="since 2024-02-01 is not before"):
        fetch_candles("binance", "BTC/USDT", "1h", "2024-02-01", "2024-01-01", tmp_path, client=exchange)
    assert list(tmp_path.iterdir()) == []


def test_fetch_many_ends_every_pair_at_the_same_candle(tmp_path):
    exchange = FakeExchange({"BTC/USDT": BTC, "ETH/USDT": ETH}, now="2024-03-01T12:10")
    paths = fetch_many("binance", ["BTC/USDT", "ETH-USDT"], "1h", "2024-02-20", None, tmp_path, client=exchange)
    assert sorted(paths) == ["BTC/USDT", "ETH/USDT"]
    for pair, frame in (("BTC/USDT", BTC), ("ETH/USDT", ETH)):
        pd.testing.assert_frame_equal(read_candles(paths[pair]), rows_between(frame, "2024-02-20", "2024-03-01T12:00"))
    market = load_market("binance", ["BTC/USDT", "ETH/USDT"], data_dir=tmp_path)
    assert market.n_bars == 10 * 24 + 12 and market.end_iso == "2024-03-01T12:00:00Z"


def test_make_client_builds_a_rate_limited_ccxt_exchange():
    client = make_client("binance")
    assert isinstance(client, ccxt.binance) and client.enableRateLimit is True
    with pytest.raises(InputError, match="'nosuchexchange'"):
        make_client("nosuchexchange")


def test_cache_dir_under_a_file_is_refused_before_any_download(tmp_path):
    from nexlify.data.fetch import fetch_many

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    class NoNetwork:
        def __getattr__(self, name):
            raise AssertionError(f"the exchange was called ({name}) before the cache folder was checked")

    for cache_dir, says in ((blocker / "cache", f"{blocker} is a file"), (blocker, "is a file")):
        with pytest.raises(InputError) as info:
            fetch_many("binance", ["BTC/USDT"], "1h", "2024-01-01", "2024-01-02", cache_dir, client=NoNetwork())
        assert f"--cache-dir {cache_dir}" in str(info.value) and says in str(info.value)
    assert not (blocker / "cache").exists()
