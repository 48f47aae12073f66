"""Baseline policies, stepped through the same BatchedTradingEnv as the agent (nexlify.evaluation).

Each policy is a pure function of what the agent itself sees at the close of bar t (the action mask, the
portfolio's state, the closes of bars <= t) and returns one action per slot [B, P]. None of them looks
at a later bar, and each takes only actions the mask allows, so the environment's costs and risk rules
apply to them exactly as they apply to the agent.

- flat: always hold, with the lending strategy off (so no sweep lends its cash). Its return is exactly 0
  and its equity the initial equity.
- cash_plus_lending: LEND whenever the mask allows it, hold otherwise: with the sweep (AaveParams.sweep,
  the default) LEND is masked and holding lends; by hand, how much a LEND supplies is the environment's
  rule. With the lending strategy off in the model's config, the baseline runs with lending switched on
  (the only change; the output says so). The other baselines run in the model's environment: where it
  lends by the sweep, their idle cash is swept too, as the agent's is.
- buy_and_hold_sized: OPEN_LONG whenever flat and the mask allows it, under the model's own risk config
  (the per-trade cap, Kelly, stops, targets and the daily loss limit): "buy and hold at the risk budget".
- buy_and_hold_full: OPEN_LONG once, with all the equity: the risk config of `full_size_risk`.
- ma_crossover: long while the 50-bar mean of the closes is above the 200-bar mean (both of bars <= t):
  OPEN_LONG when the mask allows it, CLOSE when the fast mean falls to or below the slow one. Same risk
  config as the model, so stops can close it and it re-enters while the signal holds.
- random_valid: uniform over the valid actions (nexlify.agent.dqn.random_valid_actions), one seeded
  torch.Generator per seed; reported as the mean over RANDOM_SEEDS.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from nexlify.config import EnvConfig, RiskConfig
from nexlify.env.batched import CLOSE, HOLD, LEND, OPEN_LONG

FLAT, CASH_PLUS_LENDING, BUY_AND_HOLD_FULL, BUY_AND_HOLD_SIZED, MA_CROSSOVER, RANDOM_VALID = (
    "flat", "cash_plus_lending", "buy_and_hold_full", "buy_and_hold_sized", "ma_crossover", "random_valid")
BASELINES = (FLAT, CASH_PLUS_LENDING, BUY_AND_HOLD_FULL, BUY_AND_HOLD_SIZED, MA_CROSSOVER, RANDOM_VALID)
MA_FAST, MA_SLOW = 50, 200  # hours (bars of the 1h timeframe)
RANDOM_SEEDS = (0, 1, 2, 3, 4)


def flat(mask: Tensor) -> Tensor:
    """Hold everywhere: [B, P] int64."""
    return torch.full(mask.shape[:-1], HOLD, dtype=torch.int64, device=mask.device)


def take_lend(mask: Tensor) -> Tensor:
    """LEND wherever the mask allows it, else hold."""
    return torch.where(mask[..., LEND], LEND, HOLD).to(torch.int64)


def buy_when_flat(mask: Tensor) -> Tensor:
    """OPEN_LONG wherever the mask allows it (the mask allows it only on a flat slot), else hold."""
    return torch.where(mask[..., OPEN_LONG], OPEN_LONG, HOLD).to(torch.int64)


def ma_crossover(mask: Tensor, long_signal: Tensor) -> Tensor:
    """Long while `long_signal` [B, P] holds: OPEN_LONG where it holds and the mask allows an entry, CLOSE
    where it does not and the mask allows a close (a slot in a spot position), else hold."""
    act = torch.full(mask.shape[:-1], HOLD, dtype=torch.int64, device=mask.device)
    act = torch.where(long_signal & mask[..., OPEN_LONG], OPEN_LONG, act)
    return torch.where(~long_signal & mask[..., CLOSE], CLOSE, act)


def moving_average(closes: Tensor, n: int) -> Tensor:
    """Mean of the closes of bars t-n+1 .. t for every bar t [T, N] (float64); NaN for t < n-1. Bar t's
    value uses no bar after t (a prefix sum: changing a later close changes no earlier value)."""
    c = closes.to(torch.float64)
    csum = torch.cat([torch.zeros_like(c[:1]), c.cumsum(0)])  # csum[k] = sum of bars < k
    out = torch.full_like(c, float("nan"))
    if c.shape[0] >= n:
        out[n - 1:] = (csum[n:] - csum[:-n]) / n
    return out


def ma_long_signal(closes: Tensor, fast: int = MA_FAST, slow: int = MA_SLOW) -> Tensor:
    """[T, N] bool: the fast mean of the closes is above the slow one at bar t (False until both exist)."""
    f, s = moving_average(closes, fast), moving_average(closes, slow)
    return (f > s) & torch.isfinite(f) & torch.isfinite(s)  # NaN compares False; explicit for the reader


def full_size_risk(risk: RiskConfig) -> RiskConfig:
    """The risk config of buy-and-hold at full size: one position may take all the equity.

    Changed from the model's config: max_position = 1 and fixed_size = 1 (an order for all the equity;
    the environment scales an order that costs more than the cash down to the cash, so the entry fee and
    slippage come out of the position and nothing is left idle), kelly off, stop_loss, take_profit and
    trailing_stop 0 (off), daily_loss_limit 0 (off). Everything else (max_trades, the Kelly window) is the
    model's and unused."""
    return replace(risk, max_position=1.0, fixed_size=1.0, kelly=False, stop_loss=0.0, take_profit=0.0,
                   trailing_stop=0.0, daily_loss_limit=0.0)


def without_strategy(env_cfg: EnvConfig, strategy: str) -> EnvConfig:
    """env_cfg with `strategy` switched off (spot alone if nothing else was on: a strategy set is never
    empty)."""
    return replace(env_cfg, strategies=[s for s in env_cfg.strategies if s != strategy] or ["spot"])


def with_strategy(env_cfg: EnvConfig, strategy: str) -> tuple[EnvConfig, bool]:
    """env_cfg with `strategy` switched on (and whether that was a change)."""
    if strategy in env_cfg.strategies:
        return env_cfg, False
    return replace(env_cfg, strategies=list(env_cfg.strategies) + [strategy]), True
