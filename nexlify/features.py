"""Per-bar market features, computed once for the whole series from the candles alone.

Every feature at bar t uses only bars <= t (rolling windows look backwards; EWMs are causal), so an
observation at the close of bar t never sees the future. Features do not depend on the episode, so the
environment computes them once and indexes them by each episode's cursor.

Besides each pair's own history, four features describe the market around it and are the same for every pair
at a bar: the mean over the pairs of the 24 h and 168 h log returns (mkt_ret_*) and the first pair's 1 h and
24 h log returns (lead_ret_*; BTC/USDT in the default pair order). Added by evidence (the walk-forward in
docs/studies.md): with them the models each fold tried averaged 0.47 % and 0.43 % on the folds' test
windows over two sets of seeds, against 0.30 % and 0.19 % without.
They are computed over the pairs a model was trained on (`compute_features(..., market=...)`): `nexlify
evaluate --pairs` with other pairs still reads the training pairs' candles for them, so a pair's observation
means what it meant in training.

Normalisation statistics (mean and standard deviation per feature, pooled over pairs so that one
network serves any pair) are fitted on training bars only and travel inside every checkpoint with the
features' names, so a checkpoint fitted before a feature was added keeps seeing its own columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from nexlify.errors import InputError

RETURN_HORIZONS = (1, 4, 12, 24, 72, 168)
WARMUP_BARS = 200  # longest lookback (168) plus the slow EWMs' settling time

MARKET_FEATURES = ("mkt_ret_24h", "mkt_ret_168h", "lead_ret_1h", "lead_ret_24h")  # they depend on the pairs traded
FEATURE_NAMES = (
    [f"ret_{h}h" for h in RETURN_HORIZONS]
    + ["vol_24h", "vol_168h", "volume_z_168h", "rsi_14", "macd", "macd_hist", "bar_range", "close_in_bar",
       "dist_high_168h", "dist_low_168h", "hour_sin", "hour_cos", "tradable",
       *MARKET_FEATURES]
)


def _rsi(close: pd.DataFrame, period: int = 14) -> pd.DataFrame:
    """Wilder's RSI, rescaled from [0, 100] to [-1, 1]."""
    delta = close.diff()
    gain = delta.clip(lower=0.0).ewm(alpha=1.0 / period, adjust=False).mean()
    loss = (-delta).clip(lower=0.0).ewm(alpha=1.0 / period, adjust=False).mean()
    rs = gain / loss.replace(0.0, np.nan)
    rsi = 100.0 - 100.0 / (1.0 + rs)
    rsi = rsi.where(loss > 0, 100.0)  # no losses in the window: RSI is 100 by definition
    return (rsi - 50.0) / 50.0


def compute_features(
    timestamps: np.ndarray, open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
    volume: np.ndarray, tradable: np.ndarray, market: list[int] | None = None,
) -> np.ndarray:
    """Features shaped [T, P, F] (float32), in FEATURE_NAMES order. Bars before WARMUP_BARS hold zeros
    where a window is not yet full; episodes start after the warm-up. `market`: the columns whose pairs make
    the market features (their mean; the first of them leads), by default every column in order."""
    market = list(range(close.shape[1])) if market is None else list(market)
    c = pd.DataFrame(close)
    h = pd.DataFrame(high)
    lo = pd.DataFrame(low)
    logc = np.log(c)
    r1 = logc.diff()
    out = []
    for hz in RETURN_HORIZONS:
        out.append(logc - logc.shift(hz))
    out.append(r1.rolling(24).std())
    out.append(r1.rolling(168).std())
    logv = np.log1p(pd.DataFrame(volume))
    out.append((logv - logv.rolling(168).mean()) / logv.rolling(168).std().replace(0.0, np.nan))
    out.append(_rsi(c))
    ema12 = c.ewm(span=12, adjust=False).mean()
    ema26 = c.ewm(span=26, adjust=False).mean()
    macd = (ema12 - ema26) / c
    out.append(macd)
    out.append(macd - macd.ewm(span=9, adjust=False).mean())
    out.append((h - lo) / c)
    out.append(((c - lo) / (h - lo).replace(0.0, np.nan)).fillna(0.5))
    out.append(c / h.rolling(168).max() - 1.0)
    out.append(c / lo.rolling(168).min() - 1.0)
    hour = (np.asarray(timestamps) // 3_600_000) % 24
    angle = 2.0 * np.pi * hour / 24.0
    n_pairs = close.shape[1]
    out.append(pd.DataFrame(np.repeat(np.sin(angle)[:, None], n_pairs, axis=1)))
    out.append(pd.DataFrame(np.repeat(np.cos(angle)[:, None], n_pairs, axis=1)))
    out.append(pd.DataFrame(tradable.astype(np.float64)))
    # the market around the pair: the mean over the pairs of the 24 h and 168 h log returns, and the first
    # pair's (BTC's) 1 h and 24 h returns, the same for every pair at a bar (bars <= t only)
    for hz in (24, 168):
        mean = (logc[market] - logc[market].shift(hz)).mean(axis=1).to_numpy()
        out.append(pd.DataFrame(np.repeat(mean[:, None], n_pairs, axis=1)))
    lead_col = market[0]
    for hz in (1, 24):
        lead = (logc[lead_col] - logc[lead_col].shift(hz)).to_numpy()
        out.append(pd.DataFrame(np.repeat(lead[:, None], n_pairs, axis=1)))
    stacked = np.stack([f.to_numpy(dtype=np.float64) for f in out], axis=-1)
    return np.nan_to_num(stacked, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


@dataclass
class Normalizer:
    """Feature-wise affine map fitted on training bars; stored in checkpoints as plain lists with the names of
    the features it was fitted on. `apply` takes the full feature array (FEATURE_NAMES) and returns the named
    columns only, so a checkpoint fitted before features were added still sees exactly its own."""

    mean: list[float]
    std: list[float]
    features: list[str] | None = None  # None: the first len(mean) of FEATURE_NAMES

    def __post_init__(self) -> None:
        if self.features is None:
            self.features = list(FEATURE_NAMES[:len(self.mean)])

    @classmethod
    def fit(cls, features: np.ndarray, train_start: int, train_end: int) -> "Normalizer":
        window = features[train_start:train_end].reshape(-1, features.shape[-1]).astype(np.float64)
        mean = window.mean(axis=0)
        std = window.std(axis=0)
        std = np.where(std < 1e-8, 1.0, std)
        return cls(mean=mean.tolist(), std=std.tolist())

    def apply(self, features: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        if list(self.features) != list(FEATURE_NAMES):
            features = features[..., [FEATURE_NAMES.index(name) for name in self.features]]
        return np.clip((features - mean) / std, -10.0, 10.0).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "features": list(self.features)}

    @classmethod
    def from_dict(cls, data: dict) -> "Normalizer":
        """A stored normaliser; one without names (the oldest) was fitted on the first len(mean) features, and
        a name this version does not compute is refused (InputError naming it)."""
        names = list(data.get("features") or FEATURE_NAMES[:len(data["mean"])])
        unknown = [n for n in names if n not in FEATURE_NAMES]
        if unknown or len(names) != len(data["mean"]):
            raise InputError(f"checkpoint normaliser features {unknown or names} are not among this version's "
                             f"{list(FEATURE_NAMES)}; accepted: a checkpoint of this or an earlier version")
        return cls(mean=[float(x) for x in data["mean"]], std=[float(x) for x in data["std"]], features=names)
