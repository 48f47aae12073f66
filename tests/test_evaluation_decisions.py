"""The one pass's greedy choice in numpy (nexlify.evaluation.greedy_actions) against the torch rule the
grouped path takes (hold_unless_margin over the masked Q-values), on Q-values built to hit the edges: ties
between actions, invalid actions with the largest Q, and gaps just below, at and above the margin in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nexlify.agent.dqn import NEG_INF
from nexlify.env.layout import HOLD
from nexlify.evaluation import greedy_actions, hold_unless_margin


def _torch_rule(q: np.ndarray, mask: np.ndarray, margin: float) -> np.ndarray:
    qt, mt = torch.from_numpy(q), torch.from_numpy(mask)
    return hold_unless_margin(torch.where(mt, qt, NEG_INF), margin).numpy()


@pytest.mark.parametrize("margin", [0.0, 0.02, 0.1])
def test_greedy_actions_match_the_torch_rule(margin):
    m32 = float(np.float32(margin))
    rows = [
        # q (hold is action HOLD), mask, the action wanted (by hand)
        ([0.0, 0.5, 0.5, 0.1], [True, True, True, True], None),  # a tie: the first of the two largest
        ([0.0, 9.0, 0.2, 0.1], [True, False, True, True], None),  # the largest is invalid
        ([0.0, 0.0, 0.0, 0.0], [True, True, True, True], None),  # all equal: the first
    ]
    q = np.zeros((len(rows) + 3, 1, 11), dtype=np.float32)
    mask = np.ones_like(q, dtype=bool)
    for i, (values, valid, _) in enumerate(rows):
        q[i, 0, :4], mask[i, 0, :4] = values, valid
    # gaps to hold just below, at and above the margin, as float32 numbers
    at = len(rows)
    q[at:, 0, HOLD] = 0.0  # so the gap is the action's Q exactly
    for j, gap in enumerate((np.nextafter(np.float32(m32), np.float32(0)), np.float32(m32),
                             np.nextafter(np.float32(m32), np.float32(1)))):
        q[at + j, 0, 3] = gap
    q[at:, 0, 4:] = -5.0
    q[at:, 0, 1:3] = -5.0
    got = greedy_actions(q, mask, margin)
    assert np.array_equal(got, _torch_rule(q, mask, margin))
    # by hand, with margin 0: the first largest valid action
    if margin == 0.0:
        assert got[:3, 0].tolist() == [1, 2, 0]
    else:  # a gap below the margin holds; at the margin (as float32) and above it takes the action
        assert got[at:, 0].tolist() == [HOLD, 3, 3]


def test_greedy_actions_match_the_torch_rule_on_random_q():
    gen = np.random.default_rng(7)
    q = gen.normal(size=(4000, 3, 11)).astype(np.float32).round(1)  # rounded: many ties
    mask = gen.random((4000, 3, 11)) < 0.6
    mask[..., HOLD] = True
    for margin in (0.0, 0.05, 0.3):
        assert np.array_equal(greedy_actions(q, mask, margin), _torch_rule(q, mask, margin))


def test_evaluation_threads_are_set_and_a_bad_count_is_refused_in_one_line():
    from nexlify.errors import InputError
    from nexlify.evaluate_cmd import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(InputError, match=r"^--threads 0: accepted: a whole number of threads >= 1$"):
            set_threads(0)
        assert torch.get_num_threads() == 1  # refused before anything changed
    finally:
        torch.set_num_threads(before)
