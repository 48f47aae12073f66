"""The verdict (nexlify.verdict): one rule, table-driven against values computed by hand.

The excess returns of the table: the agent's per-bar returns 0.03, -0.01, 0.02, 0.02 against lending's
0.01 each bar are 0.02, -0.02, 0.01, 0.01. Their mean is 0.005; the deviations 0.015, -0.025, 0.005, 0.005
give m2 = 0.0009 / 4 = 0.000225, the sample std sqrt(0.0009 / 3) = 0.0173205, so the per-bar excess Sharpe is
0.005 / 0.0173205 = 0.288675 (annualised x sqrt(8760) = 93.5949: 27.0185); m3 = -12e-6 / 4 = -3e-6, skew
-3e-6 / 0.000225^1.5 = -0.888889; m4 = 44.25e-8 / 4, kurtosis 11.0625e-8 / 5.0625e-8 = 2.185185.

Deflated Sharpe, one model tried: the benchmark is 0, the denominator 1 + 0.888889 x 0.288675 +
(2.185185 - 1) / 4 x 0.083333 = 1.281291, so DSR = Z(0.288675 x sqrt(3) / sqrt(1.281291)) = Z(0.441719) =
0.67065 (normal table, 0.44: 0.67003, 0.45: 0.67364). Two tried, the other with excess Sharpe 0: the trials'
variance is 0.288675^2 / 2 = 0.0416667, the benchmark sqrt(0.0416667) x 0.577216 x Z^-1(1 - 1/(2e)) =
0.204124 x 0.577216 x 0.900453 = 0.106095, and DSR = Z((0.288675 - 0.106095) x sqrt(3) / 1.131942) =
Z(0.279382) = 0.61002 (table 0.27: 0.60642, 0.28: 0.61026).
"""

from __future__ import annotations

import math

import pytest

from nexlify.verdict import excess_moments, verdict, verdict_text

AGENT = [0.03, -0.01, 0.02, 0.02]
LENDING = [0.01] * 4
SR = 0.288675  # per bar, by hand above


def test_excess_moments_by_hand():
    m = excess_moments(AGENT, LENDING)
    assert m["n"] == 4 and m["mean"] == pytest.approx(0.005)
    assert m["std"] == pytest.approx(0.0173205, abs=1e-7) and m["sharpe"] == pytest.approx(SR, abs=1e-6)
    assert m["skew"] == pytest.approx(-0.888889, abs=1e-6) and m["kurtosis"] == pytest.approx(2.185185, abs=1e-6)
    # the agent that only lends: no excess at all, and an excess below RISKLESS_VOL is riskless too
    assert excess_moments(LENDING, LENDING)["sharpe"] is None
    tiny = excess_moments([0.01 + 1e-10, 0.01 - 1e-10, 0.01 + 1e-10, 0.01], LENDING)
    assert tiny["sharpe"] is None and tiny["std"] == 0.0
    with pytest.raises(ValueError, match="one of each per bar"):
        excess_moments(AGENT, LENDING[:3])


EXCESS = excess_moments(AGENT, LENDING)


@pytest.mark.parametrize("agent, lending, excess, trials, beats, dsr, words", [
    # (agent return %, lending return %, excess moments, trial Sharpes, beats, DSR by hand, words)
    (10.1, 4.0, EXCESS, [SR], True, 0.67065, "beats cash plus lending"),
    (3.0, 4.0, EXCESS, [SR], False, 0.67065, "does not beat cash plus lending"),
    (4.0, 4.0, EXCESS, [SR], False, 0.67065, "does not beat"),  # a tie is not a win
    (10.1, 4.0, EXCESS, [SR, 0.0], True, 0.61002, "for 2 models tried"),
    (10.1, 4.0, EXCESS, [SR, None], True, 0.61002, "for 2 models tried"),  # never varied: a trial with Sharpe 0
    (10.1, None, EXCESS, [SR], None, 0.67065, "unknown against cash plus lending"),
    (4.0, 4.0, excess_moments(LENDING, LENDING), [None, None], False, None, "never differed from lending's"),
    (4.0, 4.0, None, [None], False, None, "no excess returns were recorded"),
])
def test_the_rule(agent, lending, excess, trials, beats, dsr, words):
    v = verdict(agent, lending, excess, trials, window="validation")
    assert v["beats_cash_plus_lending"] is beats
    assert v["models_tried"] == len(trials)
    if dsr is None:
        assert v["deflated_sharpe"] is None and v["sharpe_vs_lending"] is None and v["deflated_sharpe_reason"]
    else:
        assert v["sharpe_vs_lending_per_bar"] == pytest.approx(SR, abs=1e-6)
        assert v["sharpe_vs_lending"] == pytest.approx(SR * math.sqrt(8760), abs=1e-4)
        assert v["sharpe_vs_lending"] == pytest.approx(27.0185, abs=1e-3)
        assert v["deflated_sharpe"] == pytest.approx(dsr, abs=1e-4)
    assert words in v["text"] and v["text"] == verdict_text(v)
    assert v["text"].startswith("Verdict (validation): ")


def test_the_words():
    v = verdict(3.0, 4.0, EXCESS, [SR, 0.0], window="test 2025-01-01 .. 2025-02-01")
    assert v["text"] == ("Verdict (test 2025-01-01 .. 2025-02-01): does not beat cash plus lending: return 3.000 % "
                         "against 4.000 % from lending idle cash; Sharpe in excess of lending 27.019 (annualised); "
                         "deflated Sharpe 0.610 for 2 models tried.")
    lone = verdict(4.0, 4.0, excess_moments(LENDING, LENDING), [None], window="w")
    assert "Sharpe in excess of lending none (riskless: no excess over lending)" in lone["text"]
    assert "deflated Sharpe none (its return never differed from lending's by more than noise)" in lone["text"]
    assert "for 1 model tried" in verdict(4.1, 4.0, EXCESS, [SR], window="w")["text"]
    assert "Sharpe in excess of lending not recorded; deflated Sharpe none (no excess returns were recorded)" in \
        verdict(4.1, 4.0, None, [None], window="w")["text"]
