"""The threading defaults set on import (nexlify/__init__.py): OpenMP waits passively and numba prefers its
OpenMP layer, unless the user chose otherwise; checked in fresh interpreters, where the import comes first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = ("import json, os, nexlify; print(json.dumps({k: os.environ.get(k) for k in "
         "('OMP_WAIT_POLICY', 'NUMBA_THREADING_LAYER_PRIORITY')}))")


@pytest.mark.parametrize("user, expected", [
    ({}, {"OMP_WAIT_POLICY": "passive", "NUMBA_THREADING_LAYER_PRIORITY": "omp workqueue tbb"}),
    ({"OMP_WAIT_POLICY": "active"}, {"OMP_WAIT_POLICY": "active",
                                     "NUMBA_THREADING_LAYER_PRIORITY": "omp workqueue tbb"}),
    ({"NUMBA_THREADING_LAYER_PRIORITY": "tbb omp workqueue"},
     {"OMP_WAIT_POLICY": "passive", "NUMBA_THREADING_LAYER_PRIORITY": "tbb omp workqueue"}),
])
def test_defaults_unless_the_user_set_them(user, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER_PRIORITY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **user}, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == expected


def test_numba_runs_parallel_code_on_its_openmp_layer():
    code = ("import nexlify, numba, numpy as np\n"
            "@numba.njit(parallel=True)\n"
            "def total(x):\n"
            "    s = 0.0\n"
            "    for i in numba.prange(x.shape[0]):\n"
            "        s += x[i]\n"
            "    return s\n"
            "assert total(np.arange(1000.0)) == 499500.0\n"
            "print(numba.threading_layer())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "NUMBA_THREADING"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "omp"
