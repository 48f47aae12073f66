"""`nexlify bench`: throughput figures on the bundled candles (speed goals live here, not in tests)."""

from __future__ import annotations

import time

import torch

from nexlify.config import TrainConfig
from nexlify.env.batched import BatchedTradingEnv
from nexlify.env.market import MarketTensors, market_features
from nexlify.features import WARMUP_BARS, Normalizer
from nexlify.training import prepare_data, resolve_device, train_run


def _setup(pairs: list[str], device: str, threads: int) -> tuple[TrainConfig, object, object]:
    cfg = TrainConfig()
    cfg.data.pairs = list(pairs)
    cfg.device = device
    cfg.threads = threads
    torch.set_num_threads(threads)
    market, windows = prepare_data(cfg)
    return cfg, market, windows


def bench_env(pairs: list[str], batch_size: int, steps: int, device: str = "cpu", threads: int = 1) -> dict:
    """Random valid actions for `steps` steps of `batch_size` episodes; env steps = episodes x steps."""
    cfg, market, windows = _setup(pairs, device, threads)
    dev = resolve_device(device)
    raw = market_features(market)
    tensors = MarketTensors.build(market, Normalizer.fit(raw, WARMUP_BARS, windows.train[1]), dev, raw)
    n_pairs = len(market.pairs)
    steps = min(steps, windows.train[1] - WARMUP_BARS - 2)
    gen = torch.Generator(device=dev).manual_seed(0)
    start = torch.full((batch_size,), WARMUP_BARS, dtype=torch.int64)
    env = BatchedTradingEnv(tensors, torch.arange(n_pairs).expand(batch_size, n_pairs), start, steps, cfg.env, cfg.risk)

    def run(n: int) -> None:
        env.reset()
        for _ in range(n):
            noise = torch.rand(env.mask.shape, device=dev, generator=gen)
            env.step(torch.where(env.mask, noise, -1.0).argmax(-1))

    run(min(20, steps))  # warm-up: allocator, caches
    _sync(dev)
    t0 = time.perf_counter()
    run(steps)
    _sync(dev)
    seconds = time.perf_counter() - t0
    return {"bench": "env", "pairs": n_pairs, "batch_size": batch_size, "steps": steps, "device": str(dev),
            "threads": threads, "seconds": round(seconds, 3), "env_steps_per_s": round(batch_size * steps / seconds)}


def bench_train(pairs: list[str], batch_size: int, steps: int, device: str = "cpu", threads: int = 1) -> dict:
    """One round of `batch_size` episodes of `steps` steps, acting, storing and learning as in training."""
    cfg, market, windows = _setup(pairs, device, threads)
    cfg.env.num_envs = batch_size
    cfg.env.episode_bars = steps + 1
    out = train_run(cfg, market, windows, seed=0, episodes=batch_size)
    t = out.timings
    return {"bench": "train", "pairs": len(market.pairs), "batch_size": batch_size, "steps": steps,
            "device": t.get("device", str(resolve_device(device))), "threads": threads, "seconds": t["train_s"],
            "grad_steps": out.agent.grad_steps, "train_env_steps_per_s": round(t["train_env_steps_per_s"])}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()
