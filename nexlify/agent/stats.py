"""What a run's TensorBoard curves show about the agent, gathered as it trains: the loss, the Q-values it
acts on (mean max-Q over the valid actions, and the gap between the best and the second-best valid
action: how decided its choices are), and the share of losses and rewards that were finite.

The tensors are collected by reference and reduced in batches on the device (no sync before `take()`, which
gives the round's means once a round and starts over).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class TrainingStats:
    """The training loop hands each step's tensors over by reference (appending to a list costs nothing on
    the step); every FLUSH_EVERY steps they are stacked and reduced in a few batched operations, so the
    statistics cost a few per cent of a step at most. The tensors handed over must not be changed in place
    afterwards (the agent's Q-values, the environment's masks and rewards are new tensors every step)."""

    FLUSH_EVERY = 64

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self._q: list[tuple[Tensor, Tensor]] = []
        self._losses: list[Tensor] = []
        self._rewards: list[Tensor] = []
        # sums on the device (read once a round: no sync before take()); counts known on the host
        self.sums = {k: torch.zeros((), dtype=torch.float64, device=self.device)
                     for k in ("loss_sum", "loss_finite", "q_max_sum", "q_gap_sum", "q_gap_n", "reward_finite")}
        self.counts = dict.fromkeys(("loss_n", "q_n", "reward_n"), 0)

    def add_q(self, q_masked: Tensor, mask: Tensor) -> None:
        """q_masked [M, A] with invalid actions at a large negative number, mask [M, A]."""
        self._q.append((q_masked, mask))
        if len(self._q) >= self.FLUSH_EVERY:
            self._flush_q()

    def add_loss(self, loss: Tensor) -> None:
        self._losses.append(loss)
        if len(self._losses) >= self.FLUSH_EVERY:
            self._flush_losses()

    def add_reward(self, reward: Tensor) -> None:
        self._rewards.append(reward)
        if len(self._rewards) >= self.FLUSH_EVERY:
            self._flush_rewards()

    @torch.no_grad()
    def _flush_q(self) -> None:
        if not self._q:
            return
        q = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in self._q])
        mask = torch.cat([m.reshape(-1, m.shape[-1]) for _, m in self._q])
        self._q = []
        top = q.topk(2, dim=-1).values.to(torch.float64)
        two = mask.sum(-1) >= 2  # a gap exists only with a second valid action
        s = self.sums
        s["q_max_sum"] += top[:, 0].sum()
        self.counts["q_n"] += top.shape[0]
        s["q_gap_sum"] += torch.where(two, top[:, 0] - top[:, 1], 0.0).sum()
        s["q_gap_n"] += two.sum()

    @torch.no_grad()
    def _flush_losses(self) -> None:
        if not self._losses:
            return
        losses = torch.stack([x.reshape(()) for x in self._losses]).to(torch.float64)
        self._losses = []
        finite = torch.isfinite(losses)
        s = self.sums
        s["loss_sum"] += torch.where(finite, losses, 0.0).sum()
        self.counts["loss_n"] += losses.numel()
        s["loss_finite"] += finite.sum()

    @torch.no_grad()
    def _flush_rewards(self) -> None:
        if not self._rewards:
            return
        rewards = torch.cat([x.reshape(-1) for x in self._rewards])
        self._rewards = []
        self.counts["reward_n"] += rewards.numel()
        self.sums["reward_finite"] += torch.isfinite(rewards).sum()

    def take(self) -> dict:
        """The round's means (None where nothing was seen), then start over. finite_share: the share of
        the round's checked numbers (losses and rewards) that were finite."""
        self._flush_q()
        self._flush_losses()
        self._flush_rewards()
        n = {**{k: float(v) for k, v in self.sums.items()}, **self.counts}
        out = {
            "loss": n["loss_sum"] / n["loss_finite"] if n["loss_finite"] else None,
            "q_max_mean": n["q_max_sum"] / n["q_n"] if n["q_n"] else None,
            "q_gap_mean": n["q_gap_sum"] / n["q_gap_n"] if n["q_gap_n"] else None,
            "finite_share": ((n["loss_finite"] + n["reward_finite"]) / (n["loss_n"] + n["reward_n"])
                             if n["loss_n"] + n["reward_n"] else None),
            "grad_steps_round": int(n["loss_n"]),
        }
        self._reset()
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
