"""Evaluation in one pass of the fused kernel (nexlify.evaluation._one_pass): the agent, every baseline, pair and
random seed as rows of one batch, each row with its own config's parameters, the kernel's arguments bound once.
Its numbers are compared, leaf by leaf, with the same evaluation stepped one batch per config with each policy
called for its own rows (evaluate_with_baselines_grouped, the way evaluation ran before), on the bundled candles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nexlify import baselines as bl
from nexlify.agent.dqn import DuelingQNet, random_valid_actions
from nexlify.config import ALL_STRATEGIES, EnvConfig, RiskConfig
from nexlify.env import fused_portfolio
from nexlify.env.batched import BatchedTradingEnv
from nexlify.env.market import MarketTensors
from nexlify.evaluation import (AGENT, BatchDecisions, Group, _simulate, evaluate_policy, evaluate_with_baselines,
                                evaluate_with_baselines_grouped, fused_pass_possible, step_bar)
from nexlify.strategies.params import StrategyParams
from tests.helpers_market import bundled_two_pairs, one_torch_thread, untrained_qnet  # noqa: F401

WINDOW = (1000, 1240)


@pytest.fixture(scope="module")
def market() -> MarketTensors:
    return bundled_two_pairs()


def _model(market: MarketTensors) -> DuelingQNet:
    return untrained_qnet(market, 0)


def _leaves(tree, path: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _leaves(sub, f"{path}[{i}]").items()}
    return {path: tree}


def _assert_same(got: dict, want: dict) -> None:
    a, b = _leaves(got), _leaves(want)
    assert a.keys() == b.keys()
    for key, value in b.items():
        if isinstance(value, float) and math.isfinite(value):
            assert a[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
        else:
            assert a[key] == value, key


@pytest.mark.parametrize("strategies", [list(ALL_STRATEGIES), ["spot"]])
def test_one_pass_gives_the_numbers_of_one_batch_per_config(market, strategies):
    """Every strategy on (the agent's config mixed with flat's, lending off, and buy-and-hold at full size's risk
    config), and spot alone (the baselines add lending: three strategy sets in one pass)."""
    cfg = EnvConfig(strategies=strategies)
    assert fused_pass_possible(market, [cfg])
    kwargs = dict(margin=0.02, record=True, seeds=(0, 1))
    one = evaluate_with_baselines(_model(market), market, WINDOW, cfg, RiskConfig(), StrategyParams(), **kwargs)
    grouped = evaluate_with_baselines_grouped(_model(market), market, WINDOW, cfg, RiskConfig(), StrategyParams(),
                                              **kwargs)
    _assert_same(one, grouped)
    # the comparison has something to compare: the policies traded, and differently
    trades = {name: sum(p["trades"] for p in m["per_pair"].values())
              for name, m in [(AGENT, one["agent"])] + list(one["baselines"].items())}
    assert trades[bl.FLAT] == 0 and trades[bl.RANDOM_VALID] > 2
    assert one["baselines"][bl.BUY_AND_HOLD_FULL]["exposure"] > 0.9 and one["baselines"][bl.FLAT]["exposure"] == 0
    assert one["baselines"][bl.MA_CROSSOVER]["avg_return"] != one["baselines"][bl.BUY_AND_HOLD_SIZED]["avg_return"]


def test_the_agent_alone_in_one_pass_matches_its_own_batch_with_the_observer(market):
    cfg = EnvConfig()
    seen: list[tuple[int, np.ndarray | None]] = []

    def observer(env: BatchedTradingEnv, actions: torch.Tensor | None) -> None:
        seen.append((int(env.t[0]), None if actions is None else actions.clone().numpy()))

    got = evaluate_policy(_model(market), market, WINDOW, cfg, RiskConfig(), margin=0.0, record=True,
                          observer=observer)
    ref_seen: list[tuple[int, np.ndarray | None]] = []
    model = _model(market)
    from nexlify.evaluation import greedy_policy

    ref = _simulate(market, WINDOW, cfg, RiskConfig(), None, [Group(AGENT, greedy_policy(model, 0.0))], True,
                    lambda env, a: ref_seen.append((int(env.t[0]), None if a is None else a.clone().numpy())))
    want = ref["results"][AGENT]
    want["curves"] = {"bar_ms": ref["bar_ms"], **ref["curves"][AGENT]}
    _assert_same(got, want)
    assert len(seen) == WINDOW[1] - WINDOW[0] + 1 and [t for t, _ in seen] == [t for t, _ in ref_seen]
    assert all((a is None and b is None) or np.array_equal(a, b) for (_, a), (_, b) in zip(seen, ref_seen))


def test_a_bound_environment_steps_as_an_unbound_one_and_reset_ends_the_binding(market):
    pair_idx = torch.tensor([[0], [1], [0], [1]])
    start = torch.full((4,), 999)
    envs = [BatchedTradingEnv(market, pair_idx, start, 60, EnvConfig(), RiskConfig()) for _ in range(2)]
    envs[0]._fused.bind(envs[0])
    gen = torch.Generator().manual_seed(3)
    for k in range(60):
        actions = random_valid_actions(envs[1].mask, gen)
        outs = [env.step(actions) for env in envs]
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        assert torch.equal(envs[0].equity, envs[1].equity) and torch.equal(envs[0].mask, envs[1].mask)
    assert envs[0]._fused._bound is not None
    envs[0].reset()
    envs[0].step(torch.zeros((4, 1), dtype=torch.int64))
    assert envs[0]._fused._bound is None  # the reset replaced the state: the step packed it anew


def test_batch_decisions_take_each_rule_where_the_mask_allows_it(market):
    """The vectorised rules against the per-group functions of nexlify.baselines at every step of a window."""
    n_pairs, n = 2, 50
    rules = [("hold", bl.FLAT), ("lend", bl.CASH_PLUS_LENDING), ("buy", bl.BUY_AND_HOLD_SIZED),
             ("ma", bl.MA_CROSSOVER), ("random", bl.RANDOM_VALID)]
    groups = [Group(name, None, copies=2 if rule == "random" else 1, rule=rule) for rule, name in rules]
    spans, first = [], 0
    for g in groups:
        spans.append(slice(first, first + g.copies * n_pairs))
        first += g.copies * n_pairs
    B = first
    env = BatchedTradingEnv(market, torch.arange(B).remainder(n_pairs).unsqueeze(1), torch.full((B,), 1199), n,
                            EnvConfig(), RiskConfig())
    signal = bl.ma_long_signal(market.prices[..., 3])
    decide = BatchDecisions(groups, spans, env, n, signal=signal, seeds=(5, 6))
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    obs = env.reset()
    for k in range(n):
        mask = env.mask
        want = torch.cat([bl.flat(mask[spans[0]]), bl.take_lend(mask[spans[1]]), bl.buy_when_flat(mask[spans[2]]),
                          bl.ma_crossover(mask[spans[3]], signal[env.t[spans[3]].unsqueeze(-1),
                                                                 env._pair_bp[spans[3]]]),
                          *[random_valid_actions(mask[spans[4]][i * n_pairs:(i + 1) * n_pairs], g)
                            for i, g in enumerate(gens)]])
        obs, _, done, actions = step_bar(env, obs, decide, k)
        assert torch.equal(actions, want), k
    assert done


def test_the_pass_is_refused_where_the_kernel_is_not_the_cpu_one(market):
    assert not fused_pass_possible(market, [EnvConfig(kernel="torch")])
    assert not fused_pass_possible(market, [EnvConfig(), EnvConfig(fee=0.002)])
    assert fused_portfolio.PARAMS[0] == "fee"  # the rows' parameters start with the fee, as set_row_params copies
