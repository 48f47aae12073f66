"""Two candidates for one step source, side by side on this machine: the tensor step compiled with
torch.compile (Inductor) against the fused numba kernel (and the tensor step uncompiled), env steps/s with random
valid actions on 3 pairs, spot alone and every strategy. Prints one JSON object per line (warmup_s holds
torch.compile's compile time; cpu_seconds the process's CPU time, steadier than the wall clock on shared cores).

Usage (from the repository root): PYTHONPATH=. python tools/compare-step.py [--batch-size 4096] [--steps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json

from nexlify.bench import bench_env

PAIRS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for strategies in (["spot"], None):
        for kernel, compile_step in (("auto", False), ("torch", True), ("torch", False)):
            try:
                out = bench_env(PAIRS, args.batch_size, args.steps, threads=args.threads, strategies=strategies,
                                kernel=kernel, compile_step=compile_step)
            except Exception as e:  # a failed compile is a finding, not a crash of the comparison
                out = {"kernel": "torch.compile" if compile_step else kernel, "strategies": strategies,
                       "error": f"{type(e).__name__}: {str(e)[:400]}"}
            print(json.dumps(out), flush=True)
