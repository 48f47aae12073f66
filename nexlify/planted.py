"""Planted markets: real candles plus one documented, causal transform that plants a known edge.

A planted market answers "does the learner capture an edge when one is there?". Each family plants a
drift in the log price, driven by a predictive signal `p[t]` in {-1, 0, +1} computed at the close of bar t
from bars <= t only (and named parameters). The drift of bar t+1 is `a[t+1] = k * p[t]`, where `k` (log
return per bar) is the family's reference drift times the strength (strength 0 leaves the candles as they
are: the unplanted control).

How a drift enters the candles (`apply_drift`): with A[t] = a[1] + ... + a[t] (A[-1] = A[0] = 0),

    open'[t]  = open[t]  * exp(A[t-1])        close'[t] = close[t] * exp(A[t])
    high'[t]  = high[t]  * exp(max(A[t-1], A[t]))
    low'[t]   = low[t]   * exp(min(A[t-1], A[t]))

so the drift of bar t accrues between its open and its close (a rule deciding at the close of t-1 and
filled at the open of t holds it), the gap from one close to the next open is the real one, every
multiplier is positive (high' >= max(open', close'), low' <= min(open', close'): OHLC stays consistent),
and volume is untouched. The second venue (nexlify.data.second_venue) gets the same A at the same
timestamps (as of the primary's bars), so both venues are planted alike and their spread stays real.

The signals are computed on the real candles (bars <= t). The agent and the oracles see only the planted
candles: the oracle of a family (nexlify.oracles) computes the same signal on what it sees, which for the
families whose signal reads prices differs from the plant's own in the rare bars where the plant flips a
sign; an oracle is what a user could write, not a peek at the plant.

Families (each observable in the agent's own features, nexlify.features):

- calendar: p[t] = +1 when the hour (UTC) of bar t+1 lies in [start_hour, start_hour + 12), else -1.
  Observed through hour_sin/hour_cos. Nets to zero over each day exactly (12 hours up, 12 down). A
  day-of-week plant is not offered: the features hold no weekday, so it would not be observable.
- lead_lag: every pair but the leader (the first pair, BTC/USDT in the default order) gets p[t] = the sign
  of the leader's log return over the last `lookback` bars (bars t-lookback .. t); the leader is unplanted.
  Observed through lead_ret_24h (and lead_ret_1h). Nets to the leader's share of up days minus down days.
- momentum: p[t] = the sign of the pair's own log return over the last `lookback` bars. Observed through
  ret_24h. There is no cycle to net over; its net is the share of up days minus down days.
- reversion: a large move is a log return over 4 bars beyond `threshold` times its recent scale (the std of
  the 1-bar log returns of the last `scale_bars` (24) bars, times sqrt(4); a window without moves has no
  scale and no large move); for `hold` bars after the latest large move, p = minus its sign, else 0. Observed through ret_4h, ret_12h and vol_24h. Nets to zero when large rises
  and falls are equally common.
- vol_regime: p[t] = +1 while the 24-bar std of 1-bar log returns exceeds the 168-bar one, else -1.
  Observed through vol_24h and vol_168h. Nets to the share of turbulent bars minus calm ones.

REFERENCE_DRIFT holds each family's reference `k` (strength 1): the drift at which its oracle earns about
+5 %/yr per pair over cash plus lending at the default 5 % position cap after costs, calibrated on the
bundled year 2024-06-01 .. 2025-06-01 (docs/planted-edges.md gives the measurement and the command).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nexlify.config import DEFAULT_PAIRS
from nexlify.data.candles import bundled_dir, candle_filename, find_candle_file, read_candles, write_candles
from nexlify.data.second_venue import second_venue_pair
from nexlify.errors import InputError

FAMILIES = ("calendar", "lead_lag", "momentum", "reversion", "vol_regime")
HOUR_MS = 3_600_000

# strength 1: log drift per bar (calibrated: docs/planted-edges.md, "Reference strength")
REFERENCE_DRIFT = {
    "calendar": 0.0006,
    "lead_lag": 0.00095,
    "momentum": 0.0009,
    "reversion": 0.0020,
    "vol_regime": 0.00085,
}


@dataclass(frozen=True)
class PlantParams:
    """The named parameters of the signals (see the module doc); the defaults are the benchmark's."""

    start_hour: int = 0  # calendar: first hour (UTC) of the 12 rising hours
    lookback: int = 24  # lead_lag, momentum: bars of the return whose sign is the signal
    threshold: float = 2.0  # reversion: a large move, in units of its recent scale
    hold: int = 12  # reversion: bars the reverting drift lasts after a large move
    scale_bars: int = 24  # reversion: bars of the 1-bar return std that scales a move
    fast: int = 24  # vol_regime: bars of the fast std
    slow: int = 168  # vol_regime: bars of the slow std


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise InputError(f"unknown planted family {family!r}; accepted: {', '.join(FAMILIES)}")
    return family


def _past_return(logc: np.ndarray, n: int) -> np.ndarray:
    """[T, P] log return over bars t-n .. t (NaN while t < n)."""
    out = np.full(logc.shape, np.nan)
    out[n:] = logc[n:] - logc[:-n]
    return out


def _rolling_std(r1: np.ndarray, n: int) -> np.ndarray:
    """[T, P] std (ddof 1, as pandas) of the 1-bar log returns of bars t-n+1 .. t (NaN until n exist)."""
    return pd.DataFrame(r1).rolling(n).std().to_numpy()


def signal(family: str, timestamps: np.ndarray, close: np.ndarray, params: PlantParams = PlantParams()) -> np.ndarray:
    """p [T, P] in {-1, 0, +1}: the family's forecast, made at the close of bar t from bars <= t, of the
    drift's sign over bar t+1 (see the module doc). `close` [T, P] (pairs in order, the leader first)."""
    check_family(family)
    close = np.asarray(close, dtype=np.float64)
    if close.ndim == 1:
        close = close[:, None]
    ts = np.asarray(timestamps, dtype=np.int64)
    logc = np.log(close)
    T, P = close.shape
    if family == "calendar":
        hour_next = ((ts + HOUR_MS) // HOUR_MS) % 24
        up = (hour_next - params.start_hour) % 24 < 12
        return np.repeat(np.where(up, 1.0, -1.0)[:, None], P, axis=1)
    if family in ("lead_lag", "momentum"):
        ret = _past_return(logc, params.lookback)
        p = np.nan_to_num(np.sign(ret), nan=0.0)
        if family == "lead_lag":
            p = np.repeat(p[:, :1], P, axis=1)
            p[:, 0] = 0.0  # the leader is unplanted
        return p
    r1 = np.vstack([np.full((1, P), np.nan), np.diff(logc, axis=0)])
    if family == "vol_regime":
        fast, slow = _rolling_std(r1, params.fast), _rolling_std(r1, params.slow)
        p = np.where(fast > slow, 1.0, -1.0)
        return np.where(np.isfinite(fast) & np.isfinite(slow), p, 0.0)
    # reversion
    r4 = _past_return(logc, 4)
    scale = _rolling_std(r1, params.scale_bars) * 2.0
    large = np.isfinite(r4) & np.isfinite(scale) & (scale > 0) & (np.abs(r4) > params.threshold * scale)
    p = np.zeros((T, P))
    last_sign = np.zeros(P)
    last_bar = np.full(P, -(10 ** 9))
    for t in range(T):  # the latest large move at or before t, if within `hold` bars
        hit = large[t]
        last_sign = np.where(hit, -np.sign(r4[t]), last_sign)
        last_bar = np.where(hit, t, last_bar)
        p[t] = np.where(t - last_bar < params.hold, last_sign, 0.0)
    return p


def drift(family: str, strength: float, timestamps: np.ndarray, close: np.ndarray,
          params: PlantParams = PlantParams()) -> np.ndarray:
    """a [T, P]: the log drift of each bar, a[t] = k * p[t-1] (a[0] = 0), k = REFERENCE_DRIFT * strength."""
    p = signal(family, timestamps, close, params)
    k = REFERENCE_DRIFT[family] * float(strength)
    a = np.zeros_like(p)
    a[1:] = k * p[:-1]
    return a


def apply_drift(open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
                a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The planted OHLC (the module doc's formulas) of candles [T] or [T, P] under drift a (same shape)."""
    A = np.cumsum(a, axis=0)
    A_prev = np.concatenate([np.zeros_like(A[:1]), A[:-1]])
    return (open_ * np.exp(A_prev), high * np.exp(np.maximum(A_prev, A)), low * np.exp(np.minimum(A_prev, A)),
            close * np.exp(A))


def _asof_cumulative(primary_ts: np.ndarray, A: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A[t-1], A[t]) of the primary's bar t opening at or before each of `ts` (0 before the first bar)."""
    row = np.searchsorted(primary_ts, ts, side="right") - 1
    before = row < 0
    safe = row.clip(min=0)
    A_prev = np.concatenate([[0.0], A[:-1]])
    return np.where(before, 0.0, A_prev[safe]), np.where(before, 0.0, A[safe])


@dataclass(frozen=True)
class Plant:
    """One planted market: a family at a strength (0 = the real candles), with its signal parameters."""

    family: str
    strength: float
    params: PlantParams = PlantParams()

    @property
    def name(self) -> str:
        return f"{self.family}-{self.strength:g}"


def build_planted_dir(out_dir: str | Path, plant: Plant, *, pairs: list[str] | None = None, exchange: str = "binance",
                      second_exchange: str = "coinbase", second_quote: str = "USD", timeframe: str = "1h",
                      source_dir: str | Path | None = None) -> Path:
    """Write the planted candles of `pairs` on `exchange` (and the same coins on the second venue, where its
    files exist) into `out_dir`, with plant.json describing the transform. The source is `source_dir` (None:
    the bundled candles). The primary pairs must share their timestamps (the bundled ones do); the leader of
    lead_lag is the first pair."""
    check_family(plant.family)
    source = bundled_dir() if source_dir is None else Path(source_dir)
    pairs = list(pairs or DEFAULT_PAIRS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    for pair in pairs:
        path = find_candle_file(source, exchange, pair, timeframe)
        if path is None:
            raise InputError(f"no candles for {pair} on {exchange} {timeframe} in {source}")
        frames.append(read_candles(path))
    ts = frames[0]["timestamp"].to_numpy(np.int64)
    for pair, frame in zip(pairs, frames):
        if not np.array_equal(frame["timestamp"].to_numpy(np.int64), ts):
            raise InputError(f"{pair}'s candles do not share {pairs[0]}'s timestamps; accepted: aligned files")
    close = np.stack([f["close"].to_numpy(np.float64) for f in frames], axis=1)
    a = drift(plant.family, plant.strength, ts, close, plant.params)
    A = np.cumsum(a, axis=0)
    for j, (pair, frame) in enumerate(zip(pairs, frames)):
        o, h, lo, c = apply_drift(*(frame[col].to_numpy(np.float64) for col in ("open", "high", "low", "close")),
                                  a[:, j])
        write_candles(frame.assign(open=o, high=h, low=lo, close=c), out / candle_filename(exchange, pair, timeframe))
        symbol = second_venue_pair(pair, second_quote)
        vpath = find_candle_file(source, second_exchange, symbol, timeframe)
        if vpath is None:
            continue
        venue = read_candles(vpath)
        A_prev, A_cur = _asof_cumulative(ts, A[:, j], venue["timestamp"].to_numpy(np.int64))
        factors = {"open": np.exp(A_prev), "high": np.exp(np.maximum(A_prev, A_cur)),
                   "low": np.exp(np.minimum(A_prev, A_cur)), "close": np.exp(A_cur)}
        write_candles(venue.assign(**{col: venue[col].to_numpy(np.float64) * f for col, f in factors.items()}),
                      out / candle_filename(second_exchange, symbol, timeframe))
    net = {pair: float(A[-1, j]) for j, pair in enumerate(pairs)}
    meta = {"family": plant.family, "strength": plant.strength, "drift_per_bar": REFERENCE_DRIFT[plant.family]
            * plant.strength, "params": asdict(plant.params), "pairs": pairs, "exchange": exchange,
            "second_venue": f"{second_exchange}/{second_quote}", "source": str(source),
            "net_log_drift": net, "active_share": float((a != 0).mean())}
    (out / "plant.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
