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
from nexlify.env.layout import HOLD, OPEN_LONG
from nexlify.evaluation import Policy, evaluate_policy
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


class _LastQ(torch.nn.Module):
    """The model, remembering the Q-values of its last call (the step's decision)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.last: Tensor | None = None

    def forward(self, obs: Tensor) -> Tensor:
        self.last = self.model(obs)
        return self.last


@torch.no_grad()
def q_gap_by_signal(model: torch.nn.Module, family: str, market: MarketTensors, window: tuple[int, int], env_cfg,
                    risk_cfg, strategy_params=None, *, margin: float, params: PlantParams = PlantParams()) -> dict:
    """Does the Q-network see the planted edge? Along the greedy policy's own path over `window` (hold margin
    `margin`), at every bar where a pair's slot may open a trade, the Q-gap open_long - hold (the learner's
    reward units: percent of equity at reward_scale 100), averaged separately over the bars where the family's
    oracle wants to be long and the others.

    Returns {"gap_signal", "gap_other", "seen": gap_signal - gap_other, "bars_signal", "bars_other"}. `seen` > 0:
    the network values an entry more when the edge is there, whatever it then does with it (the hold margin
    and the gap's level decide that); None where a side has no bar."""
    wish = long_signal(family, market, params)
    sums = {True: [0.0, 0], False: [0.0, 0]}
    recorder = _LastQ(model)

    def observe(env: BatchedTradingEnv, actions: Tensor | None) -> None:
        if actions is None:  # the end of the window
            return
        q = recorder.last.reshape(*env.mask.shape)  # the decision's Q-values, one row per episode and pair
        gap = (q[..., OPEN_LONG] - q[..., HOLD]).to(torch.float64)
        may_open = env.mask[..., OPEN_LONG]
        wants = wish[env.t.unsqueeze(-1), env._pair_bp]
        for side in (True, False):
            rows = may_open & (wants == side)
            sums[side][0] += float(gap[rows].sum())
            sums[side][1] += int(rows.sum())

    evaluate_policy(recorder, market, window, env_cfg, risk_cfg, strategy_params, margin=margin, observer=observe)
    mean = {side: (s / n if n else None) for side, (s, n) in sums.items()}
    seen = None if mean[True] is None or mean[False] is None else mean[True] - mean[False]
    return {"gap_signal": mean[True], "gap_other": mean[False], "seen": seen,
            "bars_signal": sums[True][1], "bars_other": sums[False][1]}
