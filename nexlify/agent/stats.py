"""What a run's TensorBoard curves show about the agent, gathered as it trains: the loss, the Q-values it
acts on (mean max-Q over the valid actions, and the gap between the best and the second-best valid
action: how decided its choices are), and the share of losses and rewards that were finite.

Everything is summed as tensors on the agent's device (no sync per step); `take()` reads the sums once a
round and starts over.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class TrainingStats:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        self.loss_sum, self.loss_n, self.loss_finite = z(), z(), z()
        self.q_max_sum, self.q_gap_sum, self.q_n, self.q_gap_n = z(), z(), z(), z()
        self.reward_n, self.reward_finite = z(), z()

    @torch.no_grad()
    def add_q(self, q_masked: Tensor, mask: Tensor) -> None:
        """q_masked [M, A] with invalid actions at a large negative number, mask [M, A]."""
        top = q_masked.topk(2, dim=-1).values.to(torch.float64)
        two = mask.sum(-1) >= 2  # a gap exists only with a second valid action
        self.q_max_sum += top[:, 0].sum()
        self.q_n += top.shape[0]
        self.q_gap_sum += torch.where(two, top[:, 0] - top[:, 1], 0.0).sum()
        self.q_gap_n += two.sum()

    @torch.no_grad()
    def add_loss(self, loss: Tensor) -> None:
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.to(torch.float64), 0.0)
        self.loss_n += 1
        self.loss_finite += finite

    @torch.no_grad()
    def add_reward(self, reward: Tensor) -> None:
        self.reward_n += reward.numel()
        self.reward_finite += torch.isfinite(reward).sum()

    def take(self) -> dict:
        """The round's means (None where nothing was seen), then start over. finite_share: the share of
        the round's checked numbers (losses and rewards) that were finite."""
        n = {k: float(getattr(self, k)) for k in ("loss_n", "loss_finite", "q_n", "q_gap_n", "reward_n",
                                                 "reward_finite")}
        out = {
            "loss": float(self.loss_sum) / n["loss_finite"] if n["loss_finite"] else None,
            "q_max_mean": float(self.q_max_sum) / n["q_n"] if n["q_n"] else None,
            "q_gap_mean": float(self.q_gap_sum) / n["q_gap_n"] if n["q_gap_n"] else None,
            "finite_share": ((n["loss_finite"] + n["reward_finite"]) / (n["loss_n"] + n["reward_n"])
                             if n["loss_n"] + n["reward_n"] else None),
            "grad_steps_round": int(n["loss_n"]),
        }
        self._reset()
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
