"""Is there a tradeable signal in the agent's observation at all? A supervised check beside the RL (its pieces:
nexlify.signal_policy, which `nexlify bench learn` also runs on each planted market).

For each walk-forward fold (the test windows of `nexlify backtest --walk-forward --start 2022-06-01
--end 2025-06-01 --train-days 730 --fold-days 90 --folds 4` unless told otherwise), a ridge regression of
each pair's forward log return over h bars on the environment's own per-bar features (nexlify.features:
bars <= t only, standardised with the training rows' statistics) is fitted on the training window only:

1. Signal: its information coefficient (rank correlation of prediction and outcome) in sample and on the
   test window, and, in the cost world of the environment (a round trip costs two fees and two
   slippages), the mean net return of the bars where the prediction clears the cost against that of all
   bars.
2. Trading it: a forecast policy in the environment itself (nexlify.evaluation._simulate, the default
   config: the same costs, risk rules, sizing and lending sweep as the agent): OPEN_LONG where the
   prediction clears `k` round trips, CLOSE where it falls below minus one, else hold. `k` is chosen on
   the validation window (the last val_days before the test window, predictions fitted on the bars before
   it), then the forecaster is refitted on everything before the test window and stepped through it.
   Its test return and Sharpe vs lending are printed beside cash plus lending's.

If the features predict returns out of sample but the forecast policy does not beat cash plus lending, the
signal is smaller than the costs under the risk rules, whatever learner reads the same features.

Usage (from the repository root; a study, it reads ../shared/data):
    PYTHONPATH=. python tools/signal-study.py [--data-dir ../shared/data] [--horizons 1 4 24 72]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import torch

from controller.backtest import WalkForwardConfig, plan_folds
from nexlify.config import TrainConfig
from nexlify.data.candles import load_market
from nexlify.data.timeframes import MS_PER_DAY, iso_utc, parse_utc_ms
from nexlify.env.market import MarketTensors
from nexlify.evaluation import riskless_total_return
from nexlify.features import FEATURE_NAMES, WARMUP_BARS, Normalizer, compute_features
from nexlify.signal_policy import THRESHOLDS, Forecaster, round_trip_cost, rows, trade

TRADED_HORIZONS = (4, 24)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (average ranks for ties)."""
    return float(np.corrcoef(pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy())[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--start", default="2022-06-01")
    ap.add_argument("--end", default="2025-06-01")
    ap.add_argument("--train-days", type=int, default=730)
    ap.add_argument("--val-days", type=int, default=90)
    ap.add_argument("--fold-days", type=int, default=90)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--horizons", nargs="+", type=int, default=[1, 4, 24, 72])
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = TrainConfig()
    params = cfg.strategy_params()
    cost = round_trip_cost(cfg)
    market = load_market(cfg.data.exchange, cfg.data.pairs, "1h", args.data_dir, args.start, args.end)
    feats = compute_features(market.timestamps, market.open, market.high, market.low, market.close,
                             market.volume, market.tradable).astype(np.float64)
    logc, tradable, ts = np.log(market.close), market.tradable, market.timestamps
    # the environment's observations are not read by the forecast policy; any normaliser will do
    tensors = MarketTensors.build(market, Normalizer.fit(feats, WARMUP_BARS, len(ts)), "cpu", feats)
    bar = lambda iso: int(np.searchsorted(ts, parse_utc_ms(iso)))  # noqa: E731 - the row of a fold date
    folds = plan_folds(args.start, args.end, WalkForwardConfig(fold_days=args.fold_days, folds=args.folds,
                                                               train_days=args.train_days), val_days=args.val_days)

    signal, traded = [], []
    for f in folds:  # the walk-forward's own fold dates (controller.backtest.plan_folds)
        fold, test = f.index, [f.test_start, f.test_end]
        te_lo, te_hi = bar(f.test_start), bar(f.test_end)
        va_lo = bar(iso_utc(parse_utc_ms(f.test_start) - args.val_days * MS_PER_DAY))
        tr_lo = max(WARMUP_BARS, bar(f.train_start))
        lending = riskless_total_return(tensors, (te_lo, te_hi), params)
        for h in args.horizons:
            fc = Forecaster(feats, logc, tradable, tr_lo, te_lo, h)
            x_te, y_te = rows(feats, logc, tradable, te_lo, te_hi, h)
            p_te = fc.predict(x_te)
            enter = p_te > cost
            row = {"fold": fold, "test": test, "h": h,
                   "ic_train": spearman(fc.fitted, fc.y), "ic_test": spearman(p_te, y_te),
                   "clearing_cost": int(enter.sum()), "of": int(enter.size),
                   "net_mean_pct_when_clearing": float((y_te[enter] - cost).mean() * 100) if enter.any() else None,
                   "net_mean_pct_all": float((y_te - cost).mean() * 100),
                   "top_features": [FEATURE_NAMES[i] for i in np.argsort(-np.abs(fc.w[:-1]))[:3]]}
            signal.append(row)
            print(json.dumps(row), flush=True)
        for h in TRADED_HORIZONS:
            on_val = Forecaster(feats, logc, tradable, tr_lo, va_lo, h)
            val = {k: trade(on_val, feats, tensors, k, (va_lo, te_lo), cfg)["avg_return"] for k in THRESHOLDS}
            k = max(THRESHOLDS, key=lambda t: val[t])
            res = trade(Forecaster(feats, logc, tradable, tr_lo, te_lo, h), feats, tensors, k, (te_lo, te_hi), cfg)
            row = {"fold": fold, "test": test, "h": h, "val_return": val, "chosen_k": k,
                   "test_return": res["avg_return"], "test_sharpe_vs_lending": res["avg_sharpe_vs_lending"],
                   "trades": res["total_trades"], "cash_plus_lending": lending}
            traded.append(row)
            print(json.dumps(row), flush=True)
    for h in args.horizons:
        r = [s for s in signal if s["h"] == h]
        print(json.dumps({"h": h, "mean_ic_train": float(np.mean([s["ic_train"] for s in r])),
                          "mean_ic_test": float(np.mean([s["ic_test"] for s in r])),
                          "ic_test_by_fold": [round(s["ic_test"], 3) for s in r]}), flush=True)
    for h in TRADED_HORIZONS:
        r = [s for s in traded if s["h"] == h]
        print(json.dumps({
            "forecast_policy_h": h, "test_return_by_fold": [round(s["test_return"], 3) for s in r],
            "cash_plus_lending_by_fold": [round(s["cash_plus_lending"], 3) for s in r],
            "folds_beating_lending_on_return": sum(s["test_return"] > s["cash_plus_lending"] + 1e-6 for s in r),
            "folds_beating_lending_on_sharpe": sum(s["test_sharpe_vs_lending"] > 0 for s in r),
        }), flush=True)


if __name__ == "__main__":
    main()
