"""Selection honesty as pure functions: return moments, the probabilistic and deflated Sharpe ratios
(nexlify.metrics, Bailey & Lopez de Prado 2014) and the summary's selection report (controller.selection),
table-driven against values computed by hand or printed in the paper."""

from __future__ import annotations

import math

import pytest

from controller import selection
from nexlify.metrics import deflated_sharpe, expected_max_sharpe, probabilistic_sharpe, return_moments

G = 0.5772156649015329  # Euler-Mascheroni
# standard normal quantiles, from tables: Z^-1(1 - 1/(2e)) = Z^-1(0.816060), Z^-1(2/3), Z^-1(1 - 1/(3e))
Z_2E, Z_TWO_THIRDS, Z_3E = 0.900453, 0.430727, 1.161957


def test_return_moments_by_hand():
    # mean 0.005; deviations +-0.005, +-0.015: m2 = 125e-6, m3 = 0, m4 = 25625e-12 -> kurtosis 1.64
    m = return_moments([0.01, -0.01, 0.02, 0.0])
    assert m["n"] == 4 and m["mean"] == pytest.approx(0.005)
    assert m["std"] == pytest.approx(math.sqrt(500e-6 / 3))
    assert m["skew"] == pytest.approx(0.0, abs=1e-12) and m["kurtosis"] == pytest.approx(1.64)
    assert m["sharpe"] == pytest.approx(0.005 / math.sqrt(500e-6 / 3))
    # a right tail: one big gain among small losses is positively skewed
    assert return_moments([-0.001] * 9 + [0.05])["skew"] > 2
    flat = return_moments([0.0] * 10)
    assert flat["std"] == 0.0 and flat["sharpe"] is None and flat["skew"] is None


@pytest.mark.parametrize("n_trials, variance, expected", [
    (1, 0.04, 0.0),  # one trial: nothing was selected
    (5, 0.0, 0.0),  # trials that all agree
    (2, 0.04, 0.2 * G * Z_2E),  # Z^-1(1 - 1/2) = 0
    (3, 0.0025, 0.05 * ((1 - G) * Z_TWO_THIRDS + G * Z_3E)),
    # the paper's example: N = 100 trials, V = 1/2 annualised -> SR0 = 1.7894 a year, 0.1132 a day (T = 250/yr)
    (100, 0.5 / 250, 0.1132),
])
def test_expected_maximum_sharpe(n_trials, variance, expected):
    assert expected_max_sharpe(n_trials, variance) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize("sharpe, benchmark, n, skew, kurt, expected", [
    (0.1, 0.1, 500, -1.0, 6.0, 0.5),  # at the benchmark: even odds, whatever the moments
    (0.1, 0.0, 101, 0.0, 3.0, 0.840741),  # normal returns: Z(0.1 * 10 / sqrt(1 + 0.5 * 0.01)) = Z(0.997509)
    # the paper's example: SR 2.5 a year = 0.158114 a day, T = 1250, skew -3, kurtosis 10, SR0 0.113172: DSR 0.9004
    (2.5 / math.sqrt(250), 0.113172, 1250, -3.0, 10.0, 0.9004),
    # the same under normal returns: Z(0.044942 * sqrt(1249) / sqrt(1 + 0.5 * 0.025)) = Z(1.5785) = 0.9428: fat
    # tails and negative skew made the same Sharpe less convincing
    (2.5 / math.sqrt(250), 0.113172, 1250, 0.0, 3.0, 0.9428),
])
def test_probabilistic_sharpe(sharpe, benchmark, n, skew, kurt, expected):
    assert probabilistic_sharpe(sharpe, benchmark, n, skew, kurt) == pytest.approx(expected, abs=1e-4)


def test_probabilistic_sharpe_refuses_what_it_cannot_estimate():
    with pytest.raises(ValueError, match="at least 2"):
        probabilistic_sharpe(0.1, 0.0, 1, 0.0, 3.0)
    with pytest.raises(ValueError, match="no variance"):
        probabilistic_sharpe(1.0, 0.0, 100, 2.0, 1.0)  # 1 - 2 + 0 < 0: not a possible law


def test_deflated_sharpe_of_the_best_of_three():
    # trials 0.05, 0.10, 0.15: sample variance 0.0025; SR0 = 0.05 * (0.5772 * ... ) = 0.042640
    out = deflated_sharpe(0.15, 500, 0.0, 3.0, [0.05, 0.10, 0.15])
    assert out["trials"] == 3 and out["trials_sharpe_variance"] == pytest.approx(0.0025)
    assert out["expected_max_sharpe"] == pytest.approx(0.042640, abs=1e-6)
    # Z((0.15 - 0.042640) * sqrt(499) / sqrt(1 + 0.5 * 0.0225)) = Z(2.3848)
    assert out["value"] == pytest.approx(0.991457, abs=1e-6)
    # more trials with the same spread raise the bar and deflate the same Sharpe
    assert deflated_sharpe(0.15, 500, 0.0, 3.0, [0.05, 0.10, 0.15] * 10)["value"] < out["value"]


def _cands(*rows):
    return [selection.candidate(src, seed, score, {"avg_return": ret, "avg_sharpe": sh}, selected=sel)
            for src, seed, score, ret, sh, sel in rows]


LENDING = {"cash_plus_lending": {"avg_return": 0.9, "avg_sharpe": 1500.0}, "flat": {"avg_return": 0.0, "avg_sharpe": 0.0}}
NORMAL = {"n": 500, "mean": 0.0, "std": 1.0, "skew": 0.0, "kurtosis": 3.0}


@pytest.mark.parametrize("ret, baselines, beats, words", [
    (-0.5, LENDING, False, "does not beat cash plus lending"),
    (0.9, LENDING, False, "does not beat"),  # equal is not better
    (1.2, LENDING, True, "beats cash plus lending"),
    (1.2, None, None, "unknown"),
])
def test_the_flag_and_its_sentence(ret, baselines, beats, words):
    cands = _cands(("init-1", 42, 10.0, ret, 1.0, True), ("init-2", 1042, 5.0, 2.0, 2.0, False))
    moments = {"init-1": {**NORMAL, "sharpe": 0.15}, "init-2": {**NORMAL, "sharpe": 0.05}}
    report = selection.selection_report(cands, moments, baselines)
    assert report["selected"] == "init-1" and report["models_tried"] == 2
    assert report["val_return"] == ret and report["val_sharpe"] == 1.0
    assert report["beats_cash_plus_lending"] is beats
    assert words in report["verdict"]
    if baselines is not None:
        assert report["beats_baselines"]["cash_plus_lending"] == {"return": beats, "sharpe": False}
        assert report["beats_baselines"]["flat"] == {"return": ret > 0.0, "sharpe": True}
    lines = selection.final_lines({"selection": report})
    assert lines[0].startswith("winner: init-1") and "2 models tried" in lines[0] and "not a return" in lines[0]
    assert lines[-1] == report["verdict"] and lines[-1].startswith("Verdict (init-1 on the validation window): ")
    assert "deflated Sharpe " in lines[-1] and "for 2 models tried" in lines[-1]


@pytest.mark.parametrize("own_excess, lending_excess, beats_sharpe", [
    (0.4, 0.0, True),     # a positive Sharpe in excess of the lending rate beats riskless lending's 0
    (-0.3, 0.0, False),   # earning less than lending per unit of risk does not
    (None, 0.0, False),   # results without the excess Sharpe compare the plain one: 1.0 against 1,500
])
def test_sharpe_is_compared_in_excess_of_the_lending_rate_where_recorded(own_excess, lending_excess, beats_sharpe):
    metrics = {"avg_return": 1.2, "avg_sharpe": 1.0}
    if own_excess is not None:
        metrics["avg_sharpe_vs_lending"] = own_excess
    cands = [selection.candidate("init-1", 42, 10.0, metrics, selected=True)]
    baselines = {"cash_plus_lending": {"avg_return": 0.9, "avg_sharpe": 1500.0,
                                       "avg_sharpe_vs_lending": lending_excess}}
    report = selection.selection_report(cands, {"init-1": None}, baselines)
    assert report["beats_baselines"]["cash_plus_lending"] == {"return": True, "sharpe": beats_sharpe}
    assert report["val_sharpe_vs_lending"] == own_excess
    assert report["cash_plus_lending"]["avg_sharpe_vs_lending"] == lending_excess
    line = selection.final_lines({"selection": report})[1]
    assert ("in excess of the lending rate" in line) == (own_excess is not None)


def test_deflated_sharpe_in_the_report_uses_every_candidate():
    cands = _cands(("init-1", 1, 1.0, 0.1, 0.1, False), ("init-2", 2, 3.0, 0.2, 0.2, False),
                   ("retrain-1", 3, 4.0, 0.3, 0.3, True))
    moments = {"init-1": {**NORMAL, "sharpe": 0.05}, "init-2": {**NORMAL, "sharpe": None},  # never varied: 0
               "retrain-1": {**NORMAL, "sharpe": 0.15}}
    d = selection.selection_report(cands, moments, LENDING)["deflated_sharpe"]
    expected = deflated_sharpe(0.15, 500, 0.0, 3.0, [0.05, 0.0, 0.15])
    assert d["value"] == pytest.approx(expected["value"]) and d["trials"] == 3
    assert d["trials_sharpe_variance"] == pytest.approx(0.0058333333)  # var(0.05, 0, 0.15), ddof 1

    moments["retrain-1"] = {**NORMAL, "sharpe": None, "std": 0.0}
    d = selection.selection_report(cands, moments, LENDING)["deflated_sharpe"]
    assert d["value"] is None and "never differed from lending" in d["reason"]
    moments["retrain-1"] = None
    assert "no excess returns" in selection.selection_report(cands, moments, LENDING)["deflated_sharpe"]["reason"]


def test_exactly_one_candidate_is_selected():
    with pytest.raises(ValueError, match="2 candidates"):
        selection.selection_report(_cands(("a", 1, 1.0, 0.0, 0.0, True), ("b", 2, 1.0, 0.0, 0.0, True)), {}, None)
