"""A kernel call that compiles says so (nexlify.env.fused_portfolio.announce_slow_compiles), also when numba's
cache exists but lacks the call's argument types; a call that finds its compiled code says nothing."""

from __future__ import annotations

import numba
import pytest
from structlog.testing import capture_logs

from nexlify.env.fused_portfolio import announce_slow_compiles


def _fresh():
    return numba.njit(cache=False)(lambda x: x + 1)


@pytest.mark.parametrize("announced, calls, notices", [
    (False, [1, 2, 3], 1),  # one compile (int), then the compiled code is found
    (False, [1, 1.5, 2, 2.5], 2),  # int, then float: two specialisations, two notices
    (True, [1, 2], 0),  # the first compile was announced before the call: not twice
    (True, [1, 1.5], 1),  # ... a later specialisation still is
])
def test_each_compile_says_so_once(announced, calls, notices):
    kernel = _fresh()
    announce_slow_compiles(kernel, "serial", announced=announced, after_s=0.0)
    with capture_logs() as logs:
        for x in calls:
            assert kernel(x) == x + 1
    said = [e for e in logs if e["event"] == "kernel_compiling"]
    assert len(said) == notices
    assert all(e["new_argument_types"] and e["kernel"] == "environment step (serial)" for e in said)


def test_a_compile_shorter_than_the_delay_says_nothing():
    kernel = _fresh()
    announce_slow_compiles(kernel, "serial", after_s=60.0)
    with capture_logs() as logs:
        assert kernel(1) == 2
    assert not [e for e in logs if e["event"] == "kernel_compiling"]
