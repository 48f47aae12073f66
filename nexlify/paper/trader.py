"""The paper trader's decision path: the environment and the greedy policy of `nexlify evaluate`, one closed
bar at a time.

A session trades each of the model's pairs in its own single-pair portfolio (like `nexlify evaluate`: one
episode row per pair). Its first decision is at the close of the first bar it sees closed (bar D); that is
`nexlify evaluate --start <open of bar D+1>`'s first decision too. Then, at the close of every later bar u:

1. the candles of bar u join the session's history (a candle missing on the exchange after the retries
   is held like the candle files hold a gap: the previous close, volume 0, not tradable; the environment
   fills nothing on it, and no decision is taken at it: hold);
2. the market tensors are built over the history from the warm-up anchor to bar u, with the features
   computed over that history (nexlify.features.compute_features, causal: the values at bars <= u are those
   a longer history gives, bit for bit) and the checkpoint's normaliser;
3. a BatchedTradingEnv over them takes the state the previous bar left (nexlify.env.fused_portfolio.
   copy_step_state) and steps once with the actions decided at the close of bar u-1: fills at bar u's open
   with fee and slippage, stops and targets inside bar u, marks at its close, every risk rule, each
   strategy the model was trained with;
4. the greedy policy (nexlify.evaluation.greedy_policy, the checkpoint's hold margin) decides at the close
   of bar u on the observation the step returned.

The warm-up anchor is WARMUP_DAYS days before the open of bar D+1, as `nexlify evaluate` reads candles from
WARMUP_DAYS before --start: the features, so the observations, decisions and fills, are `nexlify
evaluate`'s on the same candles (tests/test_paper.py holds them to it bar for bar).

Each bar yields one journal line (a dict; controller.paper.journal writes it): the candles, the fills of the
step, each pair's equity, the observation's sha256, the Q-values, the valid actions and the action.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import torch

from nexlify.agent import build_model
from nexlify.config import TrainConfig
from nexlify.configtools import to_dict
from nexlify.data.candles import normalize_pair
from nexlify.data.timeframes import MS_PER_DAY, iso_utc, timeframe_ms
from nexlify.env.batched import ACTION_NAMES, HOLD, N_ACTIONS, BatchedTradingEnv
from nexlify.env.fused_portfolio import copy_step_state
from nexlify.env.market import MarketTensors
from nexlify.errors import InputError
from nexlify.evaluate_cmd import WARMUP_DAYS
from nexlify.evaluation import greedy_policy
from nexlify.features import WARMUP_BARS, Normalizer, compute_features

FIELDS = ("open", "high", "low", "close", "volume")


def warmup_bars(tf_ms: int) -> int:
    """Bars of history before the first decision bar's successor: WARMUP_DAYS days (nexlify evaluate's)."""
    return WARMUP_DAYS * MS_PER_DAY // tf_ms


def canonical_json(value) -> bytes:
    """The one byte form of a journal line or a hashed config: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def config_sha256(cfg: TrainConfig) -> str:
    return hashlib.sha256(canonical_json(to_dict(cfg))).hexdigest()


def history_arrays(timestamps: list[int], rows: list[np.ndarray]) -> SimpleNamespace:
    """The session's candles as the environment's market arrays ([T] and [T, P]): a missing candle (NaN row)
    becomes the previous close with volume 0 and tradable False, as nexlify.data.candles.fill_gaps holds a
    gap (the first bar of the history has a real candle: the warm-up starts at one)."""
    ohlcv = np.stack(rows)  # [T, P, 5]
    missing = np.isnan(ohlcv).any(-1)
    close = ohlcv[..., 3].copy()
    for t in range(1, close.shape[0]):
        close[t] = np.where(missing[t], close[t - 1], close[t])
    out = {"timestamps": np.asarray(timestamps, dtype=np.int64), "close": close,
           "tradable": ~missing, "volume": np.where(missing, 0.0, ohlcv[..., 4])}
    for j, name in enumerate(FIELDS[:3]):
        out[name] = np.where(missing, close, ohlcv[..., j])
    return SimpleNamespace(**out)


class PaperTrader:
    """One paper session's state: the candles since the warm-up anchor, the environment after the last closed
    bar, and the actions decided at its close. `start` takes the warm-up history and decides at its last bar;
    `advance` takes each later bar, steps and decides. Both return the bar's journal line."""

    def __init__(self, ckpt: dict, cfg: TrainConfig, *, checkpoint_sha256: str, device: str = "cpu") -> None:
        if "arbitrage" in cfg.env.strategies:
            raise InputError("the model trades the arbitrage strategy, which needs a second venue's candles; "
                             "paper trading reads one exchange; accepted: a model trained without arbitrage")
        self.cfg = cfg
        self.device = torch.device(device)
        self.pairs = [normalize_pair(p) for p in cfg.data.pairs]
        self.tf_ms = timeframe_ms(cfg.data.timeframe)
        self.n_warmup = warmup_bars(self.tf_ms)
        if self.n_warmup <= WARMUP_BARS:
            raise InputError(f"timeframe {cfg.data.timeframe}: {WARMUP_DAYS} days hold {self.n_warmup} bars, not "
                             f"more than the {WARMUP_BARS}-bar feature warm-up; accepted: 1h or shorter")
        self.normalizer = Normalizer.from_dict(ckpt["normalizer"])
        n_features = len(self.normalizer.features)
        self.model = build_model(cfg.agent, n_features, ckpt["model_state_dict"]).to(self.device)
        self.model.eval()
        self.policy = greedy_policy(self.model, cfg.agent.hold_margin)
        self.checkpoint_sha256 = checkpoint_sha256
        self.config_sha256 = config_sha256(cfg)
        P = len(self.pairs)
        self.pair_idx = torch.arange(P, dtype=torch.int64, device=self.device).unsqueeze(1)  # one row per pair
        self.timestamps: list[int] = []
        self.rows: list[np.ndarray] = []
        self.env: BatchedTradingEnv | None = None
        self.first_bar = -1  # index of bar D in the history
        self.actions: torch.Tensor | None = None  # decided at the close of the last bar, [P, 1]

    # ------------------------------------------------------------------------------------------------------

    @property
    def last_ms(self) -> int | None:
        return self.timestamps[-1] if self.timestamps else None

    def market(self) -> MarketTensors:
        """The market tensors over the history (features over it, the checkpoint's normaliser)."""
        h = history_arrays(self.timestamps, self.rows)
        h.pairs = list(self.pairs)
        h.second_venue = None
        raw = compute_features(h.timestamps, h.open, h.high, h.low, h.close, h.volume, h.tradable,
                               market=list(range(len(self.pairs))))
        return MarketTensors.build(h, self.normalizer, self.device, raw)

    def start(self, timestamps: list[int], rows: list[np.ndarray]) -> dict:
        """The warm-up history, its last bar being bar D (the first decision); the decision at D's close."""
        if len(timestamps) != self.n_warmup:
            raise ValueError(f"the warm-up holds {self.n_warmup} bars, not {len(timestamps)}")
        if np.isnan(rows[0]).any():
            raise ValueError("the warm-up's first bar has no candle")
        self.timestamps, self.rows = list(timestamps), [np.asarray(r, dtype=np.float64) for r in rows]
        self.first_bar = len(self.timestamps) - 1
        env_cfg = self.cfg.env
        start = torch.full((len(self.pairs),), self.first_bar, dtype=torch.int64, device=self.device)
        self.env = BatchedTradingEnv(self.market(), self.pair_idx, start, 0, env_cfg, self.cfg.risk,
                                     self.cfg.strategy_params())
        obs = self.env.reset()
        return self._decide(obs, fills=None)

    def advance(self, ts: int, row: np.ndarray) -> dict:
        """Bar `ts` (the next on the grid) closed with candles `row` [P, 5] (a NaN row: missing after the
        retries): step with the actions decided at the previous close, then decide at this one."""
        assert self.env is not None and self.actions is not None, "start the session first"
        if ts != self.timestamps[-1] + self.tf_ms:
            raise ValueError(f"bar {iso_utc(ts)} is not the one after {iso_utc(self.timestamps[-1])}")
        self.timestamps.append(int(ts))
        self.rows.append(np.asarray(row, dtype=np.float64))
        prev = self.env
        n_steps = len(self.timestamps) - 1 - self.first_bar
        start = torch.full((len(self.pairs),), self.first_bar, dtype=torch.int64, device=self.device)
        env = BatchedTradingEnv(self.market(), self.pair_idx, start, n_steps, self.cfg.env, self.cfg.risk,
                                self.cfg.strategy_params())
        copy_step_state(prev, env)
        before = _book(env)
        valid = env.mask.gather(-1, self.actions.unsqueeze(-1)).squeeze(-1)
        taken = torch.where(valid, self.actions, HOLD)
        obs, _, _ = env.step(self.actions)
        self.env = env
        return self._decide(obs, fills=_fills(before, _book(env), taken, self.pairs))

    @torch.no_grad()
    def _decide(self, obs: torch.Tensor, fills: dict | None) -> dict:
        env = self.env
        mask = env.mask
        P = len(self.pairs)
        actions = self.policy(obs, mask, env, slice(0, P))
        q = self.model(obs)
        missing = np.isnan(self.rows[-1]).any(-1)
        skipped = [p for j, p in enumerate(self.pairs) if missing[j]]
        if skipped:  # no decision on a bar whose candle never came: hold
            actions = torch.where(torch.as_tensor(missing, device=self.device).unsqueeze(1),
                                  torch.full_like(actions, HOLD), actions)
        self.actions = actions
        ts = self.timestamps[-1]
        row = self.rows[-1]
        equity = env.equity.to(torch.float64).cpu().numpy()
        line = {
            "bar": iso_utc(ts),
            "open_ms": int(ts),
            "candles": {p: (None if missing[j] else [float(x) for x in row[j]]) for j, p in enumerate(self.pairs)},
            "fills": fills,
            "equity": {p: float(equity[j]) for j, p in enumerate(self.pairs)},
            "book_equity": float(equity.sum()),
            "observation_sha256": hashlib.sha256(obs.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
            "q": {p: [float(x) for x in q[j, 0].cpu().tolist()] for j, p in enumerate(self.pairs)},
            "valid": {p: [ACTION_NAMES[a] for a in range(N_ACTIONS) if bool(mask[j, 0, a])]
                      for j, p in enumerate(self.pairs)},
            "action": {p: ACTION_NAMES[int(actions[j, 0])] for j, p in enumerate(self.pairs)},
            "skipped": skipped,
            "checkpoint_sha256": self.checkpoint_sha256,
            "config_sha256": self.config_sha256,
        }
        return line

    def exposure(self) -> float:
        """The share of the book's equity held outside cash at the last close."""
        env = self.env
        equity = float(env.equity.sum())
        return float((env.equity - env.cash).sum()) / equity if equity > 0 else 0.0


def _book(env: BatchedTradingEnv) -> dict[str, np.ndarray]:
    """What a step's fills change, per pair row: cash, free coins, the entry price, costs and closed trades."""
    return {"cash": env.cash.to(torch.float64).cpu().numpy().copy(),
            "units": env.units[:, 0].to(torch.float64).cpu().numpy().copy(),
            "entry": env.entry[:, 0].to(torch.float64).cpu().numpy().copy(),
            "costs": env.stats.costs.to(torch.float64).cpu().numpy().copy(),
            "trades": env.stats.trades.cpu().numpy().copy(),
            "in_position": env.in_position[:, 0].cpu().numpy().copy()}


def _fills(before: dict, after: dict, taken: torch.Tensor, pairs: list[str]) -> dict:
    """Per pair: the action the step carried out (an invalid one is hold), the coins and cash before and after,
    the costs paid and the trades closed in the bar, and the entry price when it opened a trade."""
    out = {}
    for j, p in enumerate(pairs):
        opened = bool(after["in_position"][j]) and not bool(before["in_position"][j])
        out[p] = {"action": ACTION_NAMES[int(taken[j, 0])],
                  "units": [float(before["units"][j]), float(after["units"][j])],
                  "cash": [float(before["cash"][j]), float(after["cash"][j])],
                  "costs": float(after["costs"][j] - before["costs"][j]),
                  "trades_closed": int(after["trades"][j] - before["trades"][j]),
                  "position": bool(after["in_position"][j]),
                  "entry_price": float(after["entry"][j]) if opened else None}
    return out
