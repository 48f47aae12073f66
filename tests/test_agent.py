"""The agent (nexlify.agent.dqn and the epsilon schedule): exploration that really decays, masks obeyed
when acting and inside the Double-DQN target, hand-computed n-step returns, and a network whose shape
does not depend on the number of pairs.

Where a test needs known Q-values it swaps the agent's networks for `ConstQ`, a module whose output is a
fixed row of Q-values, so every target and loss can be computed on paper.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nexlify.agent.dqn import DQNAgent, NStepWindow, random_valid_actions
from nexlify.config import AgentConfig, TrainConfig
from nexlify.data.candles import load_market, split_windows
from nexlify.env.batched import N_ACTIONS, observation_size
from nexlify.env.market import MarketTensors
from nexlify.evaluation import evaluate_policy
from nexlify.training import epsilon_at, train_run
from tests.helpers_market import one_torch_thread  # noqa: F401  (autouse fixture)

CPU = torch.device("cpu")


class ConstQ(nn.Module):
    """Q(obs) = the same row of Q-values for every observation (a trainable parameter, so a loss can
    backpropagate through it)."""

    def __init__(self, q: list[float]) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.tensor(q, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q.expand(*obs.shape[:-1], self.q.shape[0])


# The agent is generic in its number of actions; these tests use the first three of the environment's
# (hold, open_long, close), so that every Q-value and mask below can be written out by hand.
TOY_ACTIONS = 3


def small_agent(obs_size: int = 5, seed: int = 0, **cfg) -> DQNAgent:
    values = dict(hidden=16, buffer_size=64, batch_size=4, learning_starts=0)
    values.update(cfg)
    return DQNAgent(obs_size, TOY_ACTIONS, AgentConfig(**values), CPU, seed)


# ========================================================================================== epsilon


@pytest.mark.parametrize("step, total, start, end, fraction, expected", [
    (0, 1000, 1.0, 0.05, 0.5, 1.0),                  # start
    (250, 1000, 1.0, 0.05, 0.5, 0.525),              # half-way through the decay: 1 - 0.95 / 2
    (499, 1000, 1.0, 0.05, 0.5, 1.0 - 0.95 * 499 / 500),
    (500, 1000, 1.0, 0.05, 0.5, 0.05),               # end of the decay
    (999, 1000, 1.0, 0.05, 0.5, 0.05),               # constant afterwards
    (100, 1000, 0.2, 0.05, 1.0, 0.185),              # continuing run: 0.2 - 0.15 * 0.1
    (0, 0, 1.0, 0.05, 0.5, 1.0),                     # no steps at all: no division by zero
])
def test_epsilon_at(step, total, start, end, fraction, expected):
    assert epsilon_at(step, total, start, end, fraction) == pytest.approx(expected)


def test_epsilon_decreases_monotonically():
    values = [epsilon_at(s, 600, 1.0, 0.05, 0.5) for s in range(0, 600, 7)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.05)


# ============================================================================================ masks


def random_masks(n: int, seed: int) -> torch.Tensor:
    """[n, 3] masks like the environment's: hold always valid, open and close random."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand((n, TOY_ACTIONS), generator=gen) < 0.5
    mask[:, 0] = True
    return mask


def test_greedy_never_picks_a_masked_action_even_with_the_highest_q():
    agent = small_agent()
    agent.model = ConstQ([0.0, 10.0, 5.0])  # open is best, close second, hold worst
    mask = random_masks(4000, 1)
    obs = torch.zeros((4000, 5))
    chosen = agent.act(obs, mask, 0.0)
    expected = torch.where(mask[:, 1], 1, torch.where(mask[:, 2], 2, 0))  # best valid action by hand
    assert torch.equal(chosen, expected)


@pytest.mark.parametrize("epsilon", [1.0, 0.5, 0.05])
def test_exploring_never_picks_a_masked_action(epsilon):
    agent = small_agent(seed=3)
    mask = random_masks(20_000, 2)
    obs = torch.randn((20_000, 5), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        chosen = agent.act(obs, mask, epsilon)
        assert mask.gather(1, chosen.unsqueeze(1)).all()


def test_random_actions_are_uniform_over_the_valid_ones():
    """epsilon = 1 with all three actions valid: each about 1/3; with close masked: hold and open 1/2."""
    agent = small_agent(seed=5)
    agent.model = ConstQ([0.0, 10.0, 5.0])
    n = 30_000
    mask = torch.ones((n, 3), dtype=torch.bool)
    counts = torch.bincount(agent.act(torch.zeros((n, 5)), mask, 1.0), minlength=3) / n
    assert counts.tolist() == [pytest.approx(1 / 3, abs=0.015)] * 3
    mask[:, 2] = False
    counts = torch.bincount(agent.act(torch.zeros((n, 5)), mask, 1.0), minlength=3) / n
    assert counts.tolist() == [pytest.approx(0.5, abs=0.015), pytest.approx(0.5, abs=0.015), 0.0]


def test_epsilon_sets_the_exploration_rate():
    """With 3 valid actions, a random pick differs from the greedy one with probability 2/3, so at
    epsilon 0.3 about 0.3 * 2/3 = 20% of actions are not greedy."""
    agent = small_agent(seed=6)
    agent.model = ConstQ([0.0, 10.0, 5.0])
    n = 30_000
    chosen = agent.act(torch.zeros((n, 5)), torch.ones((n, 3), dtype=torch.bool), 0.3)
    assert (chosen != 1).float().mean().item() == pytest.approx(0.2, abs=0.015)


# ===================================================================== the Double-DQN target's argmax


def smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1.0 else abs(d) - 0.5


# Online Q = A - mean(A) style numbers written out: online [-5, 5, 0], target [-10/3, 50/3, -40/3].
ONLINE = [-5.0, 5.0, 0.0]
TARGET = [-10 / 3, 50 / 3, -40 / 3]


def test_double_dqn_target_uses_the_best_valid_online_action():
    """A transition: action 0, n-step return 1, discount 0.5, next mask [hold, close] (open invalid).
    Online Q at the next state: [-5, 5, 0] -> best valid action is close (2), although open (1) is the
    highest overall. Double DQN evaluates it with the target network: -40/3, so the target is
    1 + 0.5 * (-40/3) = -17/3 and the loss smooth_l1(Q(s, 0) - target) = smooth_l1(-5 + 17/3) = 2/9.
    Other (wrong) targets give other losses: the masked argmax (open) -> 1 + 0.5 * 50/3; the target
    network's own valid argmax (hold) -> 1 + 0.5 * (-10/3)."""
    agent = small_agent()
    agent.model = ConstQ(ONLINE)
    agent.target_model = ConstQ(TARGET)
    n = 4
    agent.buffer.add(torch.zeros((n, 5)), torch.zeros(n, dtype=torch.int64), torch.ones(n),
                     torch.full((n,), 0.5), torch.zeros((n, 5)),
                     torch.tensor([[True, False, True]] * n))
    loss = agent.learn()
    assert loss is not None
    correct = smooth_l1(ONLINE[0] - (1 + 0.5 * TARGET[2]))
    masked_argmax = smooth_l1(ONLINE[0] - (1 + 0.5 * TARGET[1]))
    vanilla_valid = smooth_l1(ONLINE[0] - (1 + 0.5 * TARGET[0]))
    assert correct == pytest.approx(2 / 9)
    assert float(loss) == pytest.approx(correct, abs=1e-6)
    assert float(loss) != pytest.approx(masked_argmax, abs=1e-3)
    assert float(loss) != pytest.approx(vanilla_valid, abs=1e-3)


def test_double_dqn_target_when_only_hold_is_valid():
    """Next mask [hold] only: the target is 1 + 0.5 * TARGET[0] even though both other actions rate higher."""
    agent = small_agent()
    agent.model = ConstQ(ONLINE)
    agent.target_model = ConstQ(TARGET)
    n = 4
    agent.buffer.add(torch.zeros((n, 5)), torch.ones(n, dtype=torch.int64), torch.ones(n), torch.full((n,), 0.5),
                     torch.zeros((n, 5)), torch.tensor([[True, False, False]] * n))
    loss = agent.learn()
    assert float(loss) == pytest.approx(smooth_l1(ONLINE[1] - (1 + 0.5 * TARGET[0])), abs=1e-6)


def test_learn_waits_for_learning_starts():
    agent = small_agent(learning_starts=10, batch_size=4)
    agent.buffer.add(torch.zeros((8, 5)), torch.zeros(8, dtype=torch.int64), torch.zeros(8), torch.ones(8),
                     torch.zeros((8, 5)), torch.ones((8, 3), dtype=torch.bool))
    assert agent.learn() is None and agent.grad_steps == 0
    agent.buffer.add(torch.zeros((2, 5)), torch.zeros(2, dtype=torch.int64), torch.zeros(2), torch.ones(2),
                     torch.zeros((2, 5)), torch.ones((2, 3), dtype=torch.bool))
    assert agent.learn() is not None and agent.grad_steps == 1


def test_learning_moves_q_towards_the_target():
    """A constant target of 1 (discount 0): after 200 steps Q(s, a) is close to 1."""
    torch.manual_seed(0)
    agent = small_agent(learning_rate=1e-2, batch_size=16, target_update=10)
    n = 64
    obs = torch.randn((n, 5), generator=torch.Generator().manual_seed(1))
    agent.buffer.add(obs, torch.zeros(n, dtype=torch.int64), torch.ones(n), torch.zeros(n), obs,
                     torch.ones((n, 3), dtype=torch.bool))
    for _ in range(200):
        agent.learn()
    q = agent.model(obs)[:, 0]
    assert (q - 1.0).abs().max().item() < 0.1


# ======================================================================================= n-step


def rewards(k: int) -> torch.Tensor:
    """Step k's rewards for two streams: (k + 1) and 10 (k + 1)."""
    return torch.tensor([k + 1.0, 10.0 * (k + 1)])


def test_nstep_window_returns_by_hand():
    """n = 3, gamma = 0.9, rewards 1, 2, 3, 4, 5 (stream 2: x10):
    from step 0: 1 + 0.9*2 + 0.81*3 = 5.23, discount 0.729; from step 1: 2 + 2.7 + 3.24 = 7.94.
    At the episode end (after step 4): from step 2: 3 + 3.6 + 4.05 = 10.65 (0.729), from step 3:
    4 + 4.5 = 8.5 (0.81), from step 4: 5 (0.9)."""
    w = NStepWindow(3, 0.9)
    ready = []
    for k in range(4):
        w.push(torch.full((2, 1), float(k)), torch.full((2,), k), rewards(k))
        ready += w.pop_ready()
    w.push(torch.full((2, 1), 4.0), torch.full((2,), 4), rewards(4))
    flushed = w.flush()
    assert len(ready) == 2 and len(flushed) == 3
    expected = [(0, 5.23, 0.729), (1, 7.94, 0.729), (2, 10.65, 0.729), (3, 8.5, 0.81), (4, 5.0, 0.9)]
    for (obs, action, ret, disc), (k, value, discount) in zip(ready + flushed, expected):
        assert obs[:, 0].tolist() == [k, k] and action.tolist() == [k, k]
        assert ret.tolist() == [pytest.approx(value), pytest.approx(10 * value)]
        assert disc == pytest.approx(discount)
    assert w.flush() == []


def test_nstep_window_of_one_is_the_one_step_return():
    w = NStepWindow(1, 0.99)
    w.push(torch.zeros((2, 1)), torch.zeros(2), rewards(0))
    ((_, _, ret, disc),) = w.pop_ready()
    assert ret.tolist() == [1.0, 10.0] and disc == pytest.approx(0.99)


def test_remember_stores_nstep_transitions_with_the_right_bootstrap_state():
    """Through DQNAgent.remember (n = 3, gamma = 0.9): the transition from step k bootstraps from the
    observation n steps later, or from the last one when the episode ends first. Rewards are stored times
    reward_scale (here 2: every return below is twice the hand-computed n-step sum)."""
    agent = small_agent(obs_size=1, n_step=3, gamma=0.9, buffer_size=64, reward_scale=2.0)
    for k in range(5):
        agent.remember(torch.full((2, 1), float(k)), torch.full((2,), k % 3), rewards(k),
                       torch.full((2, 1), float(k + 1)), torch.ones((2, 3), dtype=torch.bool), episode_end=(k == 4))
    buf = agent.buffer
    assert buf.size == 10
    expected = [(0, 5.23, 0.729, 3), (1, 7.94, 0.729, 4), (2, 10.65, 0.729, 5), (3, 8.5, 0.81, 5), (4, 5.0, 0.9, 5)]
    for i, (k, value, discount, boot) in enumerate(expected):
        rows = slice(2 * i, 2 * i + 2)
        assert buf.obs[rows, 0].tolist() == [k, k]
        assert buf.action[rows].tolist() == [k % 3, k % 3]
        assert buf.ret[rows].tolist() == [pytest.approx(2 * value), pytest.approx(2 * 10 * value)]
        assert buf.discount[rows].tolist() == [pytest.approx(discount)] * 2
        assert buf.next_obs[rows, 0].tolist() == [boot, boot]


# ================================================================== the network ignores the pair count


def test_network_shape_does_not_depend_on_the_number_of_pairs():
    """Train on 3 pairs, evaluate on 1: the same weights load into an agent built for a 1-pair market,
    and a pair's validation metrics are the same whether it is evaluated beside the others or alone
    (each pair trades its own portfolio)."""
    cfg = TrainConfig()
    cfg.agent.algorithm = "dqn"
    cfg.data.val_days = 5
    cfg.env.episode_bars = 120
    cfg.env.num_envs = 2
    cfg.agent.hidden = 16
    cfg.agent.batch_size = 16
    cfg.agent.learning_starts = 32
    cfg.agent.buffer_size = 2048
    cfg.device = "cpu"
    market = load_market("binance", ["BTC/USDT", "ETH/USDT", "SOL/USDT"], start="2025-01-01", end="2025-06-01")
    windows = split_windows(market, cfg.data.val_days)
    out = train_run(cfg, market, windows, seed=11, episodes=2)
    assert out.agent.grad_steps > 0
    assert set(out.val_metrics["per_pair"]) == {"BTC/USDT", "ETH/USDT", "SOL/USDT"}

    single = load_market("binance", ["ETH/USDT"], start="2025-01-01", end="2025-06-01")
    tensors = MarketTensors.build(single, out.normalizer)
    fresh = DQNAgent(observation_size(tensors.n_features), N_ACTIONS, cfg.agent, CPU, 0)
    trained = out.agent.model.state_dict()
    assert {k: v.shape for k, v in fresh.model.state_dict().items()} == {k: v.shape for k, v in trained.items()}
    fresh.model.load_state_dict(trained)
    alone = evaluate_policy(fresh.model, tensors, windows.val, cfg.env, cfg.risk, margin=cfg.agent.hold_margin)
    assert set(alone["per_pair"]) == {"ETH/USDT"}
    beside = out.val_metrics["per_pair"]["ETH/USDT"]
    for key, value in alone["per_pair"]["ETH/USDT"].items():
        assert value == pytest.approx(beside[key], rel=1e-9, abs=1e-12), key
    assert math.isfinite(alone["score"])


@pytest.mark.parametrize("valid", [[0], [0, 2], [0, 3, 7], list(range(N_ACTIONS))])
def test_random_valid_actions_are_valid_and_uniform(valid):
    """Each valid action drawn n/k times (k valid actions); the chi-square statistic stays under the
    0.1% critical value for k-1 degrees of freedom; no invalid action is ever drawn."""
    n = 60_000
    mask = torch.zeros((n, 1, N_ACTIONS), dtype=torch.bool)
    mask[..., valid] = True
    drawn = random_valid_actions(mask, torch.Generator().manual_seed(1)).flatten()
    counts = torch.bincount(drawn, minlength=N_ACTIONS).double()
    assert counts[[a for a in range(N_ACTIONS) if a not in valid]].sum() == 0
    k = len(valid)
    expected = n / k
    chi2 = float(((counts[valid] - expected) ** 2 / expected).sum())
    critical = {1: 0.0, 2: 10.83, 3: 13.82, N_ACTIONS: 29.59}[k]  # 99.9% quantiles of chi2(k - 1)
    assert chi2 <= critical


def test_random_valid_actions_follow_each_rows_own_mask():
    mask = torch.tensor([[True, False, True], [True, True, False], [True, False, False]])
    drawn = torch.stack([random_valid_actions(mask, torch.Generator().manual_seed(s)) for s in range(200)])
    assert set(drawn[:, 0].tolist()) == {0, 2} and set(drawn[:, 1].tolist()) == {0, 1}
    assert set(drawn[:, 2].tolist()) == {0}
