"""The CUDA kernel (nexlify.env.fused_cuda: fused_portfolio.episode_steps compiled by numba-cuda, one thread per
episode), checked without a GPU:

- it compiles to PTX for an H200 (compute capability 9.0) from the same source as the CPU kernel, with no
  allocation in it (CUDA device code cannot allocate);
- run by numba's CUDA simulator (one Python thread per CUDA thread, on CPU tensors), it computes what the CPU
  kernel and the tensor step compute, step by step on real candles with every strategy on and busy risk
  settings. The simulator must be switched on before numba.cuda is first imported, so that check runs in a
  child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nexlify.config import EnvConfig
from nexlify.env import fused_portfolio
from nexlify.env.batched import N_ACTIONS, BatchedTradingEnv
from nexlify.errors import InputError
from tests.helpers_market import binance_with_coinbase
from tests.test_env_fused import (
    BUSY_PARAMS, BUSY_PORTFOLIO_RISK, assert_same, assert_same_portfolio,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _envs(kernels: tuple[str, ...], n_steps: int, starts: list[int]) -> list[BatchedTradingEnv]:
    venues = binance_with_coinbase()
    s = torch.tensor(starts)
    return [BatchedTradingEnv(venues, torch.arange(3).expand(len(starts), 3), s, n_steps,
                              EnvConfig(kernel=kernel, drawdown_penalty=0.5), BUSY_PORTFOLIO_RISK, BUSY_PARAMS)
            for kernel in kernels]


def test_the_cuda_kernel_compiles_to_ptx_for_an_h200_without_allocating():
    from nexlify.env import fused_cuda

    (env,) = _envs(("auto",), 5, [700, 900])
    arguments, _, _ = env._fused.arguments(env, torch.zeros((2, 3), dtype=torch.int64))
    ptx = fused_cuda.ptx(arguments, cc=(9, 0))
    assert ".target sm_90" in ptx and ".visible .entry" in ptx and "_cuda_kernel" in ptx
    assert "NRT_" not in ptx, "the device code calls numba's runtime (an allocation)"
    assert "st.global.f32" in ptx and "st.global.f64" in ptx  # observations and rewards, the float64 state


def simulated_side_by_side(n_steps: int = 40) -> dict:
    """Runs in a child with NUMBA_ENABLE_CUDASIM=1: the tensor step (reference), the CPU kernel and the CUDA
    kernel under the simulator take the same actions (random valid ones, half of them hold, every tenth step a
    third of them any action, invalid ones included); after each step the CUDA path must equal the CPU kernel
    to float64 rounding and agree with the reference as the CPU kernel does. Returns what was compared."""
    from nexlify.env import fused_cuda

    assert fused_cuda.simulated()
    ref, cpu, sim = _envs(("torch", "auto", "cuda"), n_steps, [700, 760, 1000, 1200])
    assert ref._fused is None and cpu._fused.target == "cpu" and sim._fused.target == "cuda"
    for env in (ref, cpu, sim):
        env.reset()
    gen = torch.Generator().manual_seed(11)
    taken = torch.zeros(N_ACTIONS, dtype=torch.int64)
    for k in range(n_steps):
        act = torch.where(ref.mask, torch.rand(ref.mask.shape, generator=gen), -1.0).argmax(-1)
        act = torch.where(torch.rand(act.shape, generator=gen) < 0.5, 0, act)
        if k % 10 == 0:
            act = torch.where(torch.rand(act.shape, generator=gen) < 0.3,
                              torch.randint(0, N_ACTIONS, act.shape, generator=gen), act)
        taken += torch.bincount(act[ref.mask.gather(-1, act.unsqueeze(-1)).squeeze(-1)], minlength=N_ACTIONS)
        out = {name: env.step(act) for name, env in (("ref", ref), ("cpu", cpu), ("sim", sim))}
        where = f"step {k + 1}"
        for other, rtol, atol in (("cpu", 1e-13, 1e-12), ("ref", 1e-12, 1e-9)):
            obs, reward, done = out[other]
            torch.testing.assert_close(out["sim"][0], obs, rtol=1e-6, atol=1e-6, msg=lambda m: f"{where}: obs: {m}")
            torch.testing.assert_close(out["sim"][1], reward, rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"{where}: reward: {m}")
            assert out["sim"][2] == done
            env = cpu if other == "cpu" else ref
            assert_same(env, sim, rtol, atol, f"{where} against {other}")
            assert_same_portfolio(env, sim, rtol, atol, f"{where} against {other}")
    return {"steps": n_steps, "trades": int(sim.stats.trades.sum()), "taken": taken.tolist(),
            "pnl_moved": (sim.stats.pnl.abs().sum(0) > 0).tolist()}


def test_the_cuda_kernel_under_the_simulator_computes_what_the_cpu_kernel_computes():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", "import json, tests.test_env_fused_cuda as t; "
                          "print(json.dumps(t.simulated_side_by_side()))"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["steps"] == 40 and seen["trades"] >= 4, seen  # trades closed, so exits and the Kelly ring ran
    assert sum(n > 0 for n in seen["taken"][1:]) >= 7, seen  # most of the strategies' actions were taken


def test_the_cuda_kernel_on_a_cpu_device_is_refused_with_what_is_accepted():
    with pytest.raises(InputError, match="kernel 'cuda' steps on a CUDA device, not on device cpu"):
        _envs(("cuda",), 5, [700])
    assert fused_portfolio.available()
