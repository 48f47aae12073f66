"""Greedy evaluation of a Q-network on a window of bars, one single-pair portfolio per pair."""

from __future__ import annotations

import numpy as np
import torch

from nexlify.agent.dqn import NEG_INF
from nexlify.config import EnvConfig, RiskConfig
from nexlify.env.batched import BatchedTradingEnv
from nexlify.env.market import MarketTensors
from nexlify.features import WARMUP_BARS
from nexlify.metrics import average_metrics, pair_metrics, sharpe_from_sums
from nexlify.strategies.params import StrategyParams


@torch.no_grad()
def evaluate_policy(model: torch.nn.Module, market: MarketTensors, window: tuple[int, int], env_cfg: EnvConfig,
                    risk_cfg: RiskConfig, strategy_params: StrategyParams | None = None) -> dict:
    """Run the greedy policy over bars [i0, i1): the first decision is at the close of bar i0-1 (so the
    first fill is at i0's open) and the last fill at bar i1-1. Each pair trades in its own portfolio;
    all pairs step together as a batch. Returns average metrics, score and the per-pair table, each pair
    with its PnL broken down by source (`pnl_breakdown`, quote currency)."""
    i0, i1 = window
    if i0 - 1 < WARMUP_BARS:
        raise ValueError(f"evaluation window starts at bar {i0}, inside the {WARMUP_BARS}-bar feature warm-up")
    n_pairs = len(market.pairs)
    device = market.prices.device
    pair_idx = torch.arange(n_pairs, device=device).unsqueeze(1)
    start = torch.full((n_pairs,), i0 - 1, dtype=torch.int64, device=device)
    env = BatchedTradingEnv(market, pair_idx, start, i1 - i0, env_cfg, risk_cfg, strategy_params)
    obs = env.reset()
    was_training = model.training
    model.eval()
    done = False
    while not done:
        q = model(obs)
        actions = torch.where(env.mask, q, NEG_INF).argmax(dim=-1)
        obs, _, done = env.step(actions)
    model.train(was_training)
    st = env.stats
    per_pair = {}
    for i, pair in enumerate(market.pairs):
        per_pair[pair] = pair_metrics(float(st.equity[i]), st.initial_equity, float(st.ret_sum[i]),
                                      float(st.ret_sq_sum[i]), st.n_returns, float(st.max_drawdown[i]),
                                      int(st.trades[i]), int(st.wins[i]), pnl_breakdown=st.pnl_breakdown(i))
        per_pair[pair]["costs_paid"] = float(st.costs[i])
    return average_metrics(per_pair)


def buy_and_hold(market: MarketTensors, window: tuple[int, int]) -> dict[str, dict]:
    """Holding each coin from the open of bar i0 to the close of bar i1-1 (no fees): the yardstick."""
    i0, i1 = window
    closes = market.prices[i0:i1, :, 3].cpu().numpy()
    first_open = market.prices[i0, :, 0].cpu().numpy()
    path = np.vstack([first_open[None, :], closes])
    rets = path[1:] / path[:-1] - 1.0
    peak = np.maximum.accumulate(path, axis=0)
    max_dd = (1.0 - path / peak).max(axis=0)
    out = {}
    for i, pair in enumerate(market.pairs):
        out[pair] = {
            "total_return": float((path[-1, i] / path[0, i] - 1.0) * 100.0),
            "sharpe": sharpe_from_sums(float(rets[:, i].sum()), float((rets[:, i] ** 2).sum()), rets.shape[0]),
            "max_drawdown": float(max_dd[i] * 100.0),
        }
    return out
