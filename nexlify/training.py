"""One training run, top to bottom: seed, data, environment, agent, the loop, validation.

Episodes run in rounds of `num_envs` episodes stepped together. The replay buffer and the n-step
windows start empty at every round, so the state between rounds is only the agent (weights, target,
optimiser, random generator) and a few counters: that state is the resume checkpoint, and a run
resumed from it ends bit-for-bit where an uninterrupted run ends (on CPU).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from nexlify import finite
from nexlify.agent import forecast_units
from nexlify.agent.dqn import DQNAgent
from nexlify.agent.forecast import ForecastAgent, forward_log_returns
from nexlify.config import TrainConfig
from nexlify.configtools import to_dict
from nexlify.data.candles import MarketData, Windows
# the data preparation lives in nexlify.data.prepare (torch-free, shared with the controller)
from nexlify.data.prepare import attach_second_venue, prepare_data  # noqa: F401 (re-exported)
from nexlify.data.timeframes import MS_PER_DAY
from nexlify.device import resolve_device
from nexlify.env.batched import N_ACTIONS, STATE_NAMES, BatchedTradingEnv, observation_size
from nexlify.env.market import MarketTensors, market_features
from nexlify.errors import InputError, NonFiniteError
from nexlify.evaluation import BaselineStore, evaluate_policy, evaluate_with_stored_baselines
from nexlify.features import WARMUP_BARS, Normalizer


MAX_AUTO_ENVS = 1024  # num_envs = 0 steps all of a run's episodes together, up to this many


class Preempted(Exception):
    """The run was asked to stop (SIGTERM); the last round's state is in `state`."""

    def __init__(self, state: dict | None) -> None:
        super().__init__("training stopped by a termination signal")
        self.state = state


@dataclass
class RunOutput:
    agent: DQNAgent
    normalizer: Normalizer
    val_metrics: dict
    train_return: float  # mean total return % of the last round's (exploring) episodes; forecast: of its holdout days
    episodes_trained: int  # 0 for the forecast learner, which runs no episodes
    timings: dict
    train_returns: list[float] = field(default_factory=list)
    test_metrics: dict | None = None
    # the baselines of nexlify.baselines on the same windows, in the same environment ({name: metrics})
    val_baselines: dict | None = None
    test_baselines: dict | None = None
    baseline_notes: dict | None = None


def epsilon_at(step: int, total_steps: int, start: float, end: float, decay_fraction: float) -> float:
    """Linear decay from start to end over decay_fraction of the run, then constant: it really decays."""
    horizon = max(1.0, decay_fraction * total_steps)
    frac = min(1.0, step / horizon)
    return start + (end - start) * frac


def train_run(
    cfg: TrainConfig,
    market: MarketData,
    windows: Windows,
    *,
    seed: int,
    episodes: int,
    init: dict | None = None,
    resume: dict | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    on_round: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    baselines: BaselineStore | None = None,
) -> RunOutput:
    """Train for `episodes` episodes from scratch, from `init` (a checkpoint to continue from), or from
    `resume` (this run's own resume state), then validate greedily on windows.val.

    `on_checkpoint` gets the resume state every `checkpoint_every` episodes (0: never before the end); the
    caller says how often (the pipeline's setting is PipelineConfig.checkpoint_every), so it is needed with
    `on_checkpoint` and means nothing without it. `baselines`: where the pipeline keeps its windows' baselines
    (nexlify.evaluation.evaluate_with_stored_baselines; None: computed here)."""
    if on_checkpoint is not None and checkpoint_every is None:
        raise TypeError("train_run: on_checkpoint needs checkpoint_every")
    # --- seeding and threads: everything random flows from `seed`
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    t_begin = time.perf_counter()

    # --- data: features once for the whole series; normalisation fitted on training bars only
    train_start = max(windows.train[0], WARMUP_BARS)
    train_end = windows.train[1]
    raw = market_features(market)
    source = resume or init
    normalizer = Normalizer.from_dict(source["normalizer"]) if source else Normalizer.fit(raw, train_start, train_end)
    tensors = MarketTensors.build(market, normalizer, device, raw)
    n_pairs = len(market.pairs)
    strategy_params = cfg.strategy_params()

    if cfg.agent.algorithm == "forecast":
        # a forecast is fitted afresh from its own seed, also when the pipeline retrains from a best model
        # (`init`): that model was refitted on its holdout days too, so continuing from it would make the
        # holdout gate partly in-sample. Only `init`'s normaliser (fitted on the same training bars) is kept.
        agent, fit_seconds = _fit_forecast(cfg, market, tensors, train_start, train_end, seed=seed, device=device,
                                           should_stop=should_stop, on_progress=on_step)
        if on_step is not None:
            on_step(1, 1)
        # its training figure: the refitted policy's return on the training window's last days (the holdout)
        holdout = (_holdout_start(market, cfg.agent.forecast_holdout_days, train_start, train_end), train_end)
        own = evaluate_policy(agent.model, tensors, holdout, cfg.env, cfg.risk, strategy_params,
                              margin=cfg.agent.hold_margin)
        return _validated(cfg, agent, tensors, windows, normalizer, strategy_params, baselines, t_begin=t_begin,
                          train_seconds=fit_seconds, env_steps=0, episodes_done=0,  # it runs no episodes
                          train_returns=[own["avg_return"]], last_round=[own["avg_return"]])

    # --- agent
    agent = DQNAgent(observation_size(tensors.n_features), N_ACTIONS, cfg.agent, device, seed)
    if init is not None:
        agent.load_state_dict(init)
    eps_first = cfg.agent.eps_continue if init is not None else cfg.agent.eps_start

    # --- schedule
    span = train_end - train_start
    episode_bars = min(cfg.env.episode_bars or span, span)
    n_steps = episode_bars - 1
    num_envs = cfg.env.num_envs or min(episodes, MAX_AUTO_ENVS)
    n_rounds = math.ceil(episodes / num_envs)
    total_steps = n_rounds * n_steps
    first_round, global_step, train_returns = 0, 0, []
    if resume is not None:
        agent.load_state_dict(resume)
        agent.generator.set_state(resume["generator_state"].cpu())
        first_round = int(resume["rounds_done"])
        global_step = int(resume["global_step"])
        train_returns = list(resume["train_returns"])
    episodes_done = min(first_round * num_envs, episodes)
    last_state: dict | None = resume

    def snapshot(rounds_done: int) -> dict:
        state = copy.deepcopy(agent.state_dict())
        state.update(generator_state=agent.generator.get_state(), rounds_done=rounds_done, global_step=global_step,
                     train_returns=list(train_returns), episodes_done=min(rounds_done * num_envs, episodes),
                     normalizer=normalizer.to_dict(), seed=seed, config=to_dict(cfg))
        return state

    # --- the loop: rounds of num_envs episodes stepping together
    t_train = time.perf_counter()
    env_steps = 0
    learn_watch = finite.LearnWatch(agent.model, seed)  # losses and weights, every few hundred gradient steps
    obs_names = finite.obs_names(tensors.n_features, STATE_NAMES)
    for rnd in range(first_round, n_rounds):
        n_env = min(num_envs, episodes - rnd * num_envs)
        rng = np.random.default_rng([seed, rnd])
        offsets = rng.integers(0, span - episode_bars + 1, size=n_env)
        start = torch.as_tensor(train_start + offsets, dtype=torch.int64)
        pair_idx = torch.arange(n_pairs).unsqueeze(0).expand(n_env, n_pairs)
        env = BatchedTradingEnv(tensors, pair_idx, start, n_steps, cfg.env, cfg.risk, strategy_params)
        step_ctx = finite.StepContext(seed, start.tolist(), tensors.timestamps, tensors.pairs, obs_names)
        agent.buffer.clear()
        agent.window.reset()
        obs = env.reset().flatten(0, 1)
        mask = env.mask.flatten(0, 1)
        done = False
        while not done:
            eps = epsilon_at(global_step, total_steps, eps_first, cfg.agent.eps_end, cfg.agent.eps_decay_fraction)
            action = agent.act(obs, mask, eps)
            next_obs, reward, done = env.step(action.view(n_env, n_pairs))
            finite.check_step(reward, next_obs, env.steps_done, step_ctx)
            next_obs, next_mask = next_obs.flatten(0, 1), env.mask.flatten(0, 1)
            agent.remember(obs, action, reward.flatten(), next_obs, next_mask, episode_end=done)
            if global_step % cfg.agent.train_every == 0:
                learn_watch.loss(agent.learn(), agent.grad_steps)
            obs, mask = next_obs, next_mask
            global_step += 1
            env_steps += n_env
            if on_step is not None and global_step % 256 == 0:
                on_step(global_step, total_steps)
            if should_stop is not None and should_stop():
                raise Preempted(last_state)
        learn_watch.check(agent.grad_steps)
        round_returns = ((env.stats.equity / env.stats.initial_equity - 1.0) * 100.0).tolist()
        train_returns.extend(round_returns)
        episodes_done += n_env
        last_state = snapshot(rnd + 1)
        if on_round is not None:
            on_round({"round": rnd + 1, "rounds": n_rounds, "episodes_done": episodes_done,
                      "epsilon": eps, "mean_return": float(np.mean(round_returns)), "grad_steps": agent.grad_steps,
                      "returns": round_returns, **agent.stats.take()})
        boundary = checkpoint_every is not None and checkpoint_every > 0 and (
            (episodes_done // checkpoint_every) > ((episodes_done - n_env) // checkpoint_every))
        if on_checkpoint is not None and boundary and rnd + 1 < n_rounds:
            on_checkpoint(last_state)
    train_seconds = time.perf_counter() - t_train

    last_round = train_returns[-min(len(train_returns), num_envs):] if train_returns else [0.0]
    return _validated(cfg, agent, tensors, windows, normalizer, strategy_params, baselines, t_begin=t_begin,
                      train_seconds=train_seconds, env_steps=env_steps, episodes_done=episodes_done,
                      train_returns=train_returns, last_round=last_round)


def _validated(cfg: TrainConfig, agent, tensors: MarketTensors, windows: Windows, normalizer: Normalizer,
               strategy_params, baselines: BaselineStore | None, *, t_begin: float, train_seconds: float,
               env_steps: int, episodes_done: int, train_returns: list[float], last_round: list[float]) -> RunOutput:
    """The trained agent's greedy policy on the validation window (and the test window, when configured),
    beside the baselines, as the run's output."""
    t_val = time.perf_counter()
    margin = cfg.agent.hold_margin
    # the baselines once per pipeline: read from `baselines` when an earlier run of it stored them
    val = evaluate_with_stored_baselines(agent.model, tensors, windows.val, cfg.env, cfg.risk, strategy_params,
                                         baselines, margin=margin)
    test = (evaluate_with_stored_baselines(agent.model, tensors, windows.test, cfg.env, cfg.risk, strategy_params,
                                           baselines, margin=margin)
            if windows.test else None)
    val_metrics = val["agent"]
    test_metrics = test["agent"] if test is not None else None
    val_seconds = time.perf_counter() - t_val
    total_seconds = time.perf_counter() - t_begin
    return RunOutput(
        agent=agent, normalizer=normalizer, val_metrics=val_metrics, test_metrics=test_metrics,
        val_baselines=val["baselines"], test_baselines=test["baselines"] if test is not None else None,
        baseline_notes=val["baseline_notes"],
        train_return=float(np.mean(last_round)), episodes_trained=episodes_done, train_returns=train_returns,
        timings={"train_s": round(train_seconds, 3), "validate_s": round(val_seconds, 3),
                 "total_s": round(total_seconds, 3), "env_steps": env_steps,
                 "train_env_steps_per_s": round(env_steps / train_seconds, 1) if train_seconds > 0 else None},
    )


def _fit_forecast(cfg: TrainConfig, market: MarketData, tensors: MarketTensors, train_start: int, train_end: int, *,
                  seed: int, device: torch.device,
                  should_stop: Callable[[], bool] | None,
                  on_progress: Callable[[int, int], None] | None = None) -> tuple[ForecastAgent, float]:
    """The forecast learner's training (nexlify.agent.forecast): rows are (bar, pair) of the training window,
    features the normalised market features at the bar's close, labels the log return from the next open over
    forecast_horizon bars in the learner's units, every label ending inside the window. The last
    forecast_holdout_days stop the fit early (their rows' labels start after the fit rows' end); then it is
    refitted on every row, and silenced (forecast zero, no trades) unless the early-stopped fit beat forecasting
    zero on the holdout by forecast_min_t. Returns the agent and the seconds it took."""
    a = cfg.agent
    t0 = time.perf_counter()
    agent = ForecastAgent(tensors.n_features, a.hidden, a.learning_rate, device, seed, a.forecast_members)
    h = a.forecast_horizon
    y = forward_log_returns(market.open, market.close, h) * forecast_units(a, cfg.risk)
    x = tensors.features
    last = train_end - h  # the last row's label ends at the close of bar train_end - 1
    split = _holdout_start(market, a.forecast_holdout_days, train_start, train_end)
    if last - split < 1 or split - h - train_start < 1:
        raise InputError(f"the training window ({train_end - train_start} bars) is too short for forecast_holdout_days "
                         f"{a.forecast_holdout_days} and forecast_horizon {h}; accepted: a holdout and a horizon that "
                         "leave rows to fit on both sides")

    def rows(t0_: int, t1_: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs = x[t0_:t1_].reshape(-1, x.shape[-1])
        ys = torch.as_tensor(y[t0_:t1_].reshape(-1), dtype=torch.float32, device=x.device)
        return xs, ys

    x_fit, y_fit = rows(train_start, split - h)
    x_hold, y_hold = rows(split, last)
    x_all, y_all = rows(train_start, last)
    for name, v in (("features", x_all), ("labels", y_all)):
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"the forecast's training {name} hold a non-finite value", quantity=name)
    try:
        agent.train(x_fit, y_fit, x_hold, y_hold, x_all, y_all, batch_size=a.forecast_batch_size,
                    eval_every=a.forecast_eval_every, patience=a.forecast_patience, max_steps=a.forecast_max_steps,
                    rows_per_bar=x.shape[1], lag=h, should_stop=should_stop, on_progress=on_progress)
    except InterruptedError:
        raise Preempted(None) from None
    if agent.fit.holdout_t < a.forecast_min_t:  # no evidence of an edge on unseen days: trade none
        agent.silence()
        agent.fit.silenced = True
    finite.check_parameters(agent.model, step=agent.grad_steps, seed=seed)
    return agent, time.perf_counter() - t0


def _holdout_start(market: MarketData, days: int, start: int, end: int) -> int:
    """The first bar of the forecast's holdout: the last `days` whole days before bar `end` (exclusive), by
    timestamps, but at most the last third of the training window [start, end) (a short window keeps two
    thirds to fit on)."""
    ts = np.asarray(market.timestamps, dtype=np.int64)
    by_days = int(np.searchsorted(ts, ts[end - 1] + market.timeframe_ms - days * MS_PER_DAY))
    return max(by_days, start + (2 * (end - start)) // 3)
