"""The signal study's forecast policy (nexlify.signal_policy): the ridge fit and its rows, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from nexlify.signal_policy import ridge_fit, rows


@pytest.mark.parametrize("lam, expected", [
    (0.0, [1.0, 1.0]),  # least squares through (-1, 0) and (1, 2): slope 1, intercept 1
    # penalty lam * n * w^2 = 2 w^2 on the slope only: w = x.(y - 1) / (x.x + 2) = 2 / 4; intercept mean(y)
    (1.0, [0.5, 1.0]),
])
def test_ridge_fit_by_hand(lam, expected):
    np.testing.assert_allclose(ridge_fit(np.array([[-1.0], [1.0]]), np.array([0.0, 2.0]), lam), expected)


def test_rows_end_their_targets_inside_the_window_and_skip_untradable_bars():
    feats = np.arange(12, dtype=float).reshape(6, 1, 2)  # 6 bars, 1 pair, 2 features
    logc = np.log(np.array([[1.0], [2.0], [4.0], [8.0], [16.0], [32.0]]))
    tradable = np.array([[True], [True], [False], [True], [True], [True]])
    x, y = rows(feats, logc, tradable, 0, 5, 2)  # targets over 2 bars; bars 0..2 start one, the last ends at 4
    # bar 0's target ends at bar 2 (untradable) and bar 2 is untradable: only bar 1 (to 3) is kept
    np.testing.assert_array_equal(x, [[2.0, 3.0]])
    np.testing.assert_allclose(y, [np.log(8.0 / 2.0)])
