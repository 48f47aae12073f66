"""The fused step on a CUDA GPU: nexlify.env.fused_portfolio's `episode_steps`, the same Python source the CPU
kernel runs, compiled by numba-cuda into one kernel with one thread per episode (the optional extra `gpu`:
pip install 'nexlify-train[gpu]').

The kernel reads and writes the environment's torch tensors where they lie, through the CUDA array interface
(numba.cuda.as_cuda_array): no copy to or from the host in a step. It runs on torch's current stream, so torch's
work before and after it is ordered with it.

Under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, no GPU needed) the kernel runs as Python, one Python
thread per CUDA thread, on CPU tensors: tests/test_env_fused_cuda.py checks there that it computes what the CPU
kernel computes. `ptx()` compiles it for a GPU without needing one (that test uses it too).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from numba import cuda

from nexlify.env import fused_portfolio
from nexlify.env.fused_portfolio import episode_steps

THREADS_PER_BLOCK = 128  # episodes per block; a thread keeps a few dozen float64 numbers in registers


def _cuda_kernel(actions, mask, pair, t, prices, tradable_tab, features, day, n_cols, n_bars,
                 floats, flags, bar_tab, stake_growth, stake_apy_feature, unbond_bars, stakeable, withdrawal_fee,
                 transfer_bars, sf, si, sb, ef, ei, e64, blocked, ring, head, pnl_rows, prm,
                 o_sf, o_si, o_sb, o_ef, o_ei, o_e64, o_blocked, reward, obs, o_mask, fs, ks, acts):
    """fused_portfolio._kernel's arguments; thread b steps episode b."""
    b = cuda.grid(1)
    if b < sf.shape[0]:
        episode_steps(b, b + 1, (actions, mask, pair, t), (prices, tradable_tab, features, day, n_cols, n_bars),
                      (floats, flags, bar_tab, stake_growth, stake_apy_feature, unbond_bars, stakeable, withdrawal_fee,
                       transfer_bars), (sf, si, sb, ef, ei, e64, blocked, ring, head, pnl_rows), prm,
                      (o_sf, o_si, o_sb, o_ef, o_ei, o_e64, o_blocked, reward, obs, o_mask), (fs, ks, acts))


def simulated() -> bool:
    """numba's CUDA simulator stands in for a GPU (NUMBA_ENABLE_CUDASIM=1)."""
    from numba.cuda import config

    return bool(config.ENABLE_CUDASIM)


def _python_twin(function: Any) -> Any:
    """`function` with every numba-compiled rule it calls by a module-level name replaced by that rule's Python
    source (transitively: the rules see the same namespace). The simulator runs kernels as Python, and a
    compiled CPU rule would not accept its stand-in arrays."""
    namespace = dict(vars(fused_portfolio))
    for name, value in list(namespace.items()):
        if hasattr(value, "py_func"):
            namespace[name] = types.FunctionType(value.py_func.__code__, namespace, name)
    namespace["cuda"] = cuda
    return types.FunctionType(function.__code__, namespace, function.__name__)


@functools.cache
def kernel() -> Any:
    """The CUDA kernel, compiled for the arguments' types on its first launch."""
    return cuda.jit(_python_twin(_cuda_kernel) if simulated() else _cuda_kernel)


def ptx(arguments: tuple, cc: tuple[int, int] = (9, 0)) -> str:
    """The kernel compiled to PTX for compute capability `cc` (9.0: H100/H200) and the types of `arguments`
    (numpy arrays and ints, as launch() passes them), without a GPU: proof that every rule compiles to device
    code (no allocation, no unsupported operation). numba-cuda asks the current device's compute capability
    when it compiles a called function; with no device there, `cc` answers."""
    import numba
    from numba.cuda import dispatcher

    signature = tuple(numba.typeof(a) for a in arguments)
    real = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    try:
        text, _ = cuda.compile_ptx(_cuda_kernel, signature, device=False, cc=cc)
    finally:
        dispatcher.get_current_device = real
    return text


def device_array(x: Any) -> Any:
    """A tensor as the kernel takes it: a view of device memory (no copy), or under the simulator the CPU
    tensor's numpy view; anything else (numbers, views made before) passes as it is."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_cuda:  # sync=False: no wait for the stream torch names; launch() runs on torch's stream, in order
        return cuda.as_cuda_array(x.detach(), sync=False)
    return x.detach().numpy()


def launch(arguments: tuple, n_episodes: int, device: torch.device) -> None:
    """Runs the kernel over `arguments` (fused_portfolio._kernel's, as tensors on `device` and ints) on torch's
    current stream of that device."""
    threads = min(THREADS_PER_BLOCK, n_episodes)
    blocks = (n_episodes + threads - 1) // threads
    args = tuple(device_array(a) for a in arguments)
    if device.type == "cuda":
        stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
        kernel()[blocks, threads, stream](*args)
    else:
        kernel()[blocks, threads](*args)
