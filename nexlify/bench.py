"""`nexlify bench`: throughput figures on the bundled candles (speed goals live here, not in tests)."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from nexlify.agent.dqn import random_valid_actions
from nexlify.busy import busy_core as start_busy_core
from nexlify.config import EnvConfig, TrainConfig
from nexlify.configtools import validate_tree
from nexlify.env.batched import N_ACTIONS, BatchedTradingEnv
from nexlify.env.market import MarketTensors, market_features
from nexlify.features import WARMUP_BARS, Normalizer
from nexlify.data.second_venue import load_second_venue
from nexlify.device import resolve_device
from nexlify.training import prepare_data, train_run


def _setup(pairs: list[str], device: str, threads: int, strategies: list[str] | None = None,
           precision: str = EnvConfig.precision, kernel: str = EnvConfig.kernel) -> tuple[TrainConfig, object, object]:
    cfg = TrainConfig()
    cfg.env.kernel = kernel
    cfg.data.pairs = list(pairs)
    cfg.device = device
    cfg.threads = threads
    cfg.env.precision = precision
    if strategies is not None:
        cfg.env.strategies = list(strategies)
    validate_tree(cfg)
    torch.set_num_threads(threads)
    market, windows = prepare_data(cfg)
    return cfg, market, windows


def bench_env(pairs: list[str], batch_size: int, steps: int, device: str = "cpu", threads: int = TrainConfig.threads,
              strategies: list[str] | None = None, precision: str = EnvConfig.precision, policy: str = "valid",
              kernel: str = EnvConfig.kernel, compile_step: bool = False, busy_core: bool = False) -> dict:
    """Random actions for `steps` steps of `batch_size` episodes; env steps = episodes x steps.

    compile_step: the tensor step (kernel "torch") compiled with torch.compile (Inductor: C++ on the CPU,
    Triton on a GPU), the other candidate beside the fused kernel; warmup_s then holds the compile time.

    policy "valid" draws uniformly among each slot's valid actions (agent.dqn.random_valid_actions, as
    an exploring agent does; with the fused kernels the draw costs a large part of the step); "uniform"
    draws uniformly among all actions and lets the environment turn the invalid ones into hold, as a
    random agent that ignores the mask would.

    Episodes start at the first bar where every pair has the second venue (Coinbase's history starts on
    2024-04-18), for spot-only runs too, so that figures with and without strategies cover the same bars
    and the arbitrage strategy really trades.

    busy_core: the measured steps run with one CPU of this process's affinity kept busy by a spinning process
    (nexlify.busy), as on a shared machine; the JSON's `busy_core` names that CPU (null: a quiet run)."""
    cfg, market, windows = _setup(pairs, device, threads, strategies, precision, kernel)
    dev = resolve_device(device)
    raw = market_features(market)
    tensors = MarketTensors.build(market, Normalizer.fit(raw, WARMUP_BARS, windows.train[1]), dev, raw)
    n_pairs = len(market.pairs)
    first = max(WARMUP_BARS, _first_second_venue_bar(cfg, market))
    steps = min(steps, windows.train[1] - first - 2)
    gen = torch.Generator(device=dev).manual_seed(0)
    start = torch.full((batch_size,), first, dtype=torch.int64)
    env = BatchedTradingEnv(tensors, torch.arange(n_pairs).expand(batch_size, n_pairs), start, steps, cfg.env, cfg.risk,
                            cfg.strategy_params())
    if compile_step:
        if env._fused is not None:
            raise ValueError("compile_step compiles the tensor step: pass kernel='torch'")
        env._advance = torch.compile(env._advance, dynamic=False)

    def run(n: int) -> None:
        env.reset()
        for _ in range(n):
            if policy == "uniform":
                env.step(torch.randint(0, N_ACTIONS, (batch_size, n_pairs), device=dev, generator=gen))
            else:
                env.step(random_valid_actions(env.mask, gen))

    t0 = time.perf_counter()
    run(min(20, steps))  # warm-up: allocator, caches (and torch.compile's compilation)
    _sync(dev)
    warmup = time.perf_counter() - t0
    with _busy(busy_core) as busy:
        t0, c0 = time.perf_counter(), time.process_time()
        run(steps)
        _sync(dev)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"bench": "env", "pairs": n_pairs, "batch_size": batch_size, "steps": steps, "device": str(dev),
            "threads": threads, "strategies": ",".join(cfg.env.strategies), "precision": precision,
            "policy": policy, "kernel": _kernel_name(env, compile_step), "busy_core": _busy_cpu(busy),
            "warmup_s": round(warmup, 1),
            "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "env_steps_per_s": round(batch_size * steps / seconds)}


def _busy(on: bool):
    """A busy core for the block (nexlify.busy.busy_core), or nothing."""
    return start_busy_core() if on else nullcontext()


def _busy_cpu(busy) -> int | str | None:
    """The JSON's `busy_core`: the CPU kept busy, "unpinned" where the platform cannot pin, null when quiet."""
    if busy is None:
        return None
    return "unpinned" if busy.cpu is None else busy.cpu


def _kernel_name(env: BatchedTradingEnv, compile_step: bool) -> str:
    if env._fused is not None:
        return "fused-cuda" if env._fused.target == "cuda" else "fused"
    return "torch.compile" if compile_step else "torch"


def _first_second_venue_bar(cfg: TrainConfig, market) -> int:
    """The first bar at which the second venue has every pair (0 when it never has)."""
    venue = market.second_venue or load_second_venue(market, cfg.arbitrage.second_exchange, cfg.arbitrage.second_quote,
                                                     cfg.data.data_dir)
    everywhere = venue.available.all(axis=1)
    return int(everywhere.argmax()) if everywhere.any() else 0


def bench_train(pairs: list[str], batch_size: int, steps: int, device: str = "cpu", threads: int = TrainConfig.threads,
                strategies: list[str] | None = None, kernel: str = EnvConfig.kernel, busy_core: bool = False) -> dict:
    """One round of `batch_size` episodes of `steps` steps, acting, storing and learning as in training.
    busy_core: as bench_env's, for the whole round."""
    cfg, market, windows = _setup(pairs, device, threads, strategies, kernel=kernel)
    cfg.env.num_envs = batch_size
    cfg.env.episode_bars = steps + 1
    with _busy(busy_core) as busy:
        out = train_run(cfg, market, windows, seed=0, episodes=batch_size)
    t = out.timings
    return {"bench": "train", "pairs": len(market.pairs), "batch_size": batch_size, "steps": steps,
            "device": t.get("device", str(resolve_device(device))), "threads": threads, "busy_core": _busy_cpu(busy),
            "strategies": ",".join(cfg.env.strategies), "seconds": t["train_s"],
            "grad_steps": out.agent.grad_steps, "train_env_steps_per_s": round(t["train_env_steps_per_s"])}


def bench_eval(pairs: list[str], bars: int, threads: int = TrainConfig.threads, strategies: list[str] | None = None,
               seeds: int = 5, env_batch: int = 4096, env_steps: int = 300, grouped: bool = False) -> dict:
    """Evaluation as `nexlify evaluate` runs it (nexlify.evaluation.evaluate_with_baselines): an agent (an untrained
    Q-network, seeded) and every baseline, random over `seeds` seeds, on the last `bars` bars of the candles
    before the test window. policy-steps = rows (policies x copies x pairs) x bars. Beside it, bench env's figure
    (random valid actions, `env_batch` episodes, `env_steps` steps) on the same machine and threads. grouped: also
    time the evaluation stepped one batch per config (evaluate_with_baselines_grouped) with the same numbers."""
    from nexlify.agent.dqn import DuelingQNet
    from nexlify.env.batched import observation_size
    from nexlify.evaluation import evaluate_with_baselines, evaluate_with_baselines_grouped

    cfg, market, windows = _setup(pairs, "cpu", threads, strategies)
    raw = market_features(market)
    tensors = MarketTensors.build(market, Normalizer.fit(raw, WARMUP_BARS, windows.train[1]), torch.device("cpu"), raw)
    i1 = windows.test[0] if windows.test else windows.val[1]
    i0 = max(WARMUP_BARS + 1, i1 - bars)
    seeds_used = tuple(range(seeds))  # RANDOM_SEEDS are 0 .. 4
    torch.manual_seed(0)
    model = DuelingQNet(observation_size(tensors.n_features), N_ACTIONS, cfg.agent.hidden)
    rows = (6 + seeds) * len(market.pairs)  # the agent, five baselines, and random over the seeds, per pair

    def timed(evaluate) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        evaluate(model, tensors, (i0, i1), cfg.env, cfg.risk, cfg.strategy_params(), margin=cfg.agent.hold_margin,
                 seeds=seeds_used)
        return time.perf_counter() - t0, time.process_time() - c0

    evaluate_with_baselines(model, tensors, (i0, min(i1, i0 + 20)), cfg.env, cfg.risk, cfg.strategy_params(),
                            margin=0.0, seeds=seeds_used)  # warm-up: the kernel loaded or compiled
    seconds, cpu_seconds = timed(evaluate_with_baselines)
    n = i1 - i0
    out = {"bench": "eval", "pairs": len(market.pairs), "bars": n, "rows": rows, "threads": threads,
           "strategies": ",".join(cfg.env.strategies), "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
           "policy_steps_per_s": round(rows * n / seconds),
           # per CPU-second: what a shared machine's load does not change as much as the wall time
           "policy_steps_per_cpu_s": round(rows * n / cpu_seconds) if cpu_seconds > 0 else None}
    if grouped:
        g_seconds, g_cpu = timed(evaluate_with_baselines_grouped)
        out.update({"grouped_seconds": round(g_seconds, 3), "grouped_cpu_seconds": round(g_cpu, 3),
                    "grouped_policy_steps_per_s": round(rows * n / g_seconds)})
    env = bench_env(pairs, env_batch, env_steps, "cpu", threads, strategies)
    out.update({"env_batch_size": env_batch, "env_steps_per_s": env["env_steps_per_s"]})
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()
