"""Checks for a machine with a CUDA GPU (CI has none; run this where one is lent).

1. The GPU paths against the fused CPU kernel, side by side on real candles (3 pairs with the Coinbase venue,
   every strategy on, float64, busy risk settings): the tensor step (kernel torch) and the CUDA kernel (kernel
   cuda: the CPU kernel's source compiled by numba-cuda; pip install '.[gpu]'). The same actions, then the
   largest differences in equity, reward and observation, and the first step where the masks part, if any;
   once on free paths, once starting every step from the CPU's state (one step's differences).
2. `nexlify bench env` on the GPU, spot alone and every strategy: the tensor step and the CUDA kernel at
   16,384 and 65,536 episodes; `bench train` with each (the CUDA kernel at 2,048 episodes only).
3. The quick pipeline with --device cuda, end to end.

Prints one JSON object per line. Usage (from the repository root):
PYTHONPATH=. python tools/gpu-check.py [--cuda-only] [--skip-benches] [--skip-pipeline]
NEXLIFY_CHECK_DEVICE=cpu runs it without a GPU (a dry run: the CUDA kernel's lines then say it was skipped; with
NUMBA_ENABLE_CUDASIM=1 and NEXLIFY_CHECK_STEPS=3 numba's simulator runs them, slowly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from nexlify.bench import bench_env, bench_train
from nexlify.config import EnvConfig, RiskConfig
from nexlify.data.candles import load_market
from nexlify.data.second_venue import load_second_venue
from nexlify.errors import InputError
from nexlify.env import fused_portfolio
from nexlify.env.batched import BatchedTradingEnv
from nexlify.env.market import MarketTensors, market_features
from nexlify.features import WARMUP_BARS, Normalizer
from nexlify.strategies.params import ArbParams, StakedAsset, StakingParams, StrategyParams

PAIRS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
DEVICE = os.environ.get("NEXLIFY_CHECK_DEVICE", "cuda")  # cpu: a dry run of this script without a GPU
STEPS = int(os.environ.get("NEXLIFY_CHECK_STEPS", "300"))  # of the side-by-side checks (fewer: a quicker dry run)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def cuda_kernel_here() -> bool:
    """The CUDA kernel can run: a CUDA device (or numba's CUDA simulator) and numba-cuda."""
    try:
        fused_portfolio.check_cuda_kernel(torch.device(DEVICE))
    except InputError as e:
        emit(check="cuda_kernel", skipped=str(e))
        return False
    return True


def side_by_side(kernel: str, n_steps: int = STEPS, resync: bool = False) -> None:
    """kernel: the device's path, torch (the tensor step) or cuda (the CUDA kernel).
    resync: every step starts the device's environment from the CPU's state, so that the figures are one
    step's differences (float64 on a GPU rounds exp, log1p and friends differently in the last bit, and a
    decision on a number at dust level can then part the two paths)."""
    market = load_market("binance", PAIRS, start="2024-03-20", end="2024-06-01")
    market.second_venue = load_second_venue(market, "coinbase", "USD")
    raw = market_features(market)
    normalizer = Normalizer.fit(raw, WARMUP_BARS, 1200)
    params = StrategyParams(
        arbitrage=ArbParams(taker_fee_a=0.0, taker_fee_b=0.0002, min_edge_bps=0.0, rebalance_notional_usd=1e7,
                            rebalance_below=0.3, max_notional_usd=150.0),
        staking=StakingParams(assets={"ETH": StakedAsset(0.05, 365.0, 5.0), "SOL": StakedAsset(0.07, 182.5, 2.0)},
                              stake_fraction=0.5, unstake_fraction=0.5))
    risk = RiskConfig(max_position=0.2, fixed_size=0.2, kelly_min_trades=5, kelly_window=10, stop_loss=0.01,
                      take_profit=0.02, trailing_stop=0.015, daily_loss_limit=0.03, max_trades=5)
    starts = torch.arange(64) * 7 + 700
    envs = {}
    for name, device, path in (("fused", "cpu", "auto"), ("device", DEVICE, kernel)):
        tensors = MarketTensors.build(market, normalizer, device, raw)
        envs[name] = BatchedTradingEnv(tensors, torch.arange(3).expand(len(starts), 3), starts, n_steps,
                                       EnvConfig(kernel=path), risk, params)
    cpu, gpu = envs["fused"], envs["device"]
    assert cpu._fused is not None and (gpu._fused is None) == (kernel == "torch")
    cpu.reset()
    gpu.reset()
    gen = torch.Generator().manual_seed(1)
    worst = {"equity_rel": 0.0, "reward": 0.0, "obs": 0.0}
    mask_parted_at = None
    for k in range(n_steps):
        if resync:
            fused_portfolio.copy_step_state(cpu, gpu)
        act = torch.where(cpu.mask, torch.rand(cpu.mask.shape, generator=gen), -1.0).argmax(-1)
        act = torch.where(torch.rand(act.shape, generator=gen) < 0.5, 0, act)
        obs_c, rew_c, _ = cpu.step(act)
        obs_g, rew_g, _ = gpu.step(act.to(DEVICE))
        equity_rel = ((gpu.equity.cpu() - cpu.equity) / cpu.equity).abs().max()
        worst["equity_rel"] = max(worst["equity_rel"], float(equity_rel))
        worst["reward"] = max(worst["reward"], float((rew_g.cpu() - rew_c).abs().max()))
        worst["obs"] = max(worst["obs"], float((obs_g.cpu() - obs_c).abs().max()))
        if mask_parted_at is None and not torch.equal(gpu.mask.cpu(), cpu.mask):
            mask_parted_at = k + 1
    emit(check=f"{kernel}_kernel_on_device_vs_cpu_fused_kernel", device=DEVICE, resync_every_step=resync,
         episodes=len(starts), steps=n_steps,
         max_diff=worst, masks_parted_at_step=mask_parted_at, trades=int(cpu.stats.trades.sum()),
         pnl_by_source_cpu=cpu.stats.pnl.sum(0).tolist(), pnl_by_source_gpu=gpu.stats.pnl.sum(0).cpu().tolist())


def benches(kernels: tuple[str, ...]) -> None:
    for strategies in (["spot"], None):
        for kernel in kernels:
            for batch in (16384, 65536):
                emit(**bench_env(PAIRS, batch, 300, device=DEVICE, strategies=strategies, kernel=kernel))
            for batch in (256, 2048) if kernel == "torch" else (2048,):
                emit(**bench_train(PAIRS, batch, 2000 if batch == 256 else 500, device=DEVICE,
                                   strategies=strategies, kernel=kernel))


def pipeline() -> None:
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", "from controller.cli import main; main()", "train", "--quick-test",
                          "--device", DEVICE, "--output", "/tmp/gpu-quick", "--log-format", "json"],
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    summary = {}
    if run.returncode == 0:
        with open("/tmp/gpu-quick/complete_training_summary.json") as f:
            summary = json.load(f)
    emit(check="quick_pipeline_on_device", rc=run.returncode, seconds=round(seconds, 1),
         device=summary.get("device"), stop_reason=summary.get("stop_reason"),
         final_best_score=summary.get("final_best_score"), stderr_tail=run.stderr[-1500:] if run.returncode else "")


if __name__ == "__main__":
    emit(check="devices", torch=torch.__version__, cuda=torch.cuda.is_available(),
         gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    kernels = ("torch", "cuda") if cuda_kernel_here() else ("torch",)
    if "--cuda-only" in sys.argv:  # the CUDA kernel's checks alone (the tensor step's were measured before)
        kernels = tuple(k for k in kernels if k == "cuda")
    for kernel in kernels:
        side_by_side(kernel)
        side_by_side(kernel, resync=True)
    if "--skip-benches" not in sys.argv:
        benches(kernels)
    if "--skip-pipeline" not in sys.argv:
        pipeline()
