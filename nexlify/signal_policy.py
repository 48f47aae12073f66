"""The signal study's forecast policy: is a signal in the agent's features at all, and does a plain rule trade it?

A ridge regression of each pair's forward log return over `h` bars on the environment's own per-bar features
(nexlify.features: bars <= t only), standardised with its training rows' statistics, fitted on the training
window only. Traded in the environment itself (nexlify.evaluation._simulate: the same costs, risk rules,
sizing and lending sweep as the agent): OPEN_LONG where the prediction clears `k` round trips of costs, CLOSE
where it falls below minus one round trip, else hold. The horizon and `k` are chosen on the validation window
(forecasts fitted on the bars before it), then the forecaster is refitted on every bar before the test window
and stepped through it.

`nexlify bench learn` prints it beside the learner: where the ridge policy harvests a planted edge and the
learner does not, the signal is seen in the features but the learner does not trade it; where neither does,
the edge is out of a linear forecast's reach at these costs. tools/signal-study.py uses the same pieces over
the walk-forward's folds.
"""

from __future__ import annotations

import numpy as np
import torch

from nexlify.config import TrainConfig
from nexlify.env.layout import CLOSE, HOLD, OPEN_LONG
from nexlify.env.market import MarketTensors

RIDGE = 1.0  # L2 penalty on the standardised features, per training row
THRESHOLDS = (1.0, 1.5, 2.0, 3.0)  # entry: the prediction clears this many round trips (chosen on validation)
HORIZONS = (4, 24)  # bars of the forecast return (chosen on validation)


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Weights (intercept last) of min |y - [x 1] w|^2 + lam * n * |w[:-1]|^2."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    reg = lam * len(x) * np.eye(xa.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(xa.T @ xa + reg, xa.T @ y)


def rows(feats: np.ndarray, logc: np.ndarray, tradable: np.ndarray, lo: int, hi: int, h: int):
    """(features, forward h-bar log return) of every (bar, pair) in [lo, hi - h) tradable at both ends: the
    last target ends at bar hi - 1, so nothing from [hi, ...) is seen."""
    t = np.arange(lo, hi - h)
    ok = tradable[t] & tradable[t + h]
    return feats[t][ok], (logc[t + h] - logc[t])[ok]


class Forecaster:
    """Ridge forecast of the h-bar log return fitted on bars [lo, hi); `predict` standardises with the
    training rows' statistics."""

    def __init__(self, feats: np.ndarray, logc: np.ndarray, tradable: np.ndarray, lo: int, hi: int, h: int):
        x, self.y = rows(feats, logc, tradable, lo, hi, h)
        self.mean, self.std = x.mean(axis=0), x.std(axis=0)
        self.std[self.std == 0] = 1.0
        self.w = ridge_fit(self._z(x), self.y, RIDGE)
        self.fitted = self.predict(x)

    def _z(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._z(x) @ self.w[:-1] + self.w[-1]


def forecast_policy(pred: torch.Tensor, enter: float, leave: float):
    """OPEN_LONG where the prediction at the decision bar is above `enter` (mask permitting), CLOSE where it
    is below `leave`, else hold; `pred` [T, P] holds each bar's prediction from its own features."""

    def act(obs, mask, env, rows_):
        p = pred[env.t[rows_].unsqueeze(-1), env._pair_bp[rows_]]
        out = torch.full(mask.shape[:-1], HOLD, dtype=torch.int64)
        out = torch.where((p > enter) & mask[..., OPEN_LONG], OPEN_LONG, out)
        return torch.where((p < leave) & mask[..., CLOSE], CLOSE, out)

    return act


def round_trip_cost(cfg: TrainConfig) -> float:
    """Two fees and two slippages, as a log return (near enough)."""
    return 2.0 * (cfg.env.fee + cfg.env.slippage_bps * 1e-4)


def trade(fc: Forecaster, feats: np.ndarray, tensors: MarketTensors, k: float, window: tuple[int, int],
          cfg: TrainConfig) -> dict:
    """The forecast policy of `fc` at entry `k` round trips, stepped over `window`: the environment's metrics."""
    from nexlify.evaluation import Group, _simulate

    cost = round_trip_cost(cfg)
    group = Group("forecast", forecast_policy(torch.as_tensor(fc.predict(feats)), k * cost, -cost))
    with torch.no_grad():
        return _simulate(tensors, window, cfg.env, cfg.risk, cfg.strategy_params(), [group], False)["results"]["forecast"]


def choose_and_test(feats: np.ndarray, logc: np.ndarray, tradable: np.ndarray, tensors: MarketTensors,
                    cfg: TrainConfig, fit_lo: int, val_lo: int, test_lo: int, test_hi: int) -> dict:
    """The horizon and entry threshold with the best validation return ([val_lo, test_lo), forecasts fitted on
    [fit_lo, val_lo)), then the forecaster refitted on [fit_lo, test_lo) and traded over [test_lo, test_hi):
    its test return (mean over pairs, %), trades and the choice."""
    on_val = {h: Forecaster(feats, logc, tradable, fit_lo, val_lo, h) for h in HORIZONS}  # one fit per horizon
    val = {(h, k): trade(on_val[h], feats, tensors, k, (val_lo, test_lo), cfg)["avg_return"]
           for h in HORIZONS for k in THRESHOLDS}
    h, k = max(val, key=lambda hk: (val[hk], -hk[0], -hk[1]))  # ties: the shorter horizon, the lower entry
    res = trade(Forecaster(feats, logc, tradable, fit_lo, test_lo, h), feats, tensors, k, (test_lo, test_hi), cfg)
    return {"return": res["avg_return"], "trades": res["total_trades"], "horizon": h, "entry_round_trips": k,
            "val_return": val[(h, k)]}
