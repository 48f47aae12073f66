"""Progress a person can follow: log lines routed around the progress bars, a run's bar fed by its worker's
events (episodes done, ETA, last return), and the pipeline's verdict per iteration in words."""

from __future__ import annotations

import io
import json
import re

import pytest
import structlog
from tqdm import tqdm

from controller import rules
from controller.executors.local import _advance_bar
from nexlify import logs
from nexlify.logs import BAR_FORMAT


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def logging_restored():
    """These tests configure logging onto their own streams; later tests (in this process) get back the
    configuration and stream they had."""
    config = structlog.get_config()
    saved = (logs._tee.stream, logs._tee.around_bars, logs._json_mode)
    yield
    structlog.configure(**config)
    logs._tee.stream, logs._tee.around_bars, logs._json_mode = saved


@pytest.fixture
def terminal(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    logs.configure("console")
    return term


def segments(text: str) -> list[str]:
    """What a terminal ends up showing, piece by piece: text between carriage returns and newlines."""
    ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    return [s.strip() for s in re.split(r"[\r\n]", ansi.sub("", text)) if s.strip()]


def test_a_log_line_never_shares_a_line_with_a_bar(terminal):
    bar = tqdm(total=8, desc="init-1", file=terminal, bar_format=BAR_FORMAT, mininterval=0)
    bar.update(3)
    structlog.get_logger("t").info("run_finished", run="init-1", val_score=1.25)
    bar.close()
    shown = segments(terminal.getvalue())
    event = [s for s in shown if "run_finished" in s]
    assert len(event) == 1
    # the line starts with its timestamp, not with the bar's text: the bar was cleared before it was written
    assert re.match(r"^\d{4}-\d\d-\d\dT", event[0]), event[0]
    assert "ep [" not in event[0] and "init-1:" not in event[0].split("run_finished")[0]
    # and the bar was drawn again after the line
    after = shown[shown.index(event[0]) + 1:]
    assert any(s.startswith("init-1:") and "3.0/8 ep" in s for s in after), after


def test_json_lines_are_whole_lines(capsys):
    logs.configure("json")
    structlog.get_logger("t").info("iteration_finished", iteration=2, decision="patience 2/3")
    structlog.get_logger("t").warning("run_preempted", saved=True)
    lines = capsys.readouterr().err.splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [e["event"] for e in events] == ["iteration_finished", "run_preempted"]
    assert events[0]["decision"] == "patience 2/3" and events[1]["level"] == "warning"


def test_a_runs_bar_follows_its_workers_events():
    out = io.StringIO()
    bar = tqdm(total=32, desc="init-2", file=out, bar_format=BAR_FORMAT, mininterval=0)
    _advance_bar(bar, {"percent": 25.0, "episodes_done": 8.0, "episodes": 32, "last_return": None})
    assert bar.n == 8.0
    _advance_bar(bar, {"episode": 16, "round": 1, "rounds": 2, "epsilon": 0.5, "mean_return": -0.523})
    assert bar.n == 16 and bar.postfix == "last return -0.52 %"
    _advance_bar(bar, {"percent": 75.0, "episodes_done": 24.0, "episodes": 32, "last_return": -0.523})
    line = segments(out.getvalue())[-1]
    assert line.startswith("init-2:  75%|") and "24.0/32 ep [" in line and "last return -0.52 %]" in line
    bar.close()


def test_a_forecast_runs_bar_shows_its_fits_share_not_episodes():
    """The forecast learner runs no episodes: the worker gives its fit's share in the run's episode units and
    the bar shows the share alone."""
    assert logs.bar_format("dqn") == BAR_FORMAT
    out = io.StringIO()
    bar = tqdm(total=32, desc="init-1", file=out, bar_format=logs.bar_format("forecast"), mininterval=0)
    _advance_bar(bar, {"percent": 12.5, "episodes_done": 4.0, "episodes": 32, "last_return": None})
    line = segments(out.getvalue())[-1]
    assert line.startswith("init-1:  12%|") and "| fit [" in line and " ep" not in line
    bar.close()


@pytest.mark.parametrize("score, best, count, iteration, expected", [
    (11.0, 10.0, 0, 1, "new best"),  # +10 % >= threshold 5 %
    (10.2, 10.0, 1, 1, "new best, stop: improvement_below_threshold"),  # +2 % < 5 %
    (9.0, 10.0, 1, 2, "patience 2/3"),
    (9.0, 10.0, 2, 3, "patience 3/3, stop: patience_exhausted"),
    (12.0, 10.0, 0, 4, "new best, stop: max_iterations"),
])
def test_the_verdict_in_words(score, best, count, iteration, expected):
    d = rules.decide(score, best, count, iteration, threshold=5.0, patience=3, max_iterations=4)
    assert rules.describe(d, 3) == expected


def test_a_workers_progress_events_are_spaced_but_the_end_always_goes_out(monkeypatch):
    """Off a terminal the worker sends `training_progress` at most every NEXLIFY_PROGRESS_SECONDS, but the
    last step always, once: the run's bar ends at 100 %, not where the last spaced event left it (a fit that
    reports its end twice, after its last holdout measurement and after its refit, sends it once)."""
    from structlog.testing import capture_logs

    from controller import worker

    monkeypatch.setattr(worker, "PROGRESS_SECONDS", 3600.0)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: events, no bar
    progress = worker._Progress(32, "forecast")
    with capture_logs() as events:
        progress.step(10, 100)
        progress.step(91, 100)
        progress.step(1, 1)
        progress.step(100, 100)
    sent = [(e["percent"], e["episodes_done"]) for e in events if e["event"] == "training_progress"]
    assert sent == [(100.0, 32.0)]
