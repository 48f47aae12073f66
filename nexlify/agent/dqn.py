"""Double DQN with a dueling head, n-step returns and a tensor replay buffer.

One Q-network is shared by every pair slot: its input is one slot's observation (that pair's market
features plus the slot's and the portfolio's state) and its output the Q-values of that slot's
actions. The network's shape therefore depends on the feature layout only, never on the number of
pairs or the hardware, so a checkpoint trained on three pairs on a GPU evaluates on one pair on a
laptop. Each (episode, slot) is one transition stream.

Invalid actions (per the environment's mask) are never chosen: not when acting, greedy or random,
and not in the argmax of the Double-DQN target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nexlify.agent.stats import TrainingStats
from nexlify.config import AgentConfig

NEG_INF = -1e9


class DuelingQNet(nn.Module):
    """MLP torso, then value and advantage streams: Q = V + A - mean(A)."""

    def __init__(self, obs_size: int, n_actions: int, hidden: int) -> None:
        super().__init__()
        self.torso = nn.Sequential(
            nn.Linear(obs_size, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.value = nn.Linear(hidden, 1)
        self.advantage = nn.Linear(hidden, n_actions)

    def forward(self, obs: Tensor) -> Tensor:
        z = self.torso(obs)
        adv = self.advantage(z)
        return self.value(z) + adv - adv.mean(dim=-1, keepdim=True)


class ReplayBuffer:
    """A ring of n-step transitions preallocated as tensors on the device."""

    def __init__(self, capacity: int, obs_size: int, n_actions: int, device: torch.device) -> None:
        self.capacity = capacity
        self.obs = torch.zeros((capacity, obs_size), dtype=torch.float32, device=device)
        self.next_obs = torch.zeros((capacity, obs_size), dtype=torch.float32, device=device)
        self.action = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.ret = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.discount = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.next_mask = torch.zeros((capacity, n_actions), dtype=torch.bool, device=device)
        self.ptr = 0
        self.size = 0

    def clear(self) -> None:
        self.ptr = 0
        self.size = 0

    def add(self, obs: Tensor, action: Tensor, ret: Tensor, discount: Tensor, next_obs: Tensor, next_mask: Tensor) -> None:
        m = obs.shape[0]
        if m > self.capacity:
            obs, action, ret, discount, next_obs, next_mask = (
                x[-self.capacity:] for x in (obs, action, ret, discount, next_obs, next_mask))
            m = self.capacity
        idx = (self.ptr + torch.arange(m, device=self.obs.device)) % self.capacity
        self.obs[idx] = obs
        self.action[idx] = action
        self.ret[idx] = ret
        self.discount[idx] = discount
        self.next_obs[idx] = next_obs
        self.next_mask[idx] = next_mask
        self.ptr = (self.ptr + m) % self.capacity
        self.size = min(self.size + m, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        idx = torch.randint(0, self.size, (batch_size,), device=self.obs.device, generator=generator)
        return (self.obs[idx], self.action[idx], self.ret[idx], self.discount[idx], self.next_obs[idx],
                self.next_mask[idx])


class NStepWindow:
    """Turns per-step (obs, action, reward) of M streams into n-step transitions.

    Episodes are cut by time, not ended by the market, so a window that reaches the end of an episode
    bootstraps from the last observation with gamma^k (truncation, not termination).
    """

    def __init__(self, n: int, gamma: float) -> None:
        self.n, self.gamma = n, gamma
        self.obs: list[Tensor] = []
        self.actions: list[Tensor] = []
        self.rewards: list[Tensor] = []

    def reset(self) -> None:
        self.obs, self.actions, self.rewards = [], [], []

    def push(self, obs: Tensor, action: Tensor, reward: Tensor) -> None:
        self.obs.append(obs)
        self.actions.append(action)
        self.rewards.append(reward)

    def _emit(self, length: int) -> tuple[Tensor, Tensor, Tensor, float]:
        ret = torch.zeros_like(self.rewards[0])
        for k in range(length):
            ret = ret + (self.gamma ** k) * self.rewards[k]
        out = (self.obs[0], self.actions[0], ret, self.gamma ** length)
        self.obs.pop(0)
        self.actions.pop(0)
        self.rewards.pop(0)
        return out

    def pop_ready(self) -> list[tuple[Tensor, Tensor, Tensor, float]]:
        """The transition whose window is full, if any."""
        return [self._emit(self.n)] if len(self.rewards) >= self.n else []

    def flush(self) -> list[tuple[Tensor, Tensor, Tensor, float]]:
        """At the end of an episode: every remaining partial window."""
        out = []
        while self.rewards:
            out.append(self._emit(len(self.rewards)))
        return out



def random_valid_actions(mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One action per row of mask [..., A], uniform over the row's valid actions (each row has one: hold).
    Draws one number per row and takes the k-th valid action: about 3x cheaper than drawing a number per
    action and taking the argmax over the valid ones."""
    count = mask.sum(-1, dtype=torch.int32)
    draw = torch.rand(count.shape, device=mask.device, generator=generator)
    k = torch.minimum((draw * count).to(torch.int32), count - 1) + 1  # 1 .. count
    rank = mask.to(torch.int32).cumsum(-1, dtype=torch.int32)
    return ((rank == k.unsqueeze(-1)) & mask).to(torch.uint8).argmax(-1)


class DQNAgent:
    def __init__(self, obs_size: int, n_actions: int, cfg: AgentConfig, device: torch.device, seed: int) -> None:
        self.cfg = cfg
        self.device = device
        self.obs_size = obs_size
        self.n_actions = n_actions
        self.model = DuelingQNet(obs_size, n_actions, cfg.hidden).to(device)
        self.target_model = DuelingQNet(obs_size, n_actions, cfg.hidden).to(device)
        self.target_model.load_state_dict(self.model.state_dict())
        self.target_model.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.buffer = ReplayBuffer(cfg.buffer_size, obs_size, n_actions, device)
        self.window = NStepWindow(cfg.n_step, cfg.gamma)
        self.grad_steps = 0
        self.stats = TrainingStats(device)  # loss, Q-values, finiteness per round (TensorBoard)

    # ------------------------------------------------------------------------------------------ act

    @torch.no_grad()
    def greedy(self, obs: Tensor, mask: Tensor) -> Tensor:
        q = torch.where(mask, self.model(obs), NEG_INF)
        self.stats.add_q(q.view(-1, q.shape[-1]), mask.view(-1, mask.shape[-1]))
        return q.argmax(dim=-1)

    @torch.no_grad()
    def act(self, obs: Tensor, mask: Tensor, epsilon: float) -> Tensor:
        """Epsilon-greedy over valid actions only; obs [..., O], mask [..., A]."""
        greedy = self.greedy(obs, mask)
        if epsilon <= 0.0:
            return greedy
        random_valid = random_valid_actions(mask, self.generator)
        explore = torch.rand(greedy.shape, device=self.device, generator=self.generator) < epsilon
        return torch.where(explore, random_valid, greedy)

    # ---------------------------------------------------------------------------------------- learn

    def remember(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor, next_mask: Tensor,
                 episode_end: bool) -> None:
        """Feed one step of all streams (flattened [M, ...]); stores the n-step transitions that are ready, their
        returns in the learner's units (the environment's rewards times cfg.reward_scale)."""
        self.stats.add_reward(reward)
        self.window.push(obs, action, reward * self.cfg.reward_scale)
        ready = self.window.flush() if episode_end else self.window.pop_ready()
        for o, a, ret, disc in ready:
            self.buffer.add(o, a, ret, torch.full_like(ret, disc), next_obs, next_mask)

    def learn(self) -> float | None:
        """One gradient step on a sampled batch; returns the loss tensor's value lazily (None if waiting)."""
        cfg = self.cfg
        if self.buffer.size < max(cfg.learning_starts, cfg.batch_size):
            return None
        obs, action, ret, discount, next_obs, next_mask = self.buffer.sample(cfg.batch_size, self.generator)
        q = self.model(obs).gather(1, action.unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            next_online = torch.where(next_mask, self.model(next_obs), NEG_INF)
            next_action = next_online.argmax(dim=1, keepdim=True)
            next_q = self.target_model(next_obs).gather(1, next_action).squeeze(1)
            target = ret + discount * next_q
        loss = F.smooth_l1_loss(q, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.grad_steps += 1
        if self.grad_steps % cfg.target_update == 0:
            self.target_model.load_state_dict(self.model.state_dict())
        self.stats.add_loss(loss.detach())
        return loss.detach()

    # ------------------------------------------------------------------------------------ state i/o

    def state_dict(self) -> dict:
        return {
            "model_state_dict": self.model.state_dict(),
            "target_model_state_dict": self.target_model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "grad_steps": self.grad_steps,
        }

    def load_state_dict(self, state: dict, *, with_optimizer: bool = True) -> None:
        self.model.load_state_dict(state["model_state_dict"])
        self.target_model.load_state_dict(state.get("target_model_state_dict", state["model_state_dict"]))
        if with_optimizer and "optimizer_state_dict" in state:
            self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.grad_steps = int(state.get("grad_steps", 0))
