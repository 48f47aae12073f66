"""`nexlify paper`: the loop that feeds closed candles to the paper trader and records what it did.

Once per poll: the exchange's time; every bar closed since the last one journaled, in order (the bars missed
while the process was down or the exchange was unreachable included), each with its candles fetched over
REST (a pair's candle missing is asked for again, with backoff, `candle_tries` times; still missing, the bar
is decided on without it: no decision for that pair, a warning and `nexlify_paper_decisions_skipped_total`).
Each bar's line goes to the journal before the next bar is looked at.

One writer per output: the pipeline's lease (controller.lease) in the output. On start, an output that
holds a session is resumed: its journal is replayed through the trader line by line and each replayed line
must equal the stored one byte for byte (a line that differs is named, exit 2), then the loop goes on from
the last bar. The journal of a session killed at any point and restarted is that of an uninterrupted one.

Operations: one JSON event per bar (`paper_bar`, with the actions and the equity); Prometheus metrics and
`/healthz` on one HTTP port (failing when the last closed candle journaled is older than one timeframe plus
`grace_s`, by the exchange's clock as last seen).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from controller.lease import open_lease
from controller.paper.journal import Journal, snapshot_key
from controller.stores import is_s3_url, open_store, read_url_bytes
from controller.stores.base import StoreKeyMissing
from nexlify import checkpoint
from nexlify.data.timeframes import iso_utc, parse_utc_ms
from nexlify.errors import InputError, TemporaryError
from nexlify.paper.feed import NO_CANDLE, Feed
from nexlify.paper.settings import PaperSettings
from nexlify.paper.trader import PaperTrader, canonical_json

log = structlog.get_logger("nexlify.paper")


class PaperMetrics:
    """The Prometheus series of one session, in their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.candle_lag = Gauge("nexlify_paper_candle_lag_seconds", "exchange time minus the close of the last "
                                "candle journaled, at the last look", registry=r)
        self.last_close = Gauge("nexlify_paper_last_candle_close_timestamp_seconds", "close time of the last "
                                "candle journaled", registry=r)
        self.equity = Gauge("nexlify_paper_equity", "simulated equity in quote currency (the book: all pairs)",
                            registry=r)
        self.pair_equity = Gauge("nexlify_paper_pair_equity", "simulated equity of one pair's portfolio",
                                 ["pair"], registry=r)
        self.drawdown = Gauge("nexlify_paper_drawdown_ratio", "the book's fall from its peak equity (0..1)",
                              registry=r)
        self.headroom = Gauge("nexlify_paper_daily_loss_headroom_ratio", "the daily loss limit less today's loss, "
                              "the tightest pair (0: new entries blocked; the limit itself at the day's start)",
                              registry=r)
        self.exposure = Gauge("nexlify_paper_exposure_ratio", "share of the book's equity held outside cash",
                              registry=r)
        self.errors = Counter("nexlify_paper_exchange_errors_total", "exchange errors by ccxt class", ["kind"],
                              registry=r)
        self.skipped = Counter("nexlify_paper_decisions_skipped_total", "pair decisions not taken: the candle "
                               "was missing after the retries", ["pair"], registry=r)
        self.bars = Counter("nexlify_paper_bars_total", "closed bars journaled by this process", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Health:
    """What /healthz answers: the last closed candle journaled is at most one timeframe plus grace old."""

    def __init__(self, tf_ms: int, grace_s: float) -> None:
        self.tf_ms, self.grace_ms = tf_ms, grace_s * 1000.0
        self.last_close_ms: int | None = None
        self.offset_ms = 0.0  # exchange clock - this machine's, at the last fetch_time
        self.lock = threading.Lock()

    def saw_time(self, exchange_ms: int) -> None:
        with self.lock:
            self.offset_ms = exchange_ms - time.time() * 1000.0

    def journaled(self, open_ms: int) -> None:
        with self.lock:
            self.last_close_ms = open_ms + self.tf_ms

    def status(self) -> tuple[bool, str]:
        with self.lock:
            if self.last_close_ms is None:
                return False, "no candle journaled yet"
            age = time.time() * 1000.0 + self.offset_ms - self.last_close_ms
            ok = age <= self.tf_ms + self.grace_ms
            return ok, f"last closed candle {iso_utc(self.last_close_ms)} is {age / 1000.0:.0f} s old"


def serve(metrics: PaperMetrics, health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """/metrics and /healthz on host:port, in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] == "/metrics":
                body, code, kind = metrics.render(), 200, CONTENT_TYPE_LATEST
            elif self.path.split("?")[0] == "/healthz":
                ok, text = health.status()
                body, code, kind = (text + "\n").encode(), 200 if ok else 503, "text/plain; charset=utf-8"
            else:
                body, code, kind = b"not found\n", 404, "text/plain; charset=utf-8"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="paper-metrics").start()
    return server


SUMMARY_KEY = "complete_training_summary.json"  # controller.pipeline's summary, in a pipeline's output


def resolve_model(url: str) -> str:
    """A checkpoint's URL: `url` itself when it names a .pt file, else the final model of the pipeline
    summary in the output `url` names (a folder or s3://bucket/prefix: the pipeline's latest model)."""
    if url.endswith(".pt"):
        return url
    try:
        summary = json.loads(read_url_bytes(url.rstrip("/") + "/" + SUMMARY_KEY))
        return str(summary["final_model_path"])
    except (StoreKeyMissing, FileNotFoundError, NotADirectoryError):
        raise InputError(f"--model {url}: neither a .pt checkpoint nor a pipeline output with {SUMMARY_KEY}; "
                         "accepted: a checkpoint .pt file (path or s3://bucket/key) or a pipeline output") from None
    except (ValueError, KeyError, TypeError):
        raise InputError(f"--model {url}: its {SUMMARY_KEY} names no final_model_path; accepted: the summary "
                         "of a finished pipeline") from None


def load_model(url: str) -> tuple[dict, bytes]:
    """The checkpoint at a path or s3:// URL and its bytes (for its sha256)."""
    try:
        data = read_url_bytes(url) if is_s3_url(url) else open(url, "rb").read()
    except (StoreKeyMissing, FileNotFoundError):
        raise InputError(f"--model {url} does not exist; accepted: a checkpoint .pt file or s3://bucket/key") from None
    except IsADirectoryError:
        raise InputError(f"--model {url} is a folder; accepted: a checkpoint .pt file") from None
    return checkpoint.load(data, name=url), data


class PaperService:
    """One session: the trader, its journal and feed, the metrics. `run()` loops until `until` (or for ever)."""

    def __init__(self, model: str, output: str, settings: PaperSettings, *, sleep=time.sleep) -> None:
        self.settings = s = settings
        self.sleep = sleep
        model = resolve_model(model)
        ckpt, data = load_model(model)
        cfg = checkpoint.train_config(ckpt, model)
        if s.initial_equity is not None:
            if not s.initial_equity > 0:
                raise InputError(f"--initial-equity {s.initial_equity}: accepted: a positive amount")
            cfg.env.initial_equity = float(s.initial_equity)
        self.model_url = model
        self.trader = PaperTrader(ckpt, cfg, checkpoint_sha256=hashlib.sha256(data).hexdigest(), device=s.device)
        self.until_ms = parse_utc_ms(s.until, "--until") if s.until else None
        self.metrics = PaperMetrics()
        self.health = Health(self.trader.tf_ms, s.grace_s)
        self.feed = Feed(cfg.data.exchange, self.trader.pairs, cfg.data.timeframe, api_url=s.exchange_url,
                         max_tries=s.max_tries, backoff_s=s.backoff_s, sleep=sleep,
                         on_error=lambda kind: self.metrics.errors.labels(kind=kind).inc())
        if s.session_per_model:  # a new model starts its own session beside the earlier ones
            output = f"{output.rstrip('/')}/{hashlib.sha256(data).hexdigest()[:16]}"
        self.output = output
        self.store = open_store(output)
        self.journal = Journal(self.store)
        self.peak = 0.0
        self.server = None
        self.lease = None

    # ---------------------------------------------------------------------------------------------- run

    def run(self) -> dict:
        s = self.settings
        self.lease = open_lease(self.store)
        self.lease.acquire()  # LeaseHeld: exit 2 naming the holder
        try:
            if s.metrics_port:
                self.server = serve(self.metrics, self.health, s.metrics_host, s.metrics_port)
            self.feed.check_markets()
            header = self.journal.read_header()
            if header is None:
                self._begin()
            else:
                self._resume(header)
            while not self._done():
                self.lease.check()
                try:
                    now = self.feed.now_ms()
                    self.health.saw_time(now)
                    self._catch_up(now)
                except TemporaryError as exc:
                    log.warning("exchange_unavailable", error=" ".join(str(exc).split()))
                    now = None
                if self._done():
                    break
                self.sleep(self._wait_s(now))
            return {"bars": self.journal.count, "last_bar": iso_utc(self.trader.last_ms),
                    "book_equity": float(self.trader.env.equity.sum())}
        finally:
            if self.server is not None:
                self.server.shutdown()
                self.server.server_close()
            self.lease.release()

    def _done(self) -> bool:
        return self.until_ms is not None and self.trader.last_ms is not None and self.trader.last_ms >= self.until_ms

    def _wait_s(self, now: int | None) -> float:
        """Until the next close (plus a second), at most poll_s."""
        if now is None:
            return self.settings.poll_s
        next_close = self.trader.last_ms + 2 * self.trader.tf_ms
        return max(0.0, min(self.settings.poll_s, (next_close - now) / 1000.0 + 1.0))

    # ------------------------------------------------------------------------------------------- begin

    def _begin(self) -> None:
        """A new session: the warm-up history up to the last closed bar, then the first decision."""
        tr = self.trader
        while True:  # the exchange may be down at the start too
            try:
                now = self.feed.now_ms()
                self.health.saw_time(now)
                last = self.feed.last_closed_open(now)
                first = last - (tr.n_warmup - 1) * tr.tf_ms
                stamps = [first + k * tr.tf_ms for k in range(tr.n_warmup)]
                rows = self._rows(stamps, now)
                if np.isnan(rows[0]).any():
                    raise TemporaryError(f"no candle at the warm-up's first bar {iso_utc(first)}")
                break
            except TemporaryError as exc:
                log.warning("exchange_unavailable", error=" ".join(str(exc).split()))
                self.sleep(self.settings.poll_s)
        header = {"exchange": tr.cfg.data.exchange, "pairs": tr.pairs, "timeframe": tr.cfg.data.timeframe,
                  "model": self.model_url, "checkpoint_sha256": tr.checkpoint_sha256,
                  "config_sha256": tr.config_sha256, "initial_equity": float(tr.cfg.env.initial_equity),
                  "hold_margin": float(tr.cfg.agent.hold_margin), "strategies": list(tr.cfg.env.strategies),
                  # simulated at the environment's modelled rates, not live on-chain figures
                  "modelled_yields": [s for s in tr.cfg.env.strategies if s in ("staking", "lp", "lending")],
                  "warmup": {"open_ms": stamps, "candles": [[None if np.isnan(r).any() else [float(x) for x in r]
                                                             for r in row] for row in rows]}}
        self.journal.write_header(header)
        log.info("paper_session_started", first_bar=iso_utc(last), pairs=tr.pairs, output=self.output)
        self._record(tr.start(stamps, rows))

    def _resume(self, header: dict) -> None:
        """An output with a session: the same model, then every stored line replayed and compared."""
        tr = self.trader
        for key in ("checkpoint_sha256", "config_sha256"):
            if header.get(key) != getattr(tr, key):
                raise InputError(f"the output holds a paper session of another model ({key} {header.get(key)}, this "
                                 f"model's {getattr(tr, key)}); accepted: the session's model, or a new --output")
        stored = self.journal.read_lines()
        snapshots = self.journal.read_snapshots()
        warm = header["warmup"]
        rows = [np.asarray([NO_CANDLE if c is None else c for c in row], dtype=np.float64) for row in warm["candles"]]
        for k, (key, data, line) in enumerate(stored):
            if k == 0:
                replayed = tr.start(list(warm["open_ms"]), rows)
            else:
                row = np.asarray([NO_CANDLE if line["candles"][p] is None else line["candles"][p] for p in tr.pairs],
                                 dtype=np.float64)
                replayed = tr.advance(int(line["open_ms"]), row)
            mine = canonical_json({**replayed, "prev_sha256": self.journal.head}) + b"\n"
            if mine != data:
                raise InputError(f"paper journal line {self.journal.url(key)} differs from its replay (damaged, or "
                                 "written by another version); accepted: the journal as nexlify wrote it")
            self.journal.head = hashlib.sha256(data).hexdigest()
            snap = snapshots.get(int(line["open_ms"]))
            if snap is not None and snap.get("journal_head") != self.journal.head:
                raise InputError(f"paper snapshot {self.journal.url(snapshot_key(line['open_ms']))} disagrees with the journal's replay; accepted: the files as nexlify wrote them")
            self._observe(replayed, count=False)
        self.journal.count = len(stored)
        if not stored:  # killed between the header and the first line
            self._record(tr.start(list(warm["open_ms"]), rows))
        log.info("paper_session_resumed", bars=len(stored), last_bar=iso_utc(tr.last_ms))

    # ------------------------------------------------------------------------------------------- bars

    def _rows(self, stamps: list[int], now: int) -> list[np.ndarray]:
        """[P, 5] per bar in `stamps` (closed at `now`): fetched; a pair's missing candle asked for again
        (candle_tries looks with backoff), then NaN (no decision for that pair)."""
        got = {p: self.feed.closed_candles(p, stamps[0], now) for p in self.trader.pairs}
        for attempt in range(1, self.settings.candle_tries):
            lacking = [p for p in self.trader.pairs if any(ts not in got[p] for ts in stamps)]
            if not lacking:
                break
            self.sleep(min(self.settings.backoff_s * 2 ** (attempt - 1), 60.0))
            for p in lacking:
                first = min(ts for ts in stamps if ts not in got[p])
                got[p].update(self.feed.closed_candles(p, first, now))
        return [np.stack([got[p].get(ts, NO_CANDLE) for p in self.trader.pairs]) for ts in stamps]

    def _catch_up(self, now: int) -> None:
        tr = self.trader
        last = self.feed.last_closed_open(now)
        if self.until_ms is not None:
            last = min(last, self.until_ms)
        stamps = list(range(tr.last_ms + tr.tf_ms, last + 1, tr.tf_ms))
        if not stamps:
            self.metrics.candle_lag.set((now - tr.last_ms - tr.tf_ms) / 1000.0)
            return
        rows = self._rows(stamps, now)
        for ts, row in zip(stamps, rows):
            self._record(tr.advance(ts, row))
        self.metrics.candle_lag.set((now - tr.last_ms - tr.tf_ms) / 1000.0)

    def _record(self, line: dict) -> None:
        self.journal.append(line)
        if self.journal.count % max(self.settings.snapshot_every, 1) == 0:
            self.journal.write_snapshot(line["open_ms"], self._snapshot(line))
        self._observe(line, count=True)

    def _snapshot(self, line: dict) -> dict:
        env = self.trader.env
        return {"open_ms": line["open_ms"], "bar": line["bar"], "lines": self.journal.count,
                "equity": line["equity"], "book_equity": line["book_equity"], "pending_action": line["action"],
                "cash": {p: float(env.cash[j]) for j, p in enumerate(self.trader.pairs)},
                "units": {p: float(env.units[j, 0]) for j, p in enumerate(self.trader.pairs)}}

    def _observe(self, line: dict, *, count: bool) -> None:
        """Metrics, health and (for a bar decided now) the bar's log event."""
        m, tr, env = self.metrics, self.trader, self.trader.env
        book = line["book_equity"]
        self.peak = max(self.peak, book)
        m.equity.set(book)
        for p, e in line["equity"].items():
            m.pair_equity.labels(pair=p).set(e)
        m.drawdown.set(1.0 - book / self.peak if self.peak > 0 else 0.0)
        limit = tr.cfg.risk.daily_loss_limit
        if limit > 0:
            loss = (1.0 - env.equity / env.day_start_equity).clamp(min=0.0)
            m.headroom.set(max(0.0, limit - float(loss.max())))
        m.exposure.set(tr.exposure())
        m.last_close.set((line["open_ms"] + tr.tf_ms) / 1000.0)
        self.health.journaled(line["open_ms"])
        if not count:
            return
        m.bars.inc()
        for p in line["skipped"]:
            m.skipped.labels(pair=p).inc()
            log.warning("paper_candle_missing", bar=line["bar"], pair=p, decision="hold")
        log.info("paper_bar", bar=line["bar"], action=line["action"], equity=line["equity"], book_equity=book,
                 skipped=line["skipped"] or None)
