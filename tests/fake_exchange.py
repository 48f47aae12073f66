"""A local stand-in for Binance's public REST API, replaying real bundled candles under a clock the test
controls: GET /api/v3/time, /api/v3/exchangeInfo and /api/v3/klines, as ccxt's binance client calls them
(point its urls['api'] here: nexlify.paper.feed.public_client(api_url=...)). Every other path (a private
API, an order) answers 403 and is recorded in `violations`, which the tests assert empty.

The clock: `now_ms`, moved forward by `step_ms` on every request (an accelerated clock: the trader's polls
drive it), or set by the test. /klines serves, from startTime, the candles whose open is <= now, the
still-open one included with partial values (its open, and the close, high and low of its first trade:
the open), as an exchange does; the trader must drop it.

Faults, all in exchange time: `missing` {(symbol, open_ms)} never served; `late` {(symbol, open_ms): delay}
served only once now >= close + delay; `fail` a list of [path prefix, status, count(, from_ms)] answered
with that status (from that time on) before serving again; `down` [(from_ms, to_ms)]: every request in it answers 503.

Run by hand for an offline replay: python -m tests.fake_exchange --start 2025-05-20 --speed 3600.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np

from nexlify.data.candles import load_market
from nexlify.data.timeframes import parse_utc_ms

TF_MS = 3_600_000
PUBLIC = ("/api/v3/time", "/api/v3/exchangeInfo", "/api/v3/klines")


def _symbol(pair: str) -> str:
    return pair.replace("/", "")


class FakeBinance:
    def __init__(self, pairs: list[str], start: str, end: str, now_ms: int, *, step_ms: int = 0,
                 clock=None) -> None:
        market = load_market("binance", pairs, start=start, end=end)
        self.pairs = list(pairs)
        self.candles: dict[str, dict[int, list[float]]] = {}
        for j, pair in enumerate(pairs):
            rows = {}
            for t, ts in enumerate(market.timestamps):
                if market.tradable[t, j]:
                    rows[int(ts)] = [float(market.open[t, j]), float(market.high[t, j]), float(market.low[t, j]),
                                     float(market.close[t, j]), float(market.volume[t, j])]
            self.candles[_symbol(pair)] = rows
        self.now_ms = int(now_ms)
        self.step_ms = int(step_ms)
        self.clock = clock  # callable () -> ms replacing now_ms (a real-time accelerated clock)
        self.missing: set[tuple[str, int]] = set()
        self.late: dict[tuple[str, int], int] = {}
        self.fail: list[list] = []
        self.down: list[tuple[int, int]] = []
        self.violations: list[str] = []
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeBinance":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def time_ms(self) -> int:
        return int(self.clock()) if self.clock is not None else self.now_ms

    # -------------------------------------------------------------------------------------------- answers

    def answer(self, path: str, query: dict) -> tuple[int, object]:
        with self.lock:
            now = self.time_ms()
            self.now_ms += self.step_ms
            self.requests.append(path)
            if path not in PUBLIC:
                self.violations.append(path)
                return 403, {"code": -2015, "msg": "private endpoint: the paper trader must never call it"}
            if any(a <= now < b for a, b in self.down):
                return 503, "Service Unavailable"
            for rule in self.fail:
                if path.startswith(rule[0]) and rule[2] > 0 and now >= (rule[3] if len(rule) > 3 else 0):
                    rule[2] -= 1
                    return rule[1], {"code": -1003, "msg": "injected"} if rule[1] in (418, 429) else "error"
        if path == "/api/v3/time":
            return 200, {"serverTime": now}
        if path == "/api/v3/exchangeInfo":
            return 200, {"timezone": "UTC", "serverTime": now, "rateLimits": [], "exchangeFilters": [],
                         "symbols": [self._symbol_info(p) for p in self.pairs]}
        symbol = query.get("symbol", [""])[0]
        if symbol not in self.candles:
            return 400, {"code": -1121, "msg": "Invalid symbol."}
        start = int(query.get("startTime", ["0"])[0])
        limit = int(query.get("limit", ["500"])[0])
        rows = []
        for ts in sorted(self.candles[symbol]):
            if ts < start or ts > now or (symbol, ts) in self.missing:
                continue
            delay = self.late.get((symbol, ts))
            if delay is not None and now < ts + TF_MS + delay:
                continue
            o, h, lo, c, v = self.candles[symbol][ts]
            if ts + TF_MS > now:  # still open: what has traded so far
                h = lo = c = o
                v = v * 0.01
            rows.append([ts, repr(o), repr(h), repr(lo), repr(c), repr(v), ts + TF_MS - 1, "0", 0, "0", "0", "0"])
            if len(rows) >= limit:
                break
        return 200, rows

    def _symbol_info(self, pair: str) -> dict:
        base, quote = pair.split("/")
        return {"symbol": _symbol(pair), "status": "TRADING", "baseAsset": base, "baseAssetPrecision": 8,
                "quoteAsset": quote, "quotePrecision": 8, "quoteAssetPrecision": 8, "orderTypes": ["LIMIT", "MARKET"],
                "icebergAllowed": True, "ocoAllowed": True, "isSpotTradingAllowed": True,
                "isMarginTradingAllowed": False, "permissions": ["SPOT"], "permissionSets": [["SPOT"]],
                "filters": [{"filterType": "PRICE_FILTER", "minPrice": "0.01", "maxPrice": "1000000.00",
                             "tickSize": "0.01"},
                            {"filterType": "LOT_SIZE", "minQty": "0.00001", "maxQty": "9000.0", "stepSize": "0.00001"}]}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                code, body = fake.answer(url.path, parse_qs(url.query))
                data = (json.dumps(body) if not isinstance(body, str) else body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                fake.violations.append("POST " + self.path)
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_DELETE = do_PUT = do_POST

            def log_message(self, *args) -> None:
                pass

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="replay bundled Binance candles on 127.0.0.1")
    parser.add_argument("--pairs", nargs="+", default=["BTC/USDT"])
    parser.add_argument("--start", default="2025-05-20", help="exchange time when the replay starts")
    parser.add_argument("--speed", type=float, default=3600.0, help="exchange seconds per real second")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    t0, real0 = parse_utc_ms(args.start, "--start"), time.time()
    fake = FakeBinance(args.pairs, "2025-01-01", "2025-06-01", t0,
                       clock=lambda: t0 + int((time.time() - real0) * 1000.0 * args.speed))
    fake.server.server_close()
    fake.server = ThreadingHTTPServer(("127.0.0.1", args.port), fake._handler())
    print(f"replaying {' '.join(args.pairs)} from {args.start} at {args.speed:g}x on http://127.0.0.1:{args.port}",
          flush=True)
    fake.server.serve_forever()


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
