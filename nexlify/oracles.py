"""The oracle of each planted family (nexlify.planted): the fixed timing rule that harvests its edge.

An oracle is a rule over rows, like the baselines (nexlify.baselines): at the close of bar t it computes
the family's signal (nexlify.planted.signal) on the candles it sees (the planted ones, bars <= t), and is
long while the signal forecasts a rising drift for bar t+1: OPEN_LONG when the mask allows an entry, CLOSE
when the signal no longer holds and the mask allows a close, else hold (nexlify.baselines.ma_crossover).
It runs under the model's own environment and risk config (the per-trade cap, Kelly, stops, targets, the
daily loss limit, the lending sweep of idle cash), stepped by nexlify.evaluation.evaluate_rules, so its
return is what the edge yields after the same costs and rules the agent faces. On the unplanted candles
the same rule shows what the timing alone earns without the edge.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from nexlify import baselines as bl
from nexlify.env.batched import BatchedTradingEnv
from nexlify.env.market import MarketTensors
from nexlify.evaluation import Policy
from nexlify.planted import PlantParams, signal


def long_signal(family: str, market: MarketTensors, params: PlantParams = PlantParams()) -> Tensor:
    """[T, P] bool: the oracle's wish to be long over bar t+1, from the closes and times of bars <= t."""
    closes = market.prices[..., 3].to(torch.float64).cpu().numpy()
    p = signal(family, np.asarray(market.timestamps), closes, params)
    return torch.as_tensor(p > 0, device=market.prices.device)


def oracle_policy(family: str, market: MarketTensors, params: PlantParams = PlantParams()) -> Policy:
    """The family's oracle as a Policy of nexlify.evaluation (its signal computed once for every bar)."""
    wish = long_signal(family, market, params)

    def act(obs: Tensor, mask: Tensor, env: BatchedTradingEnv, rows: slice) -> Tensor:
        return bl.ma_crossover(mask, wish[env.t[rows].unsqueeze(-1), env._pair_bp[rows]])

    return act
