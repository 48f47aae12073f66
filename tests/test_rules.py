"""The pipeline's decisions (controller.rules), table-driven, every expected number worked out by hand.

The rules are pure functions of recorded scores; `run_sequence` below replays a whole retraining
phase the way the pipeline does (new best replaces best, the patience counter is carried), so the
original guide's example can be checked iteration by iteration.
"""

from __future__ import annotations

import math

import pytest

from controller import rules
from controller.rules import IMPROVEMENT_BELOW_THRESHOLD, MAX_ITERATIONS, PATIENCE_EXHAUSTED


def run_sequence(best: float, scores: list[float], *, threshold: float = 1.0, patience: int = 3,
                 max_iterations: int = 10) -> tuple[list[rules.Decision], float, str | None]:
    """Feed scores to rules.decide as the pipeline does; stop at the first stop_reason."""
    decisions: list[rules.Decision] = []
    count = 0
    for iteration, score in enumerate(scores, start=1):
        d = rules.decide(score, best, count, iteration, threshold=threshold, patience=patience,
                         max_iterations=max_iterations)
        decisions.append(d)
        if d.new_best:
            best = score
        count = d.patience_count
        if d.stop_reason is not None:
            return decisions, best, d.stop_reason
    return decisions, best, None


# ------------------------------------------------------------------------------ the guide's example


def test_guide_sequence_stops_after_iteration_6_with_patience_exhausted():
    # initial best 73.2, then 76.4, 78.1, 78.9 (improving), 78.7, 78.6, 78.5 (three without improvement)
    decisions, best, stop = run_sequence(73.2, [76.4, 78.1, 78.9, 78.7, 78.6, 78.5, 99.0])
    assert len(decisions) == 6  # the 7th score (99.0) is never looked at
    assert stop == PATIENCE_EXHAUSTED
    assert best == 78.9
    expected = [
        # improvement_pct worked by hand: (score - best) / |best| * 100
        (3.2 / 73.2 * 100, True, 0, None),        # 76.4 vs 73.2 = +4.3716 %
        (1.7 / 76.4 * 100, True, 0, None),        # 78.1 vs 76.4 = +2.2251 %
        (0.8 / 78.1 * 100, True, 0, None),        # 78.9 vs 78.1 = +1.0243 % (>= 1 %: keeps going)
        (-0.2 / 78.9 * 100, False, 1, None),      # 78.7 vs 78.9 = -0.2535 %
        (-0.3 / 78.9 * 100, False, 2, None),      # 78.6 vs 78.9 = -0.3802 %
        (-0.4 / 78.9 * 100, False, 3, PATIENCE_EXHAUSTED),  # 78.5 vs 78.9 = -0.5070 %
    ]
    approx = [4.3716, 2.2251, 1.0243, -0.2535, -0.3802, -0.5070]
    for d, (imp, new_best, count, reason), rounded in zip(decisions, expected, approx):
        assert d.improvement_pct == pytest.approx(imp, rel=1e-9)
        assert round(d.improvement_pct, 4) == rounded
        assert (d.new_best, d.patience_count, d.stop_reason) == (new_best, count, reason)
    # total improvement of the summary: (78.9 - 73.2) / 73.2 = 7.7869 %
    assert round(rules.improvement_pct(best, 73.2), 4) == 7.7869


# ------------------------------------------------------------------------------ improvement_pct


@pytest.mark.parametrize("score, best, expected", [
    (110.0, 100.0, 10.0),
    (90.0, 100.0, -10.0),
    (-5.0, -10.0, 50.0),      # a negative best that becomes less negative improved by |(-5+10)/-10| = 50 %
    (-15.0, -10.0, -50.0),
    (5.0, -10.0, 150.0),      # (5 - -10) / 10
    (-2.0, 4.0, -150.0),
    (100.0, 100.0, 0.0),
    # best = 0: undefined ratio; the docstring defines any gain as +100 %, any loss as -100 %, none as 0 %
    (3.0, 0.0, 100.0),
    (0.001, 0.0, 100.0),
    (-3.0, 0.0, -100.0),
    (0.0, 0.0, 0.0),
    # NaN score: never an improvement; a real score after a NaN best is one
    (math.nan, 10.0, -100.0),
    (math.nan, 0.0, -100.0),
    (-7.0, math.nan, 100.0),
])
def test_improvement_pct(score, best, expected):
    assert rules.improvement_pct(score, best) == pytest.approx(expected, rel=1e-12, abs=0.0)


# ------------------------------------------------------------------------------ decide, one step


D = rules.Decision


@pytest.mark.parametrize("score, best, count, iteration, threshold, patience, max_it, expected", [
    # improvement >= threshold: new best, counter reset, go on
    (110.0, 100.0, 2, 1, 1.0, 3, 10, D(10.0, True, 0, None)),
    (101.0, 100.0, 0, 1, 1.0, 3, 10, D(1.0, True, 0, None)),               # exactly the threshold
    # 0 < improvement < threshold: new best, then stop
    (100.5, 100.0, 1, 2, 1.0, 3, 10, D(0.5, True, 1, IMPROVEMENT_BELOW_THRESHOLD)),
    (-9.95, -10.0, 0, 1, 1.0, 3, 10, D(0.5, True, 0, IMPROVEMENT_BELOW_THRESHOLD)),
    # no improvement: counter grows, stop when it reaches patience
    (99.0, 100.0, 0, 1, 1.0, 3, 10, D(-1.0, False, 1, None)),
    (99.0, 100.0, 2, 3, 1.0, 3, 10, D(-1.0, False, 3, PATIENCE_EXHAUSTED)),
    (100.0, 100.0, 0, 1, 1.0, 1, 10, D(0.0, False, 1, PATIENCE_EXHAUSTED)),  # patience 1: one miss stops
    # threshold 0: any real gain keeps going; an equal score is no gain and uses patience
    (100.001, 100.0, 1, 1, 0.0, 3, 10, D(0.001, True, 0, None)),
    (100.0, 100.0, 1, 1, 0.0, 3, 10, D(0.0, False, 2, None)),
    # best = 0
    (2.0, 0.0, 0, 1, 1.0, 3, 10, D(100.0, True, 0, None)),
    (2.0, 0.0, 0, 1, 150.0, 3, 10, D(100.0, True, 0, IMPROVEMENT_BELOW_THRESHOLD)),
    (-2.0, 0.0, 0, 1, 1.0, 3, 10, D(-100.0, False, 1, None)),
    # max_iterations: a run that would go on stops at the last iteration...
    (110.0, 100.0, 0, 5, 1.0, 3, 5, D(10.0, True, 0, MAX_ITERATIONS)),
    (99.0, 100.0, 0, 5, 1.0, 3, 5, D(-1.0, False, 1, MAX_ITERATIONS)),
    # ...but a rule that stops by itself names its own reason
    (99.0, 100.0, 2, 5, 1.0, 3, 5, D(-1.0, False, 3, PATIENCE_EXHAUSTED)),
    (100.5, 100.0, 0, 5, 1.0, 3, 5, D(0.5, True, 0, IMPROVEMENT_BELOW_THRESHOLD)),
    (110.0, 100.0, 0, 4, 1.0, 3, 5, D(10.0, True, 0, None)),
    # NaN score: never a new best
    (math.nan, 100.0, 0, 1, 1.0, 3, 10, D(-100.0, False, 1, None)),
])
def test_decide(score, best, count, iteration, threshold, patience, max_it, expected):
    got = rules.decide(score, best, count, iteration, threshold=threshold, patience=patience,
                       max_iterations=max_it)
    assert got.improvement_pct == pytest.approx(expected.improvement_pct, rel=1e-9)
    assert (got.new_best, got.patience_count, got.stop_reason) == \
        (expected.new_best, expected.patience_count, expected.stop_reason)


# ------------------------------------------------------------------------------ whole sequences


@pytest.mark.parametrize("best, scores, kwargs, n_decisions, final_best, stop", [
    # negative scores all the way: -10 -> -5 (+50 %) -> -4.9 (+2 %) -> -4.95 (miss) -> -6 (miss) -> -5 (miss)
    (-10.0, [-5.0, -4.9, -4.95, -6.0, -5.0], {}, 5, -4.9, PATIENCE_EXHAUSTED),
    # improvement below the threshold on iteration 2: -4.9 is new best, then stop
    (-10.0, [-5.0, -4.9], {"threshold": 5.0}, 2, -4.9, IMPROVEMENT_BELOW_THRESHOLD),
    # every iteration improves: max_iterations stops it, the last one is the best
    (1.0, [2.0, 3.0, 4.0, 5.0], {"max_iterations": 3}, 3, 4.0, MAX_ITERATIONS),
    # a miss between gains resets when a gain comes (patience 2 never exhausted)
    (10.0, [9.0, 11.0, 10.0, 12.0], {"patience": 2, "max_iterations": 4}, 4, 12.0, MAX_ITERATIONS),
    # threshold 0: tiny gains keep it going until patience runs out on equal scores
    (10.0, [10.01, 10.01, 10.01], {"threshold": 0.0, "patience": 2}, 3, 10.01, PATIENCE_EXHAUSTED),
    # best 0 then a gain (+100 %) then a loss
    (0.0, [1.0, 0.5], {"patience": 1}, 2, 1.0, PATIENCE_EXHAUSTED),
])
def test_sequences(best, scores, kwargs, n_decisions, final_best, stop):
    decisions, got_best, got_stop = run_sequence(best, scores, **kwargs)
    assert (len(decisions), got_best, got_stop) == (n_decisions, final_best, stop)


def test_sequence_negative_improvements_by_hand():
    decisions, _, _ = run_sequence(-10.0, [-5.0, -4.9, -4.95, -6.0, -5.0])
    assert [round(d.improvement_pct, 6) for d in decisions] == [
        50.0,                # (-5 + 10) / 10
        2.0,                 # (-4.9 + 5) / 5
        round(-0.05 / 4.9 * 100, 6),   # -1.020408 %
        round(-1.1 / 4.9 * 100, 6),    # -22.44898 %
        round(-0.1 / 4.9 * 100, 6),    # -2.040816 %
    ]
    assert [d.patience_count for d in decisions] == [0, 0, 1, 2, 3]


# ------------------------------------------------------------------------------ selection and seeds


@pytest.mark.parametrize("scores, expected", [
    ([(1, 5.0), (2, 7.0), (3, 6.0)], 2),
    ([(1, 5.0), (2, 7.0), (3, 7.0)], 2),        # tie: the lower run id
    ([(3, 7.0), (2, 7.0), (1, 7.0)], 1),        # order of the list does not matter
    ([(1, -3.0), (2, -1.5), (3, -2.0)], 2),     # negative scores: the least negative
    ([(1, math.nan), (2, -100.0)], 2),          # a NaN score never wins over a real one
    ([(2, math.nan), (1, math.nan)], 1),        # only NaNs: the lower run id
    ([(4, 0.0)], 4),
])
def test_select_best(scores, expected):
    assert rules.select_best(scores) == expected


@pytest.mark.parametrize("scores, trails, expected", [
    # the best score trails cash plus lending on validation, the other does not: the other
    ([(1, 5.0), (2, 7.0)], {2: True}, 1),
    ([(1, 5.0), (2, 7.0)], {1: False, 2: True}, 1),
    ([(1, 5.0), (2, 7.0), (3, 6.0)], {2: True}, 3),  # among those that do not trail, the score
    ([(1, 5.0), (2, 7.0)], {1: True, 2: True}, 2),   # all trail: the score decides among them
    ([(1, 5.0), (2, 7.0)], {}, 2),                   # nothing recorded: the score alone
    ([(1, math.nan), (2, 1.0)], {2: True}, 2),       # a NaN score still ranks last
])
def test_select_best_puts_cash_plus_lending_first(scores, trails, expected):
    assert rules.select_best(scores, trails) == expected


@pytest.mark.parametrize("score, best, trails, best_trails, expected", [
    # a higher score that trails lending where the best did not: no improvement (reported as it is)
    (110.0, 100.0, True, False, D(10.0, False, 1, None)),
    # a lower score that does not trail where the best did: a new best, and the pipeline goes on
    (90.0, 100.0, False, True, D(-10.0, True, 0, None)),
    (100.5, 100.0, False, True, D(0.5, True, 0, None)),  # not stopped below the threshold either
    (110.0, 100.0, True, True, D(10.0, True, 0, None)),   # both trail: the score decides
    (99.0, 100.0, False, False, D(-1.0, False, 1, None)),
    (math.nan, 100.0, False, True, D(-100.0, False, 1, None)),  # a NaN score: never a new best
])
def test_decide_puts_cash_plus_lending_first(score, best, trails, best_trails, expected):
    got = rules.decide(score, best, 0, 1, threshold=1.0, patience=3, max_iterations=10, trails=trails,
                       best_trails=best_trails)
    assert got == expected


@pytest.mark.parametrize("val_return, baselines, expected", [
    (0.5, {"cash_plus_lending": {"avg_return": 0.86}}, True),
    (0.86, {"cash_plus_lending": {"avg_return": 0.86}}, False),  # equal (a book that only lent): not below
    (1.2, {"cash_plus_lending": {"avg_return": 0.86}}, False),
    (0.5, None, False),  # not recorded (an older result): never counted as trailing
    (None, {"cash_plus_lending": {"avg_return": 0.86}}, False),
])
def test_trails_lending(val_return, baselines, expected):
    assert rules.trails_lending(val_return, baselines) is expected


def test_select_best_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        rules.select_best([])


@pytest.mark.parametrize("base, run_id, expected", [(42, 1, 42), (42, 2, 1042), (42, 3, 2042), (7, 5, 4007)])
def test_initial_seeds(base, run_id, expected):
    assert rules.initial_seed(base, run_id) == expected


@pytest.mark.parametrize("base, runs, iteration, expected", [
    (42, 3, 1, 3042),   # after 42, 1042, 2042
    (42, 3, 2, 4042),
    (42, 2, 1, 2042),   # two initial runs: 42, 1042, then retraining 2042
    (42, 1, 10, 10042),
    (0, 3, 1, 3000),
])
def test_retrain_seeds(base, runs, iteration, expected):
    assert rules.retrain_seed(base, runs, iteration) == expected


def test_no_seed_is_used_twice():
    seeds = [rules.initial_seed(42, i) for i in range(1, 4)] + [rules.retrain_seed(42, 3, k) for k in range(1, 11)]
    assert len(set(seeds)) == len(seeds) == 13
