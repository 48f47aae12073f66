"""A method question: PPO (CleanRL's ppo.py, with invalid actions masked) on the same batched
environment, trained per walk-forward fold on the train_days before the fold's test window, then tested greedily
on that window with nexlify.evaluation.evaluate_policy (the same costs and risk rules as the DQN's folds). A
study, not the product: it prints one JSON object per fold and seed, to set beside `nexlify backtest
--walk-forward` (cash plus lending earns 0.857 % in each default fold).

Usage (from the repository root; reads ../shared/data):
    PYTHONPATH=. python tools/ppo-study.py [--episodes 1000] [--seeds 1,2,3] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nexlify.config import TrainConfig
from nexlify.data.candles import load_market
from nexlify.data.prepare import attach_second_venue
from nexlify.data.timeframes import MS_PER_DAY, parse_utc_ms
from nexlify.env.batched import N_ACTIONS, BatchedTradingEnv, observation_size
from nexlify.env.market import MarketTensors, market_features
from nexlify.evaluation import evaluate_policy
from nexlify.features import WARMUP_BARS, Normalizer

# the default walk-forward's test windows (--start 2022-06-01 --end 2025-06-01 --fold-days 90 --folds 4)
FOLDS = [("2024-06-06", "2024-09-04"), ("2024-09-04", "2024-12-03"), ("2024-12-03", "2025-03-03"),
         ("2025-03-03", "2025-06-01")]


@dataclass
class PPOConfig:
    episodes: int = 1000  # as the DQN's initial runs: episodes of episode_bars from seeded random offsets
    num_envs: int = 32  # episodes stepped together (x the pairs: 96 agents per step with three)
    episode_bars: int = 720
    rollout: int = 120  # steps per update
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy: float = 0.01
    value_coef: float = 0.5
    learning_rate: float = 3e-4  # annealed linearly to 0
    reward_scale: float = 100.0  # as the DQN's learner: rewards in percent of equity
    train_days: int = 730


class ActorCritic(nn.Module):
    def __init__(self, obs: int, actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.actor = nn.Sequential(nn.Linear(obs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                   nn.Linear(hidden, actions))
        self.critic = nn.Sequential(nn.Linear(obs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                    nn.Linear(hidden, 1))
        nn.init.orthogonal_(self.actor[-1].weight, 0.01)
        nn.init.zeros_(self.actor[-1].bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The logits: evaluate_policy masks them and takes the argmax (the greedy policy)."""
        return self.actor(obs)


def masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.distributions.Categorical:
    return torch.distributions.Categorical(logits=torch.where(mask, logits, torch.tensor(-1e9)))


class Rollouts:
    """Episodes from seeded random offsets in [t0, t1), num_envs at a time, every pair of the market in one batch."""

    def __init__(self, cfg: TrainConfig, p: PPOConfig, tensors: MarketTensors, span: tuple[int, int], seed: int):
        self.cfg, self.p, self.tensors, self.span = cfg, p, tensors, span
        self.n_pairs = len(tensors.pairs)
        self.rng = np.random.default_rng(seed)
        self.env, self.left, self.obs = None, 0, None

    def collect(self, net: ActorCritic) -> dict:
        p, buf = self.p, {k: [] for k in ("obs", "act", "logp", "rew", "done", "val", "mask")}
        for _ in range(p.rollout):
            if self.env is None:
                t0, t1 = self.span
                start = torch.as_tensor(t0 + self.rng.integers(0, t1 - t0 - p.episode_bars, size=p.num_envs))
                pairs = torch.arange(self.n_pairs).unsqueeze(0).expand(p.num_envs, self.n_pairs)
                self.env = BatchedTradingEnv(self.tensors, pairs, start, p.episode_bars - 1, self.cfg.env,
                                             self.cfg.risk, self.cfg.strategy_params())
                self.obs, self.left = self.env.reset().flatten(0, 1), p.episode_bars - 1
            mask = self.env.mask.flatten(0, 1)
            with torch.no_grad():
                dist = masked(net.actor(self.obs), mask)
                action = dist.sample()
                value = net.critic(self.obs).squeeze(-1)
            nxt, reward, _ = self.env.step(action.view(p.num_envs, self.n_pairs))
            self.left -= 1
            for key, x in (("obs", self.obs), ("act", action), ("logp", dist.log_prob(action)), ("val", value),
                           ("mask", mask), ("rew", reward.flatten().float() * p.reward_scale),
                           ("done", torch.full_like(value, float(self.left == 0)))):
                buf[key].append(x)
            self.obs = nxt.flatten(0, 1)
            if self.left == 0:
                self.env = None
        with torch.no_grad():
            buf["next_val"] = (net.critic(self.obs).squeeze(-1) if self.env is not None
                               else torch.zeros_like(buf["val"][0]))
        return buf


def advantages(buf: dict, p: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the rollout; returns (advantages, value targets)."""
    adv = torch.zeros(len(buf["rew"]), buf["rew"][0].shape[0])
    last = torch.zeros_like(buf["rew"][0])
    for t in reversed(range(len(buf["rew"]))):
        next_value = buf["next_val"] if t == len(buf["rew"]) - 1 else buf["val"][t + 1]
        live = 1.0 - buf["done"][t]
        delta = buf["rew"][t] + p.gamma * next_value * live - buf["val"][t]
        last = delta + p.gamma * p.gae_lambda * live * last
        adv[t] = last
    return adv, adv + torch.stack(buf["val"])


def update(net: ActorCritic, opt: torch.optim.Optimizer, buf: dict, p: PPOConfig) -> float:
    adv, ret = advantages(buf, p)
    obs, act, logp, mask = (torch.cat(buf[k]) for k in ("obs", "act", "logp", "mask"))
    adv, ret = adv.flatten(), ret.flatten()
    size = obs.shape[0] // p.minibatches
    for _ in range(p.epochs):
        order = torch.randperm(obs.shape[0])
        for i in range(p.minibatches):
            idx = order[i * size:(i + 1) * size]
            dist = masked(net.actor(obs[idx]), mask[idx])
            ratio = (dist.log_prob(act[idx]) - logp[idx]).exp()
            a = (adv[idx] - adv[idx].mean()) / (adv[idx].std() + 1e-8)
            policy_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - p.clip, 1 + p.clip)).mean()
            value_loss = 0.5 * ((net.critic(obs[idx]).squeeze(-1) - ret[idx]) ** 2).mean()
            loss = policy_loss + p.value_coef * value_loss - p.entropy * dist.entropy().mean()
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite PPO loss {loss.item()}")
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
    return float(loss.detach())


def train(cfg: TrainConfig, p: PPOConfig, tensors: MarketTensors, span: tuple[int, int], seed: int) -> ActorCritic:
    torch.manual_seed(seed)
    net = ActorCritic(observation_size(tensors.n_features), N_ACTIONS)
    opt = torch.optim.Adam(net.parameters(), lr=p.learning_rate, eps=1e-5)
    rollouts = Rollouts(cfg, p, tensors, span, seed)
    updates = int(np.ceil(p.episodes * (p.episode_bars - 1) / p.num_envs / p.rollout))
    for k in range(updates):
        for group in opt.param_groups:
            group["lr"] = p.learning_rate * (1 - k / updates)
        update(net, opt, rollouts.collect(net), p)
    if not all(torch.isfinite(w).all() for w in net.parameters()):
        raise SystemExit("non-finite PPO weights")
    return net


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=PPOConfig.episodes)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--data-dir", default="../shared/data")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, p = TrainConfig(), PPOConfig(episodes=args.episodes)
    for k, (test_start, test_end) in enumerate(FOLDS, start=1):
        market = load_market(cfg.data.exchange, cfg.data.pairs, "1h", args.data_dir, "2022-01-01", test_end)
        attach_second_venue(cfg, market, args.data_dir)
        raw = market_features(market)
        i_test = int(np.searchsorted(market.timestamps, parse_utc_ms(test_start)))
        i0 = max(WARMUP_BARS, int(np.searchsorted(market.timestamps,
                                                  parse_utc_ms(test_start) - p.train_days * MS_PER_DAY)))
        tensors = MarketTensors.build(market, Normalizer.fit(raw, i0, i_test), torch.device("cpu"), raw)
        for seed in (int(s) for s in args.seeds.split(",")):
            t = time.perf_counter()
            net = train(cfg, p, tensors, (i0, i_test), seed)
            test = evaluate_policy(net, tensors, (i_test, market.n_bars), cfg.env, cfg.risk, cfg.strategy_params(),
                                   margin=0.0)  # the policy's logits are not Q-values
            print(json.dumps({"fold": k, "seed": seed, "test": [test_start, test_end],
                              "test_return": test["avg_return"], "trades": test["total_trades"],
                              "exposure": test.get("exposure"), "seconds": round(time.perf_counter() - t, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
