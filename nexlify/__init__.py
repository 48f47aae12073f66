"""nexlify: the trainer. Markets, environments, agents; nothing of pipelines or clusters."""

import os

__version__ = "0.1.0"

# Threads that survive a busy machine (docs/speed.md, "Threading layers"): numba's OpenMP layer with a passive
# wait policy, its workers sleeping at barriers instead of spinning. Measured with one core of two busy, 2
# threads stepped 0.83M env steps/s this way against 0.10M with OpenMP's default (spinning) policy, 0.13M with
# numba's workqueue layer and 0.15M with TBB. Set before numba or torch load OpenMP (it is read once, at load);
# a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp workqueue tbb")
