"""`nexlify bench learn` (controller.bench_learn): its arithmetic by hand and its bad flags."""

from __future__ import annotations

import pytest

from controller import bench_learn as bl
from controller.cli import main


@pytest.mark.parametrize("agent, oracle, lending, expected", [
    (3.0, 5.0, 1.0, 0.5),  # half of the oracle's 4 points over lending
    (1.0, 5.0, 1.0, 0.0),  # the agent earns lending: nothing captured
    (0.0, 3.0, 1.0, -0.5),  # below lending: negative
    (2.0, 1.0, 1.0, None),  # the oracle does not beat lending: nothing to capture
    (2.0, None, 1.0, None),  # no oracle (the control)
])
def test_captured(agent, oracle, lending, expected):
    assert bl.captured(agent, oracle, lending) == expected


def test_summary_takes_medians_over_seeds():
    rows = [{"market": "calendar-1", "seed": s, "agent": a, "oracle": 5.0, "lending": 1.0,
             "captured": bl.captured(a, 5.0, 1.0), "q_gap_seen": g}
            for s, a, g in ((1, 1.0, 0.004), (2, 3.0, -0.001), (3, 5.0, 0.01))]
    (s,) = bl.summarize(rows)
    assert s["agent"] == 3.0 and s["captured"] == 0.5 and s["captured_each"] == [0.0, 0.5, 1.0]
    assert s["q_gap_seen"] == 0.004
    assert "| calendar-1 | 3 | +3.00% | +5.00% | +1.00% | 0.50 | 0.00 0.50 1.00 | +0.0040 | - | - |" in bl.render([s])
    # the signal study's policy beside it: its return and its capture of the same oracle's excess
    (s,) = bl.summarize(rows, {"calendar-1": {"return": 2.0, "trades": 40, "horizon": 4, "entry_round_trips": 1.0}})
    assert s["signal_policy"] == 2.0 and s["signal_captured"] == 0.25  # (2 - 1) / (5 - 1)
    assert bl.render([s]).endswith("| +0.0040 | +2.00% | 0.25 |")
    # rows written before the Q-gap was recorded, and the control, have none
    (c,) = bl.summarize([{"market": "control", "seed": 1, "agent": 0.5, "oracle": None, "lending": 1.0,
                          "captured": None}], {"control": {"return": 0.8}})
    assert c["q_gap_seen"] is None and c["signal_captured"] is None
    assert bl.render([c]).endswith("| - | +0.80% | - |")


@pytest.mark.parametrize("argv, message", [
    (["--families", "weekday"], "--families 'weekday' is unknown; accepted: calendar, lead_lag"),
    (["--strengths", "0"], "--strengths 0.0 is out of range"),
    (["--strengths", "nan"], "--strengths nan is out of range"),
    (["--seeds", "-1"], "--seeds -1 is out of range"),
    (["--output", "s3://bucket/x", "--oracle-only"], "accepted: a local folder"),
])
def test_bad_flags_one_line_exit_2(argv, message, capsys, tmp_path):
    assert main(["bench", "learn", "--log-format", "console", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_oracle_returns_of_the_control_is_lending_alone_the_same_as_beside_an_oracle():
    """The control has no oracle: oracle_returns gives cash plus lending alone, the very number it gives beside
    a family's oracle on the same window (the rules are rows of one pass; lending's does not depend on them)."""
    from nexlify.config import TrainConfig
    from nexlify.data.candles import bundled_dir

    cfg = TrainConfig()
    cfg.data.pairs = ["BTC/USDT"]
    tensors, window = bl._tensors(cfg, bundled_dir(), "2025-05-01", "2025-05-15")
    control = bl.oracle_returns(bl.CONTROL, tensors, window, cfg)
    family = bl.oracle_returns("calendar", tensors, window, cfg)
    assert set(control) == {"lending"}
    assert control["lending"] == family["lending"] > 0
    assert family["oracle_trades"] > 0
