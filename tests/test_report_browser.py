"""report.html in a real browser: Debian's chromium, headless, driven over the DevTools protocol (a
websocket, with websocket-client) on the tiny pipeline's report.

Asserted: no console error or uncaught exception; no request leaves the file (everything is embedded);
every chart is drawn (one drawn trace per trace of its figure, a plot area of the page's chart size, lines
and bars with real geometry); the verdict comes first and is the summary's, and so are the winner and the
stop reason; on each equity chart the agent's and lending's lines are drawn apart. A full-page
screenshot is taken (kept as report.png beside the test's files; NEXLIFY_REPORT_SCREENSHOT=path also
copies it there, to look at)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websocket

from nexlify.data.timeframes import parse_utc_ms
from nexlify.report.page import CHART_HEIGHT
from tests.pipeline_support import Reference, read_json

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LOAD_TIMEOUT_S = 90.0
VIEWPORT_WIDTH = 1280


class Browser:
    """One headless chromium and a DevTools session on its page."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM, "chromium is not installed (apt-get install -y chromium; .ci/run does it)"
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={VIEWPORT_WIDTH},900",
             "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise AssertionError(f"chromium exited with {self.proc.returncode}")
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(match.group(1)) if match else None
        assert port, "chromium did not open its DevTools port"
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == ident:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# The agent and cash plus lending must be told apart on the equity chart: their drawn vertical extents (the
# top and bottom of each line, in pixels) differ by more than this fraction of the plot area's height.
MIN_APART = 0.05

LINES_JS = """
(() => Array.from(document.querySelectorAll('.chart[id$="-equity"]')).map(el => {
  const names = el._fullData.map(t => t.name);
  const boxes = Array.from(el.querySelectorAll('g.trace.scatter path.js-line')).map(p => {
    const b = p.getBBox(); return {top: b.y, bottom: b.y + b.height};
  });
  return {id: el.id, names: names, boxes: boxes, plot: el._fullLayout._size.h};
}))()
"""

CHARTS_JS = """
(() => {
  const figures = JSON.parse(document.getElementById('report-figures').textContent);
  return Array.from(document.querySelectorAll('.chart')).map(el => {
    const svg = el.querySelector('svg.main-svg');
    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    const fig = figures[el.getAttribute('data-figure')] || {data: []};
    const paths = Array.from(el.querySelectorAll('g.trace path')).map(p => (p.getAttribute('d') || '').length);
    return {id: el.id, drawn: el.getAttribute('data-drawn'), width: box.width, height: box.height,
            container: el.clientWidth, traces: el.querySelectorAll('g.trace').length, figureTraces: fig.data.length,
            longestPath: paths.length ? Math.max(...paths) : 0,
            xrange: el._fullLayout && el._fullLayout.xaxis ? el._fullLayout.xaxis.range : null};
  });
})()
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    out = Reference.get(tmp_path_factory)
    base = tmp_path_factory.mktemp("browser")
    browser = Browser(base / "profile")
    try:
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.call(f"{domain}.enable")
        browser.call("Page.navigate", url=(out / "report.html").as_uri())
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        ready = None
        while time.monotonic() < deadline:
            ready = browser.evaluate("document.body ? document.body.getAttribute('data-ready') : null")
            if ready == "yes":
                break
            time.sleep(0.25)
        assert ready == "yes", "the report's charts did not finish drawing"
        charts = browser.evaluate(CHARTS_JS)
        lines = browser.evaluate(LINES_JS)
        shown = browser.evaluate("({winner: document.getElementById('winner').textContent, "
                                 "stop: document.getElementById('stop-reason').textContent, "
                                 "verdict: document.getElementById('verdict').textContent, "
                                 "first: document.querySelector('section').id})")
        metrics = browser.call("Page.getLayoutMetrics")
        height = int(metrics["cssContentSize"]["height"])
        browser.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT_WIDTH, height=min(height, 16000),
                     deviceScaleFactor=1, mobile=False)
        time.sleep(1.0)  # plotly redraws responsive charts after the resize
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        shot = base64.b64decode(shot)
        png = base / "report.png"
        png.write_bytes(shot)
        if os.environ.get("NEXLIFY_REPORT_SCREENSHOT"):
            shutil.copy(png, os.environ["NEXLIFY_REPORT_SCREENSHOT"])
        browser.call("Runtime.evaluate", expression="0")  # collect any late events
        return {"out": out, "charts": charts, "lines": lines, "shown": shown, "events": list(browser.events), "png": shot,
                "height": height}
    finally:
        browser.close()


def test_no_console_errors_and_no_exceptions(loaded):
    errors = [e for e in loaded["events"]
              if (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    # the page did log: the check above listens to the console for real
    assert any(e["method"] == "Runtime.executionContextCreated" for e in loaded["events"])


def test_nothing_is_fetched_from_outside_the_file(loaded):
    urls = [e["params"]["request"]["url"] for e in loaded["events"] if e["method"] == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file:", "data:", "about:")) for u in urls), urls


def test_every_chart_is_drawn_at_its_size(loaded):
    charts = loaded["charts"]
    summary = read_json(loaded["out"] / "complete_training_summary.json")
    n_pairs = len(summary["data"]["pairs"])
    # runs (3) + stop rule, 7 per pair per window (validation, test), 5 training curves
    assert len(charts) == 4 + 7 * n_pairs * 2 + 5
    for c in charts:
        assert c["drawn"] == "yes", c
        assert c["height"] == CHART_HEIGHT and c["width"] == c["container"] and c["width"] > 800, c
        assert c["figureTraces"] >= 1 and c["traces"] == c["figureTraces"], c
        assert c["longestPath"] > 10, c  # a line or a bar with real geometry


def test_the_bar_series_span_their_windows_dates(loaded):
    # the per-bar series carry x0 and dx (the bar in ms) instead of a time per point: drawn, an equity chart's
    # date axis runs from the window's first bar to its last, as the report's data gives them
    page = (loaded["out"] / "report.html").read_text()
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page, flags=re.S).group(1).replace("<\\/", "</"))
    charts = {c["id"]: c for c in loaded["charts"]}
    checked = 0
    for name, window in data["evaluation"]["windows"].items():
        for pair, p in window["pairs"].items():
            chart = charts[f"chart-eval-{slug(name)}-{slug(pair)}-equity"]
            drawn = [parse_utc_ms(x.replace(" ", "T") + "Z") for x in chart["xrange"]]  # plotly: "2025-04-16 00:00"
            assert drawn == [parse_utc_ms(p["time"][0]), parse_utc_ms(p["time"][-1])], (name, pair, chart["xrange"])
            checked += 1
    assert checked >= 2


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def test_the_winner_and_stop_reason_shown_are_the_summarys(loaded):
    summary = read_json(loaded["out"] / "complete_training_summary.json")
    winner = next([f"init-{r['run_id']}"] for r in summary["initial_runs"]
                  if r["model_path"] == summary["final_model_key"]) if any(
        r["model_path"] == summary["final_model_key"] for r in summary["initial_runs"]) else [
        f"retrain-{it['iteration']}" for it in summary["retraining_iterations"]
        if it["model_path"] == summary["final_model_key"]]
    shown = dict(loaded["shown"])
    # the verdict, first on the page, in the summary's words
    assert shown.pop("verdict") == summary["verdict"]["text"] and shown.pop("first") == "verdict-section"
    assert shown == {"winner": winner[0], "stop": summary["stop_reason"]}


def test_the_agent_and_lending_lines_are_told_apart(loaded):
    # on each equity chart the agent and cash plus lending alone: their drawn vertical extents differ by more
    # than MIN_APART of the plot's height (buy-and-hold and random actions, drawn on their own panel, no
    # longer set a scale that flattens both into one line)
    checked = 0
    for chart in loaded["lines"]:
        assert chart["names"] == ["agent", "cash_plus_lending"], chart
        agent, lending = chart["boxes"]
        apart = max(abs(agent["top"] - lending["top"]), abs(agent["bottom"] - lending["bottom"]))
        assert apart > MIN_APART * chart["plot"], chart
        checked += 1
    assert checked >= 2


def test_the_screenshot_is_the_whole_page(loaded):
    png = loaded["png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width == VIEWPORT_WIDTH and height == min(loaded["height"], 16000) and height > 3000
