"""`nexlify paper` against a local replay of Binance's public REST API (tests/fake_exchange.py) on bundled
candles, with an accelerated exchange clock: the same decisions, fills and equity as `nexlify evaluate`
bar for bar, a journal that faults and kill -9 leave equal to an uninterrupted run's byte for byte, no
request to a private endpoint, metrics and health. No network beyond 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from nexlify import checkpoint
from nexlify.data.candles import load_market
from nexlify.data.timeframes import iso_utc, parse_utc_ms
from nexlify.env.batched import ACTION_NAMES
from nexlify.env.market import market_features
from nexlify.errors import InputError
from nexlify.evaluate_cmd import _greedy_model, _market_window, evaluate_checkpoint
from nexlify.evaluation import evaluate_policy
from nexlify.features import WARMUP_BARS, Normalizer
from controller.paper.service import PaperService
from nexlify.paper.settings import PaperSettings
from nexlify.paper.trader import warmup_bars
from tests.fake_exchange import TF_MS, FakeBinance
from tests.helpers_market import one_torch_thread, write_untrained_model  # noqa: F401 (fixture)

PAIRS = ["BTC/USDT", "ETH/USDT"]
CANDLES = ("2025-05-01", "2025-05-20")  # bundled candles the replay serves
START = "2025-05-15T00:10"  # exchange time when the session starts: its first decision is at 2025-05-14 23:00
UNTIL = "2025-05-17T00:00"  # the last bar journaled: two days
MARGIN = 0.1  # the checkpoint's hold margin: about half of the untrained net's best actions beat hold by less
STEP_MS = 15 * 60_000  # the replay's clock moves 15 minutes per request
ROOT = Path(__file__).resolve().parents[1]


def write_model(folder: Path, pairs: list[str] = PAIRS) -> str:
    return write_untrained_model(folder, pairs, hold_margin=MARGIN)


def replay(**faults) -> FakeBinance:
    fake = FakeBinance(PAIRS, *CANDLES, parse_utc_ms(faults.pop("start", START)), step_ms=STEP_MS)
    for name, value in faults.items():
        setattr(fake, name, value)
    return fake


def settings(fake: FakeBinance, **kw) -> PaperSettings:
    base = dict(exchange_url=fake.url, until=UNTIL, poll_s=0.0, backoff_s=0.0, metrics_port=0)
    base.update(kw)
    return PaperSettings(**base)


def journal_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((out / "journal").iterdir()))


def lines(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "journal").iterdir())]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def clean(model, tmp_path_factory) -> Path:
    """An uninterrupted session over the two days, no fault."""
    out = tmp_path_factory.mktemp("clean")
    with replay() as fake:
        result = PaperService(model, str(out), settings(fake)).run()
        assert fake.violations == []
    assert result["last_bar"] == "2025-05-17T00:00:00Z"
    return out


def test_warmup_window_gives_the_features_of_the_full_history(model):
    """The features at a decision bar from the warm-up window alone equal those from all the candles since
    January (EWMs settled to float32's last bit; rolling windows inside it), after the checkpoint's normaliser."""
    market = load_market("binance", PAIRS, start="2025-01-01", end="2025-05-15")
    n = warmup_bars(TF_MS)
    assert n == 240 > WARMUP_BARS
    full = market_features(market)[-1]
    short = market_features(market.slice(market.n_bars - n, market.n_bars))[-1]
    norm = Normalizer.from_dict(checkpoint.load(model)["normalizer"])
    np.testing.assert_allclose(norm.apply(short), norm.apply(full), rtol=0, atol=1e-6)
    # a window of WARMUP_BARS / 4 is not enough: the 168-bar features differ
    cut = market_features(market.slice(market.n_bars - WARMUP_BARS // 4, market.n_bars))[-1]
    assert np.abs(norm.apply(cut) - norm.apply(full)).max() > 0.1


def test_same_decisions_fills_and_equity_as_evaluate(model, clean):
    """The journal, bar for bar, against nexlify evaluate's greedy policy on the same candles: the actions
    (with the checkpoint's hold margin), the position and entry price after each fill, and the equity."""
    journal = lines(clean)
    assert journal[0]["bar"] == "2025-05-14T23:00:00Z" and journal[-1]["bar"] == "2025-05-17T00:00:00Z"
    assert [parse_utc_ms(x["bar"]) for x in journal] == list(range(parse_utc_ms(journal[0]["bar"]),
                                                                     parse_utc_ms(UNTIL) + 1, TF_MS))
    ckpt = checkpoint.load(model)
    cfg = checkpoint.train_config(ckpt, model)
    end = iso_utc(parse_utc_ms(UNTIL) + TF_MS)
    market, window, raw = _market_window(cfg, None, "binance", None, "2025-05-15", end)
    tensors, net = _greedy_model(ckpt, cfg, market, "cpu", raw)
    seen = {"actions": [], "equity": [], "units": [], "entry": []}

    def observe(env, actions):
        if actions is not None:
            seen["actions"].append(actions[:, 0].tolist())
        seen["equity"].append(env.equity.tolist())
        seen["units"].append(env.units[:, 0].tolist())
        seen["entry"].append(env.entry[:, 0].tolist())

    evaluate_policy(net, tensors, window, cfg.env, cfg.risk, cfg.strategy_params(), margin=cfg.agent.hold_margin,
                    observer=observe)
    assert len(journal) == len(seen["equity"]) == window[1] - window[0] + 1
    for k, line in enumerate(journal):
        for j, pair in enumerate(PAIRS):
            assert line["equity"][pair] == seen["equity"][k][j], (line["bar"], pair)
            if k < len(seen["actions"]):
                assert line["action"][pair] == ACTION_NAMES[seen["actions"][k][j]], (line["bar"], pair)
            if k > 0:
                fill = line["fills"][pair]
                assert fill["units"][1] == seen["units"][k][j]
                if fill["entry_price"] is not None:
                    assert fill["entry_price"] == seen["entry"][k][j]
                    # the next bar's open plus slippage
                    assert fill["entry_price"] == pytest.approx(line["candles"][pair][0]
                                                                * (1 + cfg.env.slippage_bps / 1e4), rel=1e-12)
    # it traded, and the margin held some best actions back: the parity covers both
    actions = [a for x in journal for a in x["action"].values()]
    assert actions.count("open_long") >= 5 and actions.count("close") >= 5
    held_by_margin = sum(1 for x in journal for p in PAIRS if x["action"][p] == "hold"
                         and max(x["q"][p][ACTION_NAMES.index(v)] for v in x["valid"][p]) > x["q"][p][0])
    assert held_by_margin >= 5
    report = evaluate_checkpoint(model, start="2025-05-15", end=end)
    for pair in PAIRS:
        final = journal[-1]["equity"][pair]
        assert report["agent"]["per_pair"][pair]["total_return"] == pytest.approx(
            (final / cfg.env.initial_equity - 1) * 100, abs=1e-9)
    assert all(x["checkpoint_sha256"] == journal[0]["checkpoint_sha256"] for x in journal)


def test_faults_leave_the_journal_of_an_uninterrupted_run(model, clean, tmp_path):
    """Bursts of 429 and 5xx, a 504, candles served late, the exchange down for five hours, and the still-open
    candle served with partial values throughout: the same journal, byte for byte; no private call."""
    late = {("BTCUSDT", parse_utc_ms("2025-05-15T06:00")): 40 * 60_000,
            ("ETHUSDT", parse_utc_ms("2025-05-16T03:00")): 25 * 60_000}
    down = [(parse_utc_ms("2025-05-15T10:20"), parse_utc_ms("2025-05-15T15:40"))]
    t = parse_utc_ms("2025-05-15T03:00")  # after the session's start (a fault before it would move its first bar)
    fail = [["/api/v3/klines", 429, 3, t], ["/api/v3/time", 503, 4, t], ["/api/v3/klines", 502, 2, t],
            ["/api/v3/time", 504, 1, t], ["/api/v3/klines", 418, 1, t]]
    out = tmp_path / "faults"
    with replay(late=late, down=down, fail=fail) as fake:
        service = PaperService(model, str(out), settings(fake, candle_tries=6))
        service.run()
        assert fake.violations == []
        assert all(rule[2] == 0 for rule in fake.fail)  # every injected error was met
    assert journal_bytes(out) == journal_bytes(clean)
    errors = {s.labels["kind"]: s.value for m in service.metrics.registry.collect() for s in m.samples
              if s.name == "nexlify_paper_exchange_errors_total"}
    assert errors["DDoSProtection"] == 4 and errors["RequestTimeout"] == 1
    assert errors["ExchangeNotAvailable"] >= 6  # the injected 5xx and the hours down


def test_clock_skew_only_the_exchange_clock_decides(model, tmp_path):
    """The replay's clock is months from this machine's and starts one second before 23:00's candle
    closes, which the replay serves with partial values: the first decision is at 22:00's close, and no
    line ever holds a candle other than the closed one the candle files hold."""
    assert abs(parse_utc_ms(START) - time.time() * 1000) > 30 * 86_400_000
    out = tmp_path / "skew"
    # its first request (the market list) moves the clock 15 minutes: fetch_time answers 23:59:59
    with replay(start="2025-05-14T23:44:59") as fake:
        PaperService(model, str(out), settings(fake, until="2025-05-15T04:00")).run()
    journal = lines(out)
    assert journal[0]["bar"] == "2025-05-14T22:00:00Z"  # not 23:00: it was still open
    market = load_market("binance", PAIRS, start="2025-05-14T22:00", end="2025-05-15T05:00")
    for k, line in enumerate(journal):
        for j, pair in enumerate(PAIRS):
            assert line["candles"][pair] == [market.open[k, j], market.high[k, j], market.low[k, j],
                                             market.close[k, j], market.volume[k, j]]


def test_missing_candle_no_decision_warning_and_metric(model, tmp_path):
    """A candle the exchange never serves: after the looks, that pair's bar is held, named in the line
    and counted; the other pair decides; the candle is never forward-filled into a decision."""
    gone = parse_utc_ms("2025-05-15T05:00")
    out = tmp_path / "missing"
    with replay(missing={("ETHUSDT", gone)}) as fake:
        service = PaperService(model, str(out), settings(fake, until="2025-05-15T08:00"))
        service.run()
    line = next(x for x in lines(out) if x["open_ms"] == gone)
    assert line["candles"]["ETH/USDT"] is None and line["candles"]["BTC/USDT"] is not None
    assert line["skipped"] == ["ETH/USDT"] and line["action"]["ETH/USDT"] == "hold"
    assert line["fills"]["ETH/USDT"]["units"][0] == line["fills"]["ETH/USDT"]["units"][1]  # nothing filled
    skipped = {s.labels["pair"]: s.value for m in service.metrics.registry.collect() for s in m.samples
               if s.name == "nexlify_paper_decisions_skipped_total"}
    assert skipped == {"ETH/USDT": 1.0}
    assert sum(len(x["skipped"]) for x in lines(out)) == 1


KILL_UNTIL = "2025-05-15T16:00"


def _cli(model: str, out: Path, url: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEXLIFY_LOG_FORMAT": "json"}
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "paper", "--model", model, "--output", str(out),
                             "--exchange-url", url, "--until", KILL_UNTIL, "--poll-seconds", "0", "--backoff-seconds", "0",
                             "--metrics-port", "0", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_session_then_restart_gives_the_same_journal(model, clean, tmp_path):
    """The CLI killed with SIGKILL while it journals, then started again on the same output: the closed
    candles missed while it was down are replayed in order, and the journal equals the uninterrupted one."""
    out = tmp_path / "killed"
    with replay() as fake:
        proc = _cli(model, out, fake.url)
        deadline = time.time() + 180
        while time.time() < deadline and len(list(out.glob("journal/*.json"))) < 6:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        written = len(list((out / "journal").glob("*.json")))
        assert 6 <= written < 18  # killed mid-session (18 lines to 16:00)
        fake.now_ms += 6 * TF_MS  # it stays down for six hours of exchange time
        again = _cli(model, out, fake.url)
        stdout, stderr = again.communicate(timeout=300)
        assert again.returncode == 0, stderr
        assert fake.violations == []
    n = len(list((out / "journal").glob("*.json")))
    assert n == 18 and lines(out)[-1]["bar"] == "2025-05-15T16:00:00Z"
    assert journal_bytes(out) == b"".join(p.read_bytes() for p in sorted((clean / "journal").iterdir())[:n])
    events = [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]
    bars = [e for e in events if e.get("event") == "paper_bar"]
    assert bars and all("action" in e and "book_equity" in e for e in bars)
    assert any(e.get("event") == "paper_session_resumed" for e in events)


def test_a_damaged_journal_line_or_snapshot_is_named(model, clean, tmp_path):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(clean, out)
    victim = sorted((out / "journal").iterdir())[7]
    victim.write_text(victim.read_text().replace('"hold"', '"close"', 1))
    with replay() as fake:
        with pytest.raises(InputError, match=victim.name):
            PaperService(model, str(out), settings(fake)).run()
    victim.write_text(victim.read_text()[:50])  # a torn line
    with replay() as fake:
        with pytest.raises(InputError, match=f"{victim.name} is damaged"):
            PaperService(model, str(out), settings(fake)).run()
    shutil.rmtree(out)
    shutil.copytree(clean, out)
    snapshots = sorted((out / "snapshots").iterdir())
    assert [json.loads(p.read_text())["lines"] for p in snapshots] == [24, 48]  # every 24 bars
    snapshots[0].write_text(snapshots[0].read_text().replace('"journal_head":"', '"journal_head":"0', 1))
    with replay() as fake:
        with pytest.raises(InputError, match=f"{snapshots[0].name} disagrees"):
            PaperService(model, str(out), settings(fake)).run()
    snapshots[0].write_text("{")
    with replay() as fake:
        with pytest.raises(InputError, match=f"snapshot .*{snapshots[0].name} is damaged"):
            PaperService(model, str(out), settings(fake)).run()


def test_bad_symbol_is_one_line_and_exit_2(tmp_path, capsys):
    from controller.cli import main

    path = tmp_path / "m"
    path.mkdir()
    model = write_model(path, ["BTC/USDT", "SOL/USDT"])  # the replay lists BTC and ETH only
    with replay() as fake:
        code = main(["paper", "--model", model, "--output", str(tmp_path / "out"), "--exchange-url", fake.url,
                     "--metrics-port", "0"])
        assert fake.violations == []
    assert code == 2
    err = capsys.readouterr().err
    assert "SOL/USDT is not listed on binance" in err and len(err.strip().splitlines()) == 1


def test_metrics_and_health(model, tmp_path):
    """/metrics serves the equity, drawdown, headroom, exposure and lag of the journal's last line; /healthz
    fails once the last closed candle is older than a timeframe plus grace."""
    out = tmp_path / "ops"
    with replay() as fake:
        service = PaperService(model, str(out), settings(fake, until="2025-05-15T06:00", metrics_port=0))
        service.run()
        from controller.paper.service import serve

        server = serve(service.metrics, service.health, "127.0.0.1", 0)
        port = server.server_address[1]
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            last = lines(out)[-1]
            assert f"nexlify_paper_equity {last['book_equity']!r}" in text
            for name in ("nexlify_paper_drawdown_ratio", "nexlify_paper_daily_loss_headroom_ratio",
                         "nexlify_paper_exposure_ratio", "nexlify_paper_candle_lag_seconds",
                         "nexlify_paper_decisions_skipped_total", "nexlify_paper_exchange_errors_total"):
                assert name in text
            service.health.saw_time(last["open_ms"] + TF_MS + 60_000)  # a minute after its close: healthy
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
            service.health.saw_time(last["open_ms"] + 2 * TF_MS + service.settings.grace_s * 1000 + 60_000)
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert err.value.code == 503
        finally:
            server.shutdown()
            server.server_close()


def test_an_authentication_error_is_permanent(model, tmp_path):
    """A 401 from the exchange (ccxt AuthenticationError) is not retried: one line naming it, exit 2."""
    t = parse_utc_ms("2025-05-15T02:00")
    with replay(fail=[["/api/v3/klines", 401, 1, t]]) as fake:
        with pytest.raises(InputError, match="refused fetch_ohlcv BTC/USDT.*AuthenticationError") as err:
            PaperService(model, str(tmp_path / "out"), settings(fake)).run()
        assert fake.fail[0][2] == 0 and fake.violations == []
    assert err.value.exit_code == 2


def test_one_writer_per_output(model, tmp_path):
    """A second trader on an output whose lease is held exits 2 naming the holder, writing nothing."""
    from controller.lease import LeaseHeld, LocalLease

    out = tmp_path / "held"
    holder = LocalLease(str(out))
    holder.acquire()
    try:
        with replay() as fake:
            with pytest.raises(LeaseHeld) as err:
                PaperService(model, str(out), settings(fake)).run()
            assert fake.requests == []  # it never asked the exchange
        assert err.value.exit_code == 2
        assert not (out / "session.json").exists()
    finally:
        holder.release()


def test_s3_model_and_output_resume(model, clean, seaweed, s3_env, tmp_path):
    """The model read from a bucket, the journal written to one; stopped after four bars and started again
    on the same prefix, it replays and checks what is there and goes on as the uninterrupted journal."""
    import boto3

    client = boto3.client("s3")
    client.put_object(Bucket=seaweed.bucket, Key=f"{s3_env}/model.pt", Body=Path(model).read_bytes())
    model_url = f"s3://{seaweed.bucket}/{s3_env}/model.pt"
    output = f"s3://{seaweed.bucket}/{s3_env}/paper"
    with replay() as fake:
        PaperService(model_url, output, settings(fake, until="2025-05-15T02:00")).run()
        PaperService(model_url, output, settings(fake, until="2025-05-15T06:00")).run()
        assert fake.violations == []
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=seaweed.bucket, Prefix=f"{s3_env}/paper/journal/",
                                                           MaxKeys=1000)["Contents"])
    stored = [json.loads(client.get_object(Bucket=seaweed.bucket, Key=k)["Body"].read()) for k in keys]
    header = json.loads(client.get_object(Bucket=seaweed.bucket, Key=f"{s3_env}/paper/session.json")["Body"].read())
    assert header["model"] == model_url
    # the same lines; the chain differs from the first link on, as the header names another model location
    assert [{k: v for k, v in x.items() if k != "prev_sha256"} for x in stored] == \
        [{k: v for k, v in x.items() if k != "prev_sha256"} for x in lines(clean)[:len(stored)]]
    assert stored[-1]["bar"] == "2025-05-15T06:00:00Z"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stop(Exception):
    pass


def test_prometheus_scrapes_the_equity_gauge(model, tmp_path):
    """Debian's Prometheus server on 127.0.0.1 scrapes the trader while it replays; the equity gauge read
    back through Prometheus's query API is the journal's book equity."""
    import shutil
    import threading

    binary = shutil.which("prometheus")
    assert binary, "the prometheus server is needed: apt-get install prometheus (.ci/run installs it)"
    metrics_port, prom_port = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: paper\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    out = tmp_path / "scraped"
    target = parse_utc_ms("2025-05-15T05:00")
    read_back: dict = {}

    def query(expr: str) -> list:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={expr}"
        return json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]

    try:
        with replay() as fake:
            service = PaperService(model, str(out), settings(fake, until=None, metrics_host="127.0.0.1",
                                                             metrics_port=metrics_port))

            def sleep(seconds: float) -> None:
                if service.trader.last_ms is None or service.trader.last_ms < target:
                    return
                expected = lines(out)[-1]["book_equity"]
                deadline = time.time() + 60
                while time.time() < deadline:  # scrapes every second; the series holds the last value
                    try:
                        result = query("nexlify_paper_equity")
                    except (urllib.error.URLError, ConnectionError):
                        result = []
                    if result and float(result[0]["value"][1]) == expected:
                        read_back["equity"] = float(result[0]["value"][1])
                        read_back["up"] = query("up")[0]["value"][1]
                        break
                    time.sleep(0.25)
                raise _Stop()

            service.sleep = sleep
            thread_error: list = []

            def run() -> None:
                try:
                    service.run()
                except _Stop:
                    pass
                except BaseException as exc:  # noqa: BLE001 (reported below)
                    thread_error.append(exc)

            worker = threading.Thread(target=run)
            worker.start()
            worker.join(timeout=240)
            assert not worker.is_alive() and not thread_error, thread_error
    finally:
        prom.terminate()
        prom.wait(timeout=30)
    assert read_back.get("equity") == lines(out)[-1]["book_equity"]
    assert read_back["up"] == "1"


def test_latest_model_of_a_pipeline_output_and_a_session_per_model(model, clean, tmp_path):
    """--model naming a pipeline's output takes its summary's final model (the chart's `latest`); with
    --session-per-model the journal goes under the checkpoint's sha256, so a retrained model starts anew."""
    import hashlib

    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "complete_training_summary.json").write_text(json.dumps({"final_model_path": model}))
    out = tmp_path / "paper"
    with replay() as fake:
        PaperService(str(pipeline), str(out), settings(fake, until="2025-05-15T01:00", session_per_model=True)).run()
    session = out / hashlib.sha256(Path(model).read_bytes()).hexdigest()[:16]
    assert lines(session) == lines(clean)[:3]
    with pytest.raises(InputError, match="neither a .pt checkpoint nor a pipeline output"):
        PaperService(str(tmp_path / "nothing"), str(out), PaperSettings())


def _page_data(page: str) -> dict:
    start = page.index('<script type="application/json" id="report-data">')
    body = page[page.index(">", start) + 1:page.index("</script>", start)]
    return json.loads(body.replace("<\\/", "</"))


def _drawn_in_chromium(page: Path, profile: Path) -> None:
    """The page in headless chromium (tests/test_report_browser.py's Browser): every chart drawn, one drawn
    trace per figure trace, no console error or exception, the verdict's section first."""
    from tests.test_report_browser import CHARTS_JS, LOAD_TIMEOUT_S, Browser

    browser = Browser(profile)
    try:
        for domain in ("Runtime", "Log", "Page"):
            browser.call(f"{domain}.enable")
        browser.call("Page.navigate", url=page.as_uri())
        deadline, ready = time.monotonic() + LOAD_TIMEOUT_S, None
        while time.monotonic() < deadline and ready != "yes":
            time.sleep(0.25)
            ready = browser.evaluate("document.body ? document.body.getAttribute('data-ready') : null")
        assert ready == "yes", "the paper report's charts did not finish drawing"
        charts = browser.evaluate(CHARTS_JS)
        first = browser.evaluate("document.querySelector('section').id")
        browser.call("Runtime.evaluate", expression="0")  # collect any late events
    finally:
        browser.close()
    assert first == "verdict-section"
    assert len(charts) >= 2 * 7 and all(c["drawn"] == "yes" and c["traces"] == c["figureTraces"] > 0
                                        and c["height"] > 0 for c in charts), charts
    assert [e for e in browser.events if e["method"] == "Runtime.exceptionThrown"
            or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))] == []


def test_report_of_a_paper_session(model, clean, tmp_path, capsys):
    """`nexlify report` on a session's output: the verdict first, the agent's equity the journal's, each
    baseline's figures and curve those `nexlify evaluate` steps over the same bars, the one verdict sentence,
    and a statement that the session is simulated. A damaged line: one line naming it, exit 2."""
    import html
    import shutil

    from controller.cli import main
    from nexlify.verdict import verdict_text

    out = tmp_path / "session"
    shutil.copytree(clean, out)
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    data = _page_data(page)
    journal = lines(clean)
    w = data["evaluation"]["windows"]["session"]
    end = iso_utc(parse_utc_ms(UNTIL) + TF_MS)
    assert (w["start"], w["end"], w["bars"]) == ("2025-05-15T00:00:00Z", end, len(journal) - 1)
    for pair in PAIRS:
        assert w["pairs"][pair]["equity"][-1] == journal[-1]["equity"][pair]
        assert w["pairs"][pair]["equity"] == [x["equity"][pair] for x in journal]
    # the same bars through `nexlify evaluate`: its baselines, and (no candle was missing) its agent
    ev = evaluate_checkpoint(model, start="2025-05-15", end=end, record=True)
    assert ev["window"]["bars"] == w["bars"]
    names = set(ev["baselines"])
    assert {"cash_plus_lending", "buy_and_hold_full", "flat"} <= names
    for pair in PAIRS:
        shown = w["baselines"][pair]
        assert names <= set(shown) and "buy_and_hold (no fees)" in shown
        for name in names:
            want = ev["baselines"][name]["per_pair"][pair]
            for key in ("total_return", "sharpe", "max_drawdown", "trades"):
                assert shown[name][key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), (pair, name, key)
            assert shown[name]["equity"] == pytest.approx(ev["curves"][name]["equity"][pair], rel=1e-12)
        for key in ("total_return", "sharpe", "max_drawdown", "trades", "win_rate"):
            assert w["metrics"]["per_pair"][pair][key] == pytest.approx(ev["agent"]["per_pair"][pair][key],
                                                                        rel=1e-12, abs=1e-12), (pair, key)
    # one verdict: the page's sentence is verdict_text of its block, and evaluate's on the same bars
    assert data["verdict"]["text"] == verdict_text(data["verdict"]) == ev["verdict"]["text"]
    assert page.index('id="verdict"') < page.index('id="paper"') < page.index('id="evaluation"')
    assert f">{html.escape(ev['verdict']['text'])}</p>" in page
    statement = page[page.index('id="paper-statement"'):]
    assert statement.startswith('id="paper-statement">Simulated') and "no order was\nplaced" in statement
    assert "It models no DeFi yield" in statement  # the model trades spot alone
    assert data["paper"]["book_equity"] == journal[-1]["book_equity"]
    _drawn_in_chromium(out / "report.html", tmp_path / "browser")

    capsys.readouterr()
    last = sorted((out / "journal").iterdir())[-1]  # no line after it: its chain holds, its replay does not
    text = last.read_text()
    last.write_text(text.replace('"hold"', '"close"', 1))
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{last.name} differs from its replay" in err[0]
    last.write_text(text)
    victim = sorted((out / "journal").iterdir())[5]  # the next line's chain link no longer holds
    victim.write_text(victim.read_text().replace('"hold"', '"close"', 1))
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and victim.name in err[0] and "is damaged" in err[0]
    victim.write_text("{")
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{victim.name} is damaged" in err[0]
