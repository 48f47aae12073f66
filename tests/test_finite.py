"""Finite by construction, and checked as a run goes.

- Random valid actions over the whole bundled training window (the reproduction of a former failure: with
  `spot,lp` equity used to reach -0.57 USD and the log-equity reward and observation NaN) stay finite,
  with equity > 0 everywhere.
- The minimum notionals that keep fixed costs in proportion (LP gas, arbitrage withdrawal fees), the
  cash check of an entry with its fixed costs, and the LP close that would not pay its gas: masks
  computed by hand.
- The runtime guard: a NaN reward stops a pipeline with exit code 1 and one line naming the run, with
  no selected model and no model file; a NaN parameter stops training naming the parameter; no
  checkpoint with a NaN is ever written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nexlify import checkpoint, finite
from nexlify.agent.dqn import DQNAgent, random_valid_actions
from nexlify.config import ALL_STRATEGIES, EnvConfig, TrainConfig
from nexlify.env.batched import ARB, LP_CLOSE, LP_OPEN, PNL_SOURCES, STATE_NAMES, BatchedTradingEnv
from nexlify.env.market import MarketTensors, market_features
from nexlify.errors import NonFiniteError, PermanentError
from nexlify.features import WARMUP_BARS, Normalizer
from nexlify.strategies.params import ArbParams, LPParams, StrategyParams
from nexlify.training import prepare_data, train_run
from tests.helpers_market import actions, flat, make_market, one_torch_thread, quiet_risk, step_kernel  # noqa: F401
from tests.pipeline_support import REPO, error_lines, run_cli, train_args

# =============================================================== the reproduction: random valid actions


@pytest.fixture(scope="module")
def training_window():
    """The default config's data (the bundled candles to 2025-06-01) and its training window."""
    cfg = TrainConfig()
    cfg.env.strategies = list(ALL_STRATEGIES)
    market, windows = prepare_data(cfg)
    start, end = max(windows.train[0], WARMUP_BARS), windows.train[1]
    raw = market_features(market)
    return MarketTensors.build(market, Normalizer.fit(raw, start, end), "cpu", raw), start, end


@pytest.mark.parametrize("strategies", [["spot", "lp"], list(ALL_STRATEGIES)], ids=["spot,lp", "all"])
def test_random_valid_actions_over_the_whole_training_window_stay_finite(training_window, strategies):
    """8 episodes of random valid actions from the first training bar to the last (15,183 steps), the default
    config otherwise. Every reward and observation is finite (finite.check_step, the trainer's own check) and
    equity stays > 0 at every bar. Before the minimum notionals, the same run with spot,lp went negative
    at step 3,616 and all five at step 6,729; now the lowest equity seen is about 5,230 (spot,lp) and 6,670
    (all five) of 10,000. The rule guarantees > 0; the floor asserted, 2,500, is a regression bound about half
    the lowest equity seen, not a proof: it fails if fixed costs creep back out of proportion (before the rule
    these episodes ended near 0)."""
    market, start, end = training_window
    cfg = TrainConfig()
    cfg.env.strategies = strategies
    B, P, n_steps = 8, len(market.pairs), end - start - 1
    env = BatchedTradingEnv(market, torch.arange(P).expand(B, P), torch.full((B,), start), n_steps, cfg.env,
                            cfg.risk, cfg.strategy_params())
    ctx = finite.StepContext(0, [start] * B, market.timestamps, market.pairs,
                             finite.obs_names(market.n_features, STATE_NAMES))
    gen = torch.Generator().manual_seed(0)
    env.reset()
    lowest = torch.full((B,), math.inf, dtype=torch.float64)
    done = False
    while not done:
        obs, reward, done = env.step(random_valid_actions(env.mask, gen))
        finite.check_step(reward, obs, env.steps_done, ctx)
        lowest = torch.minimum(lowest, env.equity)
    assert env.steps_done == n_steps == 15_183
    assert float(lowest.min()) > 2_500.0
    pnl = env.stats.pnl.sum(0)
    assert pnl[PNL_SOURCES.index("lp_fees")] > 0, "LP positions were opened (the minimum did not mask them all)"
    assert pnl[PNL_SOURCES.index("fees_and_gas")] < 0


# ====================================================================== the minimum notionals, by hand

GAS_OPEN = 434_903 * 5e-9 * 2_500  # 5.4363 USD: LPParams' defaults (mint gas, 5 gwei, ETH at 2,500)
GAS_CLOSE = 178_028 * 5e-9 * 2_500  # 2.2254 USD
LP_MIN = (GAS_OPEN + GAS_CLOSE) / 0.02  # 383.08 USD: the round trip's gas is 2% of it
LP_MIN_CLOSE = GAS_CLOSE / 0.02  # 111.27 USD


def coin_share(width: float) -> float:
    """The coin's share of a symmetric V3 position's value at opening, from the whitepaper's amounts."""
    up, down = math.sqrt(1 + width), math.sqrt(1 - width)
    return (1 - 1 / up) / (2 - 1 / up - down)


def lp_env(equity: float, size: float, cap: float, bars, *, fee: float = 0.001, slippage_bps: float = 5.0):
    market = make_market(bars, pairs=["ETH/USDT"], volume=[0.0] * len(bars))
    cfg = EnvConfig(fee=fee, slippage_bps=slippage_bps, initial_equity=equity, strategies=["spot", "lp"])
    return BatchedTradingEnv(market, torch.zeros((1, 1), dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                             len(bars) - 1, cfg, quiet_risk(max_position=cap, fixed_size=size), StrategyParams())


def test_lp_minimum_notional_is_the_round_trips_gas_over_max_gas_share():
    lp = LPParams()
    assert lp.min_notional_usd == pytest.approx(LP_MIN, rel=1e-12) and LP_MIN == pytest.approx(383.08, abs=0.01)
    assert lp.min_close_value_usd == pytest.approx(LP_MIN_CLOSE, rel=1e-12)


def lp_cost(notional: float) -> float:
    """Cash an LP position of `notional` takes: the coin share bought at fee 0.1% + 5 bps slippage, plus gas."""
    return notional * (1 + coin_share(0.10) * 0.0015) + GAS_OPEN


# (equity, size, max_position): the sized position max(size * equity, LP_MIN) must fit the per-trade cap and,
# with its swap costs and gas, the cash
LP_CASES = [
    (10_000.0, 0.01, 0.05, True),  # 100 sized up to 383.08 <= cap 500; cost 383.4 + 5.4 <= 10,000
    (10_000.0, 0.05, 0.05, True),  # 500 as sized
    (7_000.0, 0.05, 0.05, False),  # cap 350 < 383.08: masked, not sized up past the cap
    (7_700.0, 0.01, 0.05, True),  # cap 385 >= 383.08
    (400.0, 0.5, 1.0, True),  # 200 sized up to 383.08: cost 388.8 <= cash 400
    (390.0, 1.0, 1.0, False),  # 390 >= the minimum, but 390 + swap + 5.44 gas > cash 390
    (388.0, 0.5, 1.0, False),  # cap 388 >= 383.08, but 383.08 + swap + gas = 388.8 > cash 388
]


@pytest.mark.parametrize("equity, size, cap, expected", LP_CASES)
def test_lp_open_is_masked_below_the_minimum_or_beyond_the_cash(equity, size, cap, expected, step_kernel):
    notional = max(size * equity, LP_MIN)
    by_hand = LP_MIN <= cap * equity and lp_cost(notional) <= equity
    assert by_hand == expected
    env = lp_env(equity, size, cap, [flat(100.0)] * 3)
    assert bool(env.mask[0, 0, LP_OPEN]) == expected
    env.step(actions(LP_OPEN))
    if expected:  # opened at the sized-up notional, paying exactly its cost (the price is flat: value = notional)
        assert env.lp_value.item() == pytest.approx(notional, rel=1e-9)
        assert env.cash.item() == pytest.approx(equity - lp_cost(notional), rel=1e-12)
    else:  # a masked action is a hold
        assert env.lp_liquidity.item() == 0.0 and env.cash.item() == equity


def test_lp_close_waits_while_the_position_is_worth_less_than_its_gas_allows(step_kernel):
    """A 500 position on +-10% around 100 (no fees): L = 500 / 0.97857 = 510.95, 5.1417 coins below the range.
    At 20 it is worth 102.8 < 111.27 (its 2.23 gas would be 2.2% of it): LP_CLOSE is masked and a close asked
    for is a hold; at 25 it is worth 128.5: the close is valid and goes through."""
    env = lp_env(10_000.0, 0.05, 0.05, [flat(100.0), flat(100.0), flat(20.0), flat(25.0), flat(25.0)],
                 fee=0.0, slippage_bps=0.0)
    env.step(actions(LP_OPEN))
    L = 500.0 / ((1 / 10 - 1 / math.sqrt(110)) * 100 + (10 - math.sqrt(90)))
    coins = L * (1 / math.sqrt(90) - 1 / math.sqrt(110))
    env.step(actions(0))
    assert env.lp_value.item() == pytest.approx(coins * 20, rel=1e-9) and coins * 20 < LP_MIN_CLOSE
    assert not env.mask[0, 0, LP_CLOSE]
    env.step(actions(LP_CLOSE))
    assert env.lp_liquidity.item() > 0
    assert env.lp_value.item() == pytest.approx(coins * 25, rel=1e-9) and coins * 25 >= LP_MIN_CLOSE
    assert env.mask[0, 0, LP_CLOSE]
    env.step(actions(LP_CLOSE))
    assert env.lp_liquidity.item() == 0.0
    assert env.cash.item() == pytest.approx(10_000 - 500 - GAS_OPEN + coins * 25 - GAS_CLOSE, rel=1e-12)


@pytest.mark.parametrize("cap, expected", [(0.05, False), (0.2, True)])
def test_arbitrage_book_is_sized_up_to_one_withdrawal_fee_over_max_withdrawal_share(cap, expected, step_kernel):
    """BTC at 50,000 on Binance, 51,500 on the second venue (an edge of 3% against 0.7% of fees and 0.1% of
    amortised transfer). One withdrawal fee is 0.0005 BTC = 25 USD, so a book needs 25 / 0.02 = 1,250 USD.
    Size 5% of 10,000 = 500: with a 5% cap (500) the book is masked; with a 20% cap (2,000) it is sized up to
    1,250 (a quarter of it, 312.5, in quote and in coin on each venue; the book then trades the edge)."""
    market = make_market([flat(50_000.0)] * 3, pairs=["BTC/USDT"])
    market.venue2_prices = torch.tensor([[flat(51_500.0)]] * 3, dtype=torch.float64)
    market.venue2_available = torch.ones((3, 1), dtype=torch.bool)
    cfg = EnvConfig(fee=0.0, slippage_bps=0.0, initial_equity=10_000.0, strategies=["spot", "arbitrage"])
    params = StrategyParams(arbitrage=ArbParams(taker_fee_a=0.001, taker_fee_b=0.006))
    env = BatchedTradingEnv(market, torch.zeros((1, 1), dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 2,
                            cfg, quiet_risk(max_position=cap, fixed_size=0.05), params)
    assert 0.0005 * 50_000 / 0.02 == 1_250.0
    assert bool(env.mask[0, 0, ARB]) == expected
    env.step(actions(ARB))
    book = env.arb_inventory
    if expected:
        # funded with 1,250 plus the taker fees on the quarters of coin bought: 312.5 * (0.001 + 0.006)
        assert book["open"].item() and env.cash.item() == pytest.approx(10_000 - 1_250 - 312.5 * 0.007, rel=1e-12)
    else:
        assert not book["open"].item() and env.cash.item() == 10_000.0


# ============================================================================== the runtime guard


def test_check_step_names_the_episode_the_pair_and_the_feature():
    stamps = np.array([1_700_000_000_000 + 3_600_000 * i for i in range(40)], dtype=np.int64)
    names = finite.obs_names(2, STATE_NAMES)
    ctx = finite.StepContext(7, [10, 20], stamps, ["BTC/USDT", "SOL/USDT"], names)
    reward, obs = torch.zeros((2, 2)), torch.zeros((2, 2, len(names)))
    finite.check_step(reward, obs, 3, ctx)  # all finite: nothing happens
    bad_reward = reward.clone()
    bad_reward[1, 1] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        finite.check_step(bad_reward, obs, 3, ctx)
    date = np.datetime64(int(stamps[20]), "ms").astype("datetime64[s]").astype(str)
    assert str(err.value) == (f"non-finite reward[SOL/USDT] = nan at step 3 (seed 7, episode 1 of the batch "
                              f"(start bar 20, {date}Z))")
    assert isinstance(err.value, PermanentError) and err.value.details["start_bar"] == 20
    bad_obs = obs.clone()
    bad_obs[0, 1, 2 + STATE_NAMES.index("log_equity_change")] = -float("inf")
    with pytest.raises(NonFiniteError, match=r"observation log_equity_change\[SOL/USDT\] = -inf at step 4 "
                                             r"\(seed 7, episode 0 of the batch \(start bar 10"):
        finite.check_step(reward, bad_obs, 4, ctx)


def test_no_checkpoint_with_a_nan_is_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = {"model_state_dict": model.state_dict(), "optimizer_state_dict": {"state": {0: {
        "exp_avg": torch.tensor([1.0, float("nan")])}}}}
    with pytest.raises(NonFiniteError, match=r"non-finite optimizer_state_dict\.state\.0\.exp_avg"):
        checkpoint.save(state, tmp_path / "x.pt")
    with pytest.raises(NonFiniteError):
        checkpoint.to_bytes(state)
    assert list(tmp_path.iterdir()) == []


def tiny_train_config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.pairs = ["BTC/USDT"]
    cfg.data.start, cfg.data.end, cfg.data.val_days = "2025-03-01", "2025-06-01", 20
    cfg.env.strategies = ["spot"]
    cfg.env.episode_bars, cfg.env.num_envs = 200, 2
    cfg.agent.learning_starts, cfg.agent.batch_size, cfg.agent.train_every = 32, 16, 1
    cfg.agent.algorithm = "dqn"  # the checks inside the Q-learner's loop
    return cfg


def test_a_nan_parameter_stops_training_naming_the_parameter(monkeypatch):
    """After the 40th gradient step one weight of the first layer becomes NaN: the next check (every 16
    gradient steps here) stops the run naming that parameter; no resume checkpoint is written after it."""
    cfg = tiny_train_config()
    market, windows = prepare_data(cfg)
    learn = DQNAgent.learn
    first = {}

    def poisoned(self):
        loss = learn(self)
        if self.grad_steps == 40:
            name, weight = next(iter(self.model.named_parameters()))
            first["name"] = name
            with torch.no_grad():
                weight.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(DQNAgent, "learn", poisoned)
    monkeypatch.setattr(finite, "LEARN_CHECK_EVERY", 16)
    saved = []
    with pytest.raises(NonFiniteError) as err:
        train_run(cfg, market, windows, seed=3, episodes=4, checkpoint_every=2, on_checkpoint=saved.append)
    assert f"non-finite parameter {first['name']} = nan at gradient step 48 (seed 3)" in str(err.value)
    assert err.value.details["quantity"] == f"parameter {first['name']}"
    assert saved == []  # the first round (2 episodes of 199 steps) ends after the NaN: no checkpoint


def test_a_nan_reward_fails_the_pipeline_with_one_line_and_no_model(tmp_path):
    """A NaN injected into the reward of step 5 of every training episode (a sitecustomize module on the
    workers' PYTHONPATH wraps the environment's step): the pipeline exits 1 with one line naming each run and
    the cause, result.json says failed with that reason, nothing is selected and no model file exists."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('NEXLIFY_TEST_NAN_REWARD_AT'):\n"
        "    from nexlify.env import batched\n"
        "    at = int(os.environ['NEXLIFY_TEST_NAN_REWARD_AT'])\n"
        "    original = batched.BatchedTradingEnv.step\n"
        "    def step(self, actions):\n"
        "        obs, reward, done = original(self, actions)\n"
        "        if self.steps_done == at:\n"
        "            reward = reward.clone()\n"
        "            reward[0, 0] = float('nan')\n"
        "        return obs, reward, done\n"
        "    batched.BatchedTradingEnv.step = step\n")
    out = tmp_path / "out"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(hooks)]), "NEXLIFY_TEST_NAN_REWARD_AT": "5"}
    proc = run_cli(train_args(str(out)), env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # each worker logs its own `failed` event (JSON mode: stderr is not a terminal); the pipeline's is one line
    errors = [line for line in error_lines(proc.stderr) if line.startswith("error: runs failed")]
    assert len(errors) == 1
    line = errors[0]
    assert line.startswith("error: runs failed: init-1: non-finite reward[BTC/USDT] = nan at step 5 (seed 42, "
                           "episode 0 of the batch (start bar ")
    assert "; init-2: non-finite reward[BTC/USDT] = nan at step 5 (seed 1042, episode 0" in line
    assert "score" not in line
    for run in ("run_1", "run_2"):
        result = json.loads((out / "initial_runs" / run / "result.json").read_text())
        assert result["status"] == "failed" and result["error"] == "non_finite"
        assert "non-finite reward[BTC/USDT]" in result["reason"] and "val_score" not in result
    state = json.loads((out / "pipeline_state.json").read_text())
    assert "best" not in state and state["phase"] != "SELECTED"
    assert [f["run"] for f in state["failures"]] == ["init-1", "init-2"]
    assert [f["details"]["exit_code"] for f in state["failures"]] == [3, 3]  # NonFiniteError: no retry
    assert not (out / "complete_training_summary.json").exists()
    assert list(Path(out).rglob("*.pt")) == []


def test_a_non_finite_validation_metric_is_never_recorded_as_a_result():
    finite.check_metrics({"score": 1.5, "per_pair": {"BTC/USDT": {"sharpe": 0.3, "trades": 4}}}, "validation")
    with pytest.raises(NonFiniteError, match=r"^non-finite validation metric per_pair\.BTC/USDT\.sharpe = nan$"):
        finite.check_metrics({"score": 1.5, "per_pair": {"BTC/USDT": {"sharpe": float("nan")}}}, "validation")
