"""Planted markets (nexlify.planted): each transform by hand on a few rows, causality, and a planted folder."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nexlify.data.candles import bundled_dir, read_candles
from nexlify.planted import (
    FAMILIES, REFERENCE_DRIFT, Plant, PlantParams, apply_drift, build_planted_dir, drift, signal,
)
from nexlify.errors import InputError

H = 3_600_000


def test_apply_drift_by_hand():
    # a = [0, 0.1, -0.1]: A = [0, 0.1, 0], A[t-1] = [0, 0, 0.1]
    o, h, lo, c = (np.array([10.0, 11.0, 12.0]), np.array([12.0, 13.0, 14.0]), np.array([9.0, 10.0, 11.0]),
                   np.array([11.0, 12.0, 13.0]))
    po, ph, plo, pc = apply_drift(o, h, lo, c, np.array([0.0, 0.1, -0.1]))
    e = math.exp(0.1)
    assert po == pytest.approx([10.0, 11.0, 12.0 * e])
    assert pc == pytest.approx([11.0, 12.0 * e, 13.0])
    assert ph == pytest.approx([12.0, 13.0 * e, 14.0 * e])
    assert plo == pytest.approx([9.0, 10.0, 11.0])
    assert (ph >= np.maximum(po, pc)).all() and (plo <= np.minimum(po, pc)).all()


@pytest.mark.parametrize("hours, start_hour, expected", [
    ((10, 11, 23), 0, [1, -1, 1]),  # next bar's hour 11, 12, 0: rising hours 0..11
    ((10, 11, 23), 12, [-1, 1, -1]),  # rising hours 12..23
    ((22, 5), 23, [1, 1]),  # next hour 23 and 6: rising hours 23..10 wrap midnight
])
def test_calendar_signal(hours, start_hour, expected):
    ts = np.array([h * H for h in hours], dtype=np.int64)
    p = signal("calendar", ts, np.ones((len(hours), 2)), PlantParams(start_hour=start_hour))
    assert p[:, 0].tolist() == expected and p[:, 1].tolist() == expected


def test_momentum_and_lead_lag_signals():
    leader = np.array([1.0, 2.0, 4.0, 2.0, 1.0])  # 2-bar log returns: -, -, up, flat, down
    follower = np.array([5.0, 1.0, 1.0, 9.0, 9.0])  # 2-bar: -, -, down, up, up
    close = np.stack([leader, follower], axis=1)
    ts = np.arange(5, dtype=np.int64) * H
    params = PlantParams(lookback=2)
    assert signal("momentum", ts, close, params).tolist() == [[0, 0], [0, 0], [1, -1], [0, 1], [-1, 1]]
    # the followers take the leader's sign; the leader (first column) is unplanted
    assert signal("lead_lag", ts, close, params).tolist() == [[0, 0], [0, 0], [0, 1], [0, 0], [0, -1]]


def test_reversion_signal():
    # a drop of 0.1 at bar 5; scale = 2 * std of the last 2 one-bar returns (bars 5, 6: 0.1414; bars 7, 8: 0,
    # no scale): |r4| = 0.1 beats 0.5 * scale at bars 5 and 6; the last large move is at 6, a fall: +1 for
    # bars 5..8 (hold 3: bars 7 and 8 are 1 and 2 bars after it), then 0
    logc = np.array([0.0] * 5 + [-0.1] * 7)
    ts = np.arange(12, dtype=np.int64) * H
    p = signal("reversion", ts, np.exp(logc)[:, None], PlantParams(threshold=0.5, hold=3, scale_bars=2))
    assert p[:, 0].tolist() == [0] * 5 + [1] * 4 + [0] * 3
    # the same move upside down reverts downward; a stricter threshold sees no large move at all
    p = signal("reversion", ts, np.exp(-logc)[:, None], PlantParams(threshold=0.5, hold=3, scale_bars=2))
    assert p[:, 0].tolist() == [0] * 5 + [-1] * 4 + [0] * 3
    p = signal("reversion", ts, np.exp(logc)[:, None], PlantParams(threshold=1e6, hold=3, scale_bars=2))
    assert not p.any()


def test_vol_regime_signal():
    # one-bar returns [-, .1, 0, 0, .1, -.2]; std over 2 vs 3 bars: bar 3 0 < .0577 (calm, -1);
    # bar 4 .0707 > .0577 and bar 5 .2121 > .1528 (turbulent, +1); bars 0..2 lack the slow window (0)
    logc = np.array([0.0, 0.1, 0.1, 0.1, 0.2, 0.0])
    p = signal("vol_regime", np.arange(6, dtype=np.int64) * H, np.exp(logc)[:, None], PlantParams(fast=2, slow=3))
    assert p[:, 0].tolist() == [0, 0, 0, -1, 1, 1]


def test_drift_is_the_previous_bars_signal_times_k():
    ts = np.array([10, 11, 23], dtype=np.int64) * H
    a = drift("calendar", 2.0, ts, np.ones((3, 1)))
    k = 2.0 * REFERENCE_DRIFT["calendar"]
    assert a[:, 0].tolist() == pytest.approx([0.0, k, -k])  # p = [+1, -1, +1] shifted one bar
    assert not drift("calendar", 0.0, ts, np.ones((3, 1))).any()  # strength 0: the real candles


@pytest.fixture(scope="module")
def real():
    frames = [read_candles(bundled_dir() / f"binance_{p}-USDT_1h.csv.gz") for p in ("BTC", "ETH")]
    ts = frames[0]["timestamp"].to_numpy(np.int64)[:600]
    close = np.stack([f["close"].to_numpy(np.float64)[:600] for f in frames], axis=1)
    return ts, close


@pytest.mark.parametrize("family", FAMILIES)
def test_plant_is_causal(family, real):
    """Changing bar m's close changes no drift before bar m+1 (a[t] reads bars <= t-1 only)."""
    ts, close = real
    base = drift(family, 1.0, ts, close)
    for m in (250, 400):
        changed = close.copy()
        changed[m] *= 1.5
        after = drift(family, 1.0, ts, changed)
        assert np.array_equal(after[:m + 1], base[:m + 1])


def test_unknown_family():
    with pytest.raises(InputError, match="unknown planted family 'x'; accepted: calendar"):
        signal("x", np.zeros(1, dtype=np.int64), np.ones((1, 1)))


def test_planted_folder(tmp_path):
    pairs = ["BTC/USDT", "ETH/USDT"]
    control = build_planted_dir(tmp_path / "c", Plant("calendar", 0.0), pairs=pairs)
    planted = build_planted_dir(tmp_path / "p", Plant("calendar", 1.0), pairs=pairs)
    src = read_candles(bundled_dir() / "binance_BTC-USDT_1h.csv.gz")
    same = read_candles(control / "binance_BTC-USDT_1h.csv.gz")
    assert same.equals(src)  # strength 0 writes the real candles back unchanged
    got = read_candles(planted / "binance_BTC-USDT_1h.csv.gz")
    ts = src["timestamp"].to_numpy(np.int64)
    k = REFERENCE_DRIFT["calendar"]
    hour = (ts // H) % 24
    a = np.where(hour < 12, k, -k)  # bar t's drift: its own hour is in the rising half (p[t-1] forecast it)
    a[0] = 0.0
    A = np.cumsum(a)
    assert np.allclose(got["close"] / src["close"], np.exp(A), rtol=1e-12)
    assert np.allclose(got["volume"], src["volume"])
    assert (got["high"] >= got[["open", "close"]].max(axis=1) * (1 - 1e-12)).all()
    assert (got["low"] <= got[["open", "close"]].min(axis=1) * (1 + 1e-12)).all()
    # nets to zero over each whole day: the cumulative drift at every 23:00 close is the same
    assert np.ptp(A[hour == 23]) < 1e-9
    # the second venue: the same factors at the same hours
    v_src = read_candles(bundled_dir() / "coinbase_BTC-USD_1h.csv.gz")
    v_got = read_candles(planted / "coinbase_BTC-USD_1h.csv.gz")
    rows = np.searchsorted(ts, v_src["timestamp"].to_numpy(np.int64))
    assert np.allclose(v_got["close"] / v_src["close"], np.exp(A[rows]), rtol=1e-12)
    meta = (planted / "plant.json").read_text()
    assert '"family": "calendar"' in meta and '"drift_per_bar": 0.0006' in meta
