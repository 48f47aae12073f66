"""`nexlify backtest --walk-forward`: the fold rules (dates, rows, aggregate) table-driven with values computed by
hand, then a real 2-fold backtest on the bundled candles (local executor, folder store) run as the CLI users
type: no look-ahead in what the fold pipelines trained on, the table and walk_forward.json consistent with each
fold's test_result.json and with `nexlify evaluate` of the fold's model, resume fold by fold, a failing fold,
bad flags, several seeds (--seeds, adopting a walk-forward run alone); and the same backtest into a real S3 server (SeaweedFS) and as Kubernetes Jobs through the strict fake
API server (tests.test_kubernetes_executor's fixtures), each of which must give the local numbers."""

from __future__ import annotations

import gzip
import json
import shutil
import statistics
import uuid
from pathlib import Path

import pytest

from controller.backtest import (Fold, WalkForwardConfig, aggregate, candidates_on_test, combine_seeds, comparators,
                                 fold_row, plan_folds, render_seeds, render_table)
from controller.backtest_run import fold_config, resolve_walk_forward, run_walk_forward
from controller.cli import build_parser, resolve_pipeline_config
from controller.config import pipeline_id
from nexlify.data.timeframes import parse_utc_ms
from nexlify.errors import InputError
from tests.pipeline_support import error_lines, log_events_text, read_json, run_cli
from tests.test_kubernetes_executor import k8s_flags, make_cluster, s3  # noqa: F401 - fixtures used below

HOUR_MS = 3_600_000

# ------------------------------------------------------------------------------------------ fold dates

# (data start, data end, fold_days, step_days, folds, train_days, val_days) -> [(train_start, test_start, test_end)]
# Dates by hand: 2025-04-02 - 30 d = 2025-03-03; 2025-06-01 - 45 d = 2025-04-17; 2025-04-17 - 30 d = 2025-03-18;
# 2024-12-25 - 120 d = 2024-08-27; 2024-12-18 - 120 d = 2024-08-20.
FOLD_TABLE = [
    (("2023-06-01", "2025-06-01", 30, 0, 3, 0, 90),
     [("2023-06-01", "2025-03-03", "2025-04-02"), ("2023-06-01", "2025-04-02", "2025-05-02"),
      ("2023-06-01", "2025-05-02", "2025-06-01")]),
    (("2023-06-01", "2025-06-01", 30, 45, 2, 0, 90),
     [("2023-06-01", "2025-03-18", "2025-04-17"), ("2023-06-01", "2025-05-02", "2025-06-01")]),
    (("2024-01-01", "2025-01-01", 7, 0, 2, 120, 30),
     [("2024-08-20", "2024-12-18", "2024-12-25"), ("2024-08-27", "2024-12-25", "2025-01-01")]),
    (("2024-11-01", "2025-06-01", 5, 0, 2, 0, 30),
     [("2024-11-01", "2025-05-22", "2025-05-27"), ("2024-11-01", "2025-05-27", "2025-06-01")]),
    # an end at noon keeps its time of day; whole days stay plain dates
    (("2024-01-01", "2025-06-01T12:00:00Z", 1, 0, 1, 0, 30),
     [("2024-01-01", "2025-05-31T12:00:00Z", "2025-06-01T12:00:00Z")]),
]


@pytest.mark.parametrize("args, expected", FOLD_TABLE)
def test_fold_dates_by_hand(args, expected):
    start, end, fold_days, step_days, folds, train_days, val_days = args
    wf = WalkForwardConfig(fold_days=fold_days, step_days=step_days, folds=folds, train_days=train_days)
    wf.check()
    plan = plan_folds(start, end, wf, val_days=val_days)
    assert [(f.train_start, f.test_start, f.test_end) for f in plan] == expected
    assert [f.index for f in plan] == list(range(1, folds + 1))
    for f in plan:  # the pipeline's data ends exactly where the test window starts
        assert f.train_end == f.test_start


@pytest.mark.parametrize("fold_days, step_days, folds, train_days", [
    (1, 0, 1, 0), (7, 0, 6, 0), (10, 14, 5, 0), (30, 30, 4, 200), (3, 3, 20, 61), (14, 0, 8, 100)])
def test_no_fold_tests_on_data_it_trained_on(fold_days, step_days, folds, train_days):
    """Every fold trains on [train_start, test_start) only; test windows follow each other without overlap and
    the last one ends at the data end; each training window is at least twice the validation window."""
    wf = WalkForwardConfig(fold_days=fold_days, step_days=step_days, folds=folds, train_days=train_days)
    plan = plan_folds("2023-06-01", "2025-06-01", wf, val_days=30)
    ms = lambda s: parse_utc_ms(s)  # noqa: E731
    assert ms(plan[-1].test_end) == ms("2025-06-01")
    for f in plan:
        assert ms(f.train_start) >= ms("2023-06-01")
        assert ms(f.train_end) <= ms(f.test_start) < ms(f.test_end)
        assert ms(f.test_end) - ms(f.test_start) == fold_days * 86_400_000
        assert ms(f.test_start) - ms(f.train_start) >= 60 * 86_400_000
        if train_days:
            assert ms(f.test_start) - ms(f.train_start) == train_days * 86_400_000
    for a, b in zip(plan, plan[1:]):
        assert ms(a.test_end) <= ms(b.test_start)
        assert ms(b.test_end) - ms(a.test_end) == (step_days or fold_days) * 86_400_000


@pytest.mark.parametrize("kwargs, val_days, message", [
    (dict(fold_days=10, step_days=5), 30, "--step-days 5 is shorter than --fold-days 10"),
    (dict(fold_days=30, folds=4, train_days=700), 30, "fold 1's training data would start at 2023-03-04"),
    (dict(fold_days=30, folds=20), 90, "fold 1 would train on 131 day(s) (2023-06-01 .. 2023-10-10)"),
])
def test_fold_layouts_that_cannot_work_are_refused(kwargs, val_days, message):
    # 4 folds of 30 days start fold 1's test at 2025-06-01 - 120 d = 2025-02-01, and 700 days before is 2023-03-04;
    # 20 folds of 30 days start it at 2025-06-01 - 600 d = 2023-10-10 (2024 has 366 days), 131 days after 2023-06-01
    # (30 + 31 + 31 + 30 + 9), fewer than 2 x 90.
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        wf = WalkForwardConfig(**kwargs)
        wf.check()
        plan_folds("2023-06-01", "2025-06-01", wf, val_days=val_days)


# ------------------------------------------------------------------------------- rows and aggregate


def evaluation(ret: float, sharpe: float, baselines: dict | None, bnh: dict | None, **agent) -> dict:
    out = {"agent": {"avg_return": ret, "avg_sharpe": sharpe, "avg_drawdown": 1.5, "total_trades": 7, **agent}}
    if baselines is not None:
        out["baselines"] = {n: {"avg_return": r, "avg_sharpe": s, "avg_drawdown": 0.0} for n, (r, s) in baselines.items()}
    if bnh is not None:
        out["buy_and_hold"] = {p: {"total_return": r, "sharpe": s, "max_drawdown": 3.0} for p, (r, s) in bnh.items()}
    return out


FOLD = Fold(1, "2024-11-01", "2025-05-22", "2025-05-22", "2025-05-27")


def test_fold_row_takes_every_baseline_and_averages_buy_and_hold_over_pairs():
    row = fold_row(FOLD, evaluation(2.0, 1.25, {"flat": (0.0, 0.0), "cash_plus_lending": (0.4, 9.0)},
                                    {"BTC/USDT": (3.0, 1.0), "ETH/USDT": (-1.0, -0.5)}, avg_exposure=0.25))
    # the verdict (nexlify.verdict): 2.0 % beats lending's 0.4 %; no excess returns recorded here
    v = row.pop("verdict")
    assert v["beats_cash_plus_lending"] is True and v["models_tried"] == 1 and v["deflated_sharpe"] is None
    assert v["text"].startswith("Verdict (fold 1, test 2025-05-22 .. 2025-05-27): beats cash plus lending: "
                                "return 2.000 % against 0.400 %")
    assert row == {
        "fold": 1, "train_start": "2024-11-01", "train_end": "2025-05-22", "test_start": "2025-05-22",
        "test_end": "2025-05-27",
        "agent": {"return": 2.0, "sharpe": 1.25, "max_drawdown": 1.5, "trades": 7, "exposure": 0.25},
        # buy-and-hold: (3 + -1) / 2 = 1.0 %, (1 + -0.5) / 2 = 0.25
        "baselines": {"flat": {"return": 0.0, "sharpe": 0.0}, "cash_plus_lending": {"return": 0.4, "sharpe": 9.0},
                      "buy_and_hold": {"return": 1.0, "sharpe": 0.25}},
    }
    # without baselines (today's evaluate) only buy-and-hold; without either, nothing; no exposure: None
    assert set(fold_row(FOLD, evaluation(1.0, 1.0, None, {"BTC/USDT": (1.0, 1.0)}))["baselines"]) == {"buy_and_hold"}
    bare = fold_row(FOLD, evaluation(1.0, 1.0, None, None))
    assert bare["baselines"] == {} and bare["agent"]["exposure"] is None


# Three folds; agent (return, sharpe) and baselines (return, sharpe). Hand-computed below.
AGG_FOLDS = [
    evaluation(2.0, 1.0, {"random_valid": (1.0, 2.0), "cash_plus_lending": (0.3, 5.0)}, {"BTC/USDT": (5.0, 2.0)}),
    evaluation(-1.0, -0.5, {"random_valid": (-2.0, -1.0), "cash_plus_lending": (0.3, 5.0)}, {"BTC/USDT": (-3.0, -1.5)}),
    evaluation(0.5, 0.5, {"random_valid": (0.5, 0.4)}, {"BTC/USDT": (0.1, 0.6)}),  # cash_plus_lending absent here
]


def test_aggregate_by_hand():
    rows = [fold_row(Fold(i + 1, "a", "b", "b", "c"), e) for i, e in enumerate(AGG_FOLDS)]
    agg = aggregate(rows)
    assert agg["folds"] == 3
    # returns 2, -1, 0.5: mean 0.5, median 0.5; Sharpes 1, -0.5, 0.5: mean 1/3, median 0.5
    assert agg["agent"] == pytest.approx({"mean_return": 0.5, "median_return": 0.5, "mean_sharpe": 1 / 3,
                                          "median_sharpe": 0.5})
    assert comparators(rows) == ["cash_plus_lending", "random_valid", "buy_and_hold"]
    v = agg["versus"]
    # cash_plus_lending (folds 1, 2): return 2 > 0.3 yes, -1 > 0.3 no; Sharpe 1 > 5 no, -0.5 > 5 no
    assert v["cash_plus_lending"] == pytest.approx({"folds": 2, "beats_return": 1, "beats_sharpe": 0, "mean_return": 0.3,
                                               "mean_sharpe": 5.0})
    # random_valid: return 2 > 1, -1 > -2, 0.5 > 0.5 is a tie (no); Sharpe 1 > 2 no, -0.5 > -1 yes, 0.5 > 0.4 yes
    assert v["random_valid"] == pytest.approx({"folds": 3, "beats_return": 2, "beats_sharpe": 2,
                                               "mean_return": -0.5 / 3, "mean_sharpe": 1.4 / 3})
    # buy_and_hold: return 2 > 5 no, -1 > -3 yes, 0.5 > 0.1 yes; Sharpe 1 > 2 no, -0.5 > -1.5 yes, 0.5 > 0.6 no
    assert v["buy_and_hold"] == pytest.approx({"folds": 3, "beats_return": 2, "beats_sharpe": 1,
                                               "mean_return": 2.1 / 3, "mean_sharpe": 1.1 / 3})
    text = render_table(rows, agg)
    assert "aggregate over 3 fold(s): return mean 0.50 %, median 0.50 %; Sharpe mean 0.33, median 0.50" in text
    assert "agent beats cash_plus_lending: on return in 1/2 folds, on Sharpe in 0/2 folds" in text
    assert "agent beats random_valid: on return in 2/3 folds, on Sharpe in 2/3 folds" in text
    assert "agent beats buy_and_hold: on return in 2/3 folds, on Sharpe in 1/3 folds" in text
    third = next(line for line in text.splitlines() if line.startswith("   3"))
    assert third.endswith(f"{'-':>18}  {'0.50 / 0.40':>18}  {'0.10 / 0.60':>18}")  # no cash_plus_lending in fold 3



def seed_rows(*folds) -> list[dict]:
    """One seed's fold rows: per fold (agent return, agent Sharpe, {baseline: (return, Sharpe)})."""
    windows = [("2025-01-01", "2025-04-01"), ("2025-04-01", "2025-07-01")]
    return [{"fold": k, "train_start": "2023-01-01", "train_end": windows[k - 1][0], "test_start": windows[k - 1][0],
             "test_end": windows[k - 1][1], "agent": {"return": r, "sharpe": sh},
             "baselines": {n: {"return": br, "sharpe": bs} for n, (br, bs) in b.items()}}
            for k, (r, sh, b) in enumerate(folds, start=1)]


def test_combine_seeds_by_hand():
    # lending 0.86 % (Sharpe 0) in both folds, random -20 % (Sharpe -30); three seeds:
    lend, rnd = ("cash_plus_lending", (0.86, 0.0)), ("random_valid", (-20.0, -30.0))
    by_seed = {
        42: seed_rows((1.0, 0.5, dict([lend, rnd])), (0.5, -1.0, dict([lend, rnd]))),
        7: seed_rows((0.86, 0.0, dict([lend, rnd])), (0.9, 0.2, dict([lend, rnd]))),  # fold 1: a tie is no win
        123: seed_rows((2.0, 1.0, dict([lend, rnd])), (0.1, -2.0, dict([lend, rnd]))),
    }
    c = combine_seeds(by_seed)
    assert c["seeds"] == [42, 7, 123] and c["folds"] == 2
    f1, f2 = c["by_fold"]
    assert f1["returns"] == [1.0, 0.86, 2.0] and f1["sharpes"] == [0.5, 0.0, 1.0]
    assert f1["mean_return"] == pytest.approx(3.86 / 3) and f2["mean_return"] == pytest.approx(0.5)
    # fold 1: 1.0 and 2.0 beat 0.86 on return, 0.5 and 1.0 beat 0 on Sharpe (the tie does not): 2 of 3 each;
    # fold 2: only 0.9 beats 0.86, only 0.2 beats 0
    assert f1["seeds_beating"]["cash_plus_lending"] == {"return": 2, "sharpe": 2}
    assert f2["seeds_beating"]["cash_plus_lending"] == {"return": 1, "sharpe": 1}
    assert c["versus"]["cash_plus_lending"] == {"fold_seeds": 6, "beats_return": 3, "beats_sharpe": 3, "folds": 2,
                                                "folds_most_seeds_return": 1, "folds_most_seeds_sharpe": 1}
    assert c["versus"]["random_valid"] == {"fold_seeds": 6, "beats_return": 6, "beats_sharpe": 6, "folds": 2,
                                           "folds_most_seeds_return": 2, "folds_most_seeds_sharpe": 2}
    # six returns 1, 0.5, 0.86, 0.9, 2, 0.1: mean 5.36 / 6, median (0.86 + 0.9) / 2; Sharpes sum -1.3
    assert c["agent"] == pytest.approx({"mean_return": 5.36 / 6, "median_return": 0.88, "mean_sharpe": -1.3 / 6})
    text = render_seeds(c)
    assert ("  fold 1 2025-01-01 .. 2025-04-01: 1.00 / 0.86 / 2.00 (mean 1.29); cash_plus_lending 0.86 %, beaten "
            "with 2/3 seeds on return, 2/3 on Sharpe") in text
    assert ("  agent beats cash_plus_lending: on return in 3/6 fold-seeds, on Sharpe in 3/6; with most seeds in 1/2 "
            "folds on return, 1/2 on Sharpe") in text


def test_combine_seeds_with_two_seeds_needs_both_for_most_and_refuses_other_windows():
    lend = {"cash_plus_lending": (0.86, 0.0)}
    c = combine_seeds({1: seed_rows((1.0, 1.0, lend), (1.0, 1.0, lend)), 2: seed_rows((0.0, -1.0, lend),
                                                                                       (2.0, 2.0, lend))})
    assert c["versus"]["cash_plus_lending"]["folds_most_seeds_return"] == 1  # fold 2 only: 1 of 2 is not most
    other = seed_rows((1.0, 1.0, lend), (1.0, 1.0, lend))
    other[1]["test_end"] = "2025-06-30"
    with pytest.raises(ValueError, match="the seeds' fold windows differ"):
        combine_seeds({1: seed_rows((1.0, 1.0, lend), (1.0, 1.0, lend)), 2: other})


def cands(*rows) -> list[dict]:
    """(source, val_score, test_return, selected) -> candidate dicts."""
    return [{"source": s, "val_score": v, "test_return": t, "selected": sel} for s, v, t, sel in rows]


# candidates, lending return -> expected summary. By hand:
#  1: val 3, 1, 2 -> ranks 3, 1, 2; test 1.0, 2.0, 0.5 -> ranks 2, 3, 1; centred (1, -1, 0) and (0, 1, -1):
#     rho = (0 - 1 + 0) / sqrt(2 * 2) = -0.5; the selected (1.0) has one better (2.0): rank 2; 2 of 3 beat 0.86
#  2: scores and returns in the same order: rho 1; the selected is the best on test: rank 1; mean 7/3
#  3: a tie on test (1.0, 1.0) averages its ranks (1.5, 1.5); val ranks 1, 2, 3 -> rho = cov / sd:
#     centred (-1, 0, 1) and (-0.5, -0.5, 1): cov 1.5, sds sqrt(2), sqrt(1.5) -> 1.5 / sqrt(3) = 0.8660;
#     the selected (1.0, tied with another) ranks 2: ties share the better rank
#  4: two models: no correlation; no lending baseline: None
#  5: every validation score equal: no correlation
CANDIDATE_TABLE = [
    (cands(("init-1", 3.0, 1.0, True), ("init-2", 1.0, 2.0, False), ("retrain-1", 2.0, 0.5, False)), 0.86,
     {"models": 3, "median_return": 1.0, "mean_return": 3.5 / 3, "best_return": 2.0, "beat_cash_plus_lending": 2,
      "selected_source": "init-1", "selected_rank": 2, "rank_correlation": -0.5}),
    (cands(("init-1", 1.0, 1.0, False), ("init-2", 2.0, 2.0, False), ("retrain-1", 3.0, 4.0, True)), 0.86,
     {"models": 3, "median_return": 2.0, "mean_return": 7 / 3, "best_return": 4.0, "beat_cash_plus_lending": 3,
      "selected_source": "retrain-1", "selected_rank": 1, "rank_correlation": 1.0}),
    (cands(("init-1", 1.0, 1.0, False), ("init-2", 2.0, 1.0, True), ("retrain-1", 3.0, 3.0, False)), 1.0,
     {"models": 3, "median_return": 1.0, "mean_return": 5 / 3, "best_return": 3.0, "beat_cash_plus_lending": 1,
      "selected_source": "init-2", "selected_rank": 2, "rank_correlation": 1.5 / 3 ** 0.5}),
    (cands(("init-1", 1.0, -1.0, True), ("retrain-1", 2.0, 0.5, False)), None,
     {"models": 2, "median_return": -0.25, "mean_return": -0.25, "best_return": 0.5, "beat_cash_plus_lending": None,
      "selected_source": "init-1", "selected_rank": 2, "rank_correlation": None}),
    (cands(("init-1", 5.0, 0.1, True), ("init-2", 5.0, 0.2, False), ("init-3", 5.0, 0.3, False)), 0.0,
     {"models": 3, "median_return": 0.2, "mean_return": 0.2, "best_return": 0.3, "beat_cash_plus_lending": 3,
      "selected_source": "init-1", "selected_rank": 3, "rank_correlation": None}),
]


@pytest.mark.parametrize("candidates, lending, expected", CANDIDATE_TABLE)
def test_candidates_on_test_by_hand(candidates, lending, expected):
    assert candidates_on_test(candidates, lending) == pytest.approx(expected)


def test_candidates_need_exactly_one_selected():
    with pytest.raises(ValueError, match="2 candidates are marked selected"):
        candidates_on_test(cands(("a", 1.0, 1.0, True), ("b", 2.0, 2.0, True)), 0.0)


def test_candidates_in_the_rows_the_aggregate_and_the_table():
    lending = {"cash_plus_lending": (0.86, 0.0)}
    rows = [fold_row(Fold(1, "a", "b", "b", "c"), evaluation(1.0, 0.5, lending, None), CANDIDATE_TABLE[0][0]),
            fold_row(Fold(2, "a", "b", "b", "c"), evaluation(4.0, 0.5, lending, None), CANDIDATE_TABLE[1][0]),
            fold_row(Fold(3, "a", "b", "b", "c"), evaluation(1.0, 0.5, lending, None))]  # tested before candidates
    # the row's summary compares with the fold's own cash-plus-lending return
    assert rows[0]["candidates"] == pytest.approx(CANDIDATE_TABLE[0][2]) and "candidates" not in rows[2]
    agg = aggregate(rows)
    # 6 models in 2 folds; mean of the folds' means (3.5/3 + 7/3) / 2 = 1.75; 2 + 3 beat 0.86; the selected was
    # the best on test in fold 2 only; correlations -0.5 and 1: mean 0.25
    assert agg["candidates"] == pytest.approx({"folds": 2, "models": 6, "mean_return": 1.75,
                                               "beat_cash_plus_lending": 5, "models_with_lending": 6,
                                               "mean_rank_correlation": 0.25, "selected_best_on_test": 1})
    text = render_table(rows, agg).splitlines()
    assert ("  fold 1: 3 models, test return median 1.00 %, best 2.00 %; 2/3 beat cash plus lending; the selected "
            "init-1 ranks 2/3; rank correlation of validation score with test return -0.50") in text
    assert not any(line.startswith("  fold 3:") for line in text)
    assert text[-4] == ("  all folds: 6 models, mean test return 1.75 %; 5/6 beat cash plus lending; the selected "
                        "model was the best on test in 1/2 folds; mean rank correlation 0.25")
    # the verdict of each fold, last: 1.0 % and 4.0 % against lending's 0.86 %, each fold's models tried
    assert [line[:60] for line in text[-3:]] == [r["verdict"]["text"][:60] for r in rows]
    assert text[-3].startswith("Verdict (fold 1, test b .. c): beats cash plus lending: return 1.000 % against "
                               "0.860 %")
    assert [r["verdict"]["models_tried"] for r in rows] == [3, 3, 1]
    assert "candidates" not in aggregate(rows[2:])

# ------------------------------------------------------------------------ a real backtest, end to end

TINY_WF = [
    "--pairs", "BTC/USDT", "--start", "2024-11-01", "--end", "2025-06-01", "--val-days", "30",
    "--initial-runs", "1", "--initial-episodes", "4", "--retrain-episodes", "4", "--num-envs", "4",
    "--episode-bars", "300", "--max-iterations", "1", "--checkpoint-every", "4", "--learning-starts", "256",
    "--batch-size", "64", "--strategies", "spot", "--device", "cpu",
    "--algorithm", "dqn",  # an untrained-enough Q-network trades on five days; a forecast short of its t does not
    "--fold-days", "5", "--folds", "2",
]
# fold 1 tests 2025-05-22 .. 05-27, fold 2 tests 05-27 .. 06-01 (06-01 - 5 d = 05-27, - 5 d = 05-22)
WINDOWS = [("2025-05-22", "2025-05-27"), ("2025-05-27", "2025-06-01")]
TIMEOUT_S = 300.0


def backtest(output: str, *extra: str, env: dict | None = None):
    return run_cli(["backtest", "--walk-forward", *TINY_WF, "--output", output, "--log-format", "json", *extra],
                   timeout=TIMEOUT_S, env=env)


@pytest.fixture(scope="module")
def wf_out(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("walkforward") / "out"
    proc = backtest(str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


def test_each_fold_trained_only_before_its_test_window(wf_out):
    out, _ = wf_out
    for k, (test_start, test_end) in enumerate(WINDOWS, start=1):
        fold = out / f"fold_{k}"
        summary = read_json(fold / "complete_training_summary.json")
        data = summary["config"]["data"]
        assert (data["start"], data["end"], data["test_days"]) == ("2024-11-01", test_start, 0)
        assert summary["data"]["validation"]["end"] == f"{test_start}T00:00:00Z"
        # validation = the last 30 days of the fold's data, as in any pipeline
        assert parse_utc_ms(summary["data"]["validation"]["start"]) == parse_utc_ms(test_start) - 30 * 86_400_000
        # the snapshot the runs trained on: its last candle closes at the test window's start
        for entry in summary["data"]["files"]:
            lines = gzip.decompress((fold / entry["key"]).read_bytes()).decode().splitlines()
            last_open = int(lines[-1].split(",")[0])
            assert last_open + HOUR_MS == parse_utc_ms(test_start)
        result = read_json(fold / "test_result.json")
        assert result["window"] == {"index": k, "train_start": "2024-11-01", "train_end": test_start,
                                    "test_start": test_start, "test_end": test_end}
        ev = result["evaluation"]["window"]
        assert (ev["start"], ev["end"], ev["bars"]) == (f"{test_start}T00:00:00Z", f"{test_end}T00:00:00Z", 5 * 24)


def test_table_and_walk_forward_json_agree_with_each_folds_test_result(wf_out):
    out, stdout = wf_out
    wf = read_json(out / "walk_forward.json")
    assert wf["complete"] is True and wf["settings"] == {"fold_days": 5, "step_days": 0, "folds": 2, "train_days": 0}
    results = [read_json(out / f"fold_{k}" / "test_result.json") for k in (1, 2)]
    assert wf["folds"] == [r["row"] for r in results]
    returns, sharpes = [], []
    for k, r in enumerate(results, start=1):
        agent = r["evaluation"]["agent"]
        row = r["row"]
        assert (row["fold"], row["test_start"], row["test_end"]) == (k, *WINDOWS[k - 1])
        # the folds compare Sharpe in excess of the lending rate
        assert row["agent"]["return"] == agent["avg_return"]
        assert row["agent"]["sharpe"] == agent["avg_sharpe_vs_lending"] != agent["avg_sharpe"]
        assert row["agent"]["trades"] == agent["total_trades"]
        hold = r["evaluation"]["buy_and_hold"]["BTC/USDT"]
        assert row["baselines"]["buy_and_hold"] == {"return": hold["total_return"], "sharpe": hold["sharpe_vs_lending"]}
        # the model tested is the fold pipeline's final model
        summary = read_json(out / f"fold_{k}" / "complete_training_summary.json")
        assert r["pipeline"]["final_model_url"] == summary["final_model_url"] == r["evaluation"]["model"]
        # the fold's verdict (nexlify.verdict) is the row's, printed after the table, for every model tried
        verdict = row["verdict"]
        assert verdict["text"] in stdout.splitlines()
        lending = r["evaluation"]["baselines"]["cash_plus_lending"]["avg_return"]
        assert verdict["beats_cash_plus_lending"] == (agent["avg_return"] > lending)
        assert verdict["models_tried"] == len(r["candidates"])
        returns.append(agent["avg_return"])
        sharpes.append(agent["avg_sharpe_vs_lending"])
        line = next(line for line in stdout.splitlines() if line.startswith(f"{k:>4}  "))
        assert f"{agent['avg_return']:.2f}" in line and f"{agent['avg_sharpe_vs_lending']:.2f}" in line
        assert f"{hold['total_return']:.2f} / {hold['sharpe_vs_lending']:.2f}" in line
    agg = wf["aggregate"]
    assert agg["agent"]["mean_return"] == pytest.approx((returns[0] + returns[1]) / 2)
    assert agg["agent"]["median_sharpe"] == pytest.approx((sharpes[0] + sharpes[1]) / 2)
    holds = [r["row"]["baselines"]["buy_and_hold"] for r in results]
    beats = sum(a > h["return"] for a, h in zip(returns, holds))
    assert agg["versus"]["buy_and_hold"]["beats_return"] == beats
    assert f"agent beats buy_and_hold: on return in {beats}/2 folds" in stdout
    assert f"return mean {statistics.fmean(returns):.2f} %" in stdout


def test_fold_result_is_what_nexlify_evaluate_reports_for_the_model(wf_out):
    out, _ = wf_out
    r = read_json(out / "fold_2" / "test_result.json")
    proc = run_cli(["evaluate", "--model", r["pipeline"]["final_model_url"], "--start", WINDOWS[1][0],
                    "--end", WINDOWS[1][1], "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["agent"] == r["evaluation"]["agent"]


def test_every_candidate_is_tested_as_nexlify_evaluate_reports_it(wf_out):
    out, stdout = wf_out
    r = read_json(out / "fold_1" / "test_result.json")
    summary = read_json(out / "fold_1" / "complete_training_summary.json")
    tested = r["candidates"]
    # the summary's candidates in its order (init-1, retrain-1), each model file of the fold's pipeline
    assert [c["source"] for c in tested] == [c["source"] for c in summary["candidates"]] == ["init-1", "retrain-1"]
    assert [c["model"] for c in tested] == [str(out / "fold_1" / e["model_path"]) for e in
                                            summary["initial_runs"] + summary["retraining_iterations"]]
    for c in tested:
        proc = run_cli(["evaluate", "--model", c["model"], "--start", WINDOWS[0][0], "--end", WINDOWS[0][1], "--json"])
        assert proc.returncode == 0, proc.stderr
        agent = json.loads(proc.stdout)["agent"]
        assert (c["test_return"], c["test_sharpe"], c["trades"]) == (
            agent["avg_return"], agent["avg_sharpe_vs_lending"], agent["total_trades"])
    chosen = next(c for c in tested if c["selected"])
    assert chosen["test_return"] == r["row"]["agent"]["return"]  # the final model, tested alone: the same
    lending = r["row"]["baselines"]["cash_plus_lending"]["return"]
    assert r["row"]["candidates"] == candidates_on_test(tested, lending)
    assert f"  fold 1: 2 models, test return median {statistics.median(c['test_return'] for c in tested):.2f} %" \
        in stdout


def test_a_fold_tested_before_candidates_existed_gets_them_on_rerun(wf_out, tmp_path):
    out = _copy(wf_out, tmp_path)
    path = out / "fold_2" / "test_result.json"
    full = read_json(path)
    older = {k: v for k, v in full.items() if k != "candidates"}
    older["row"] = {k: v for k, v in full["row"].items() if k != "candidates"}
    path.write_text(json.dumps(older))
    stamps = _stamps(out)
    proc = backtest(str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [e["event"] for e in log_events_text(proc.stderr) if e.get("event", "").startswith("fold_")] == \
        ["fold_adopted", "fold_adopted"]  # nothing trained again
    again = read_json(path)
    for c, before in zip(again["candidates"], full["candidates"]):  # the copy's own model files, tested alike
        assert c.pop("model") == before.pop("model").replace(str(wf_out[0]), str(out))
    assert again == full  # the same candidates, the rest as it was
    changed = {k for k, v in _stamps(out).items() if stamps.get(k) != v}
    assert changed == {"fold_2/test_result.json", "walk_forward.json"}


def _copy(wf_out, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(wf_out[0], out)
    return out


def _stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerun_skips_finished_folds_and_redoes_a_deleted_one_identically(wf_out, tmp_path):
    out = _copy(wf_out, tmp_path)
    before = read_json(out / "walk_forward.json")
    fold1 = _stamps(out / "fold_1")
    shutil.rmtree(out / "fold_2")  # as if killed after fold 1
    proc = backtest(str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = [e for e in log_events_text(proc.stderr) if e.get("event", "").startswith("fold_")]
    assert [(e["event"], e["fold"]) for e in events] == [("fold_adopted", 1), ("fold_started", 2),
                                                         ("fold_finished", 2)]
    assert _stamps(out / "fold_1") == fold1  # fold 1: not a file rewritten
    after = read_json(out / "walk_forward.json")
    assert after["folds"] == before["folds"]  # same seed, data and config on the CPU: the same numbers


def test_interrupted_fold_resumes_its_pipeline_without_training_again(wf_out, tmp_path):
    out = _copy(wf_out, tmp_path)
    runs = {k: v for k, v in _stamps(out / "fold_2").items() if k.endswith(".pt") or k.endswith("/result.json")}
    previous = read_json(out / "fold_2" / "test_result.json")
    (out / "fold_2" / "test_result.json").unlink()  # killed after fold 2's pipeline, before its test
    proc = backtest(str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = [e["event"] for e in log_events_text(proc.stderr)]
    assert "pipeline_already_done" in names and "run_started" not in names
    stamps = _stamps(out / "fold_2")
    assert runs and {k: stamps[k] for k in runs} == runs  # no model or run result written again
    again = read_json(out / "fold_2" / "test_result.json")
    assert again["row"] == previous["row"] and again["evaluation"] == previous["evaluation"]


def test_a_failing_fold_stops_the_backtest_naming_the_fold(wf_out, tmp_path):
    out = _copy(wf_out, tmp_path)
    # fold 2's pipeline finds its data snapshot changed since it was recorded: a permanent error of the pipeline
    (out / "fold_2" / "test_result.json").unlink()
    (out / "fold_2" / "complete_training_summary.json").unlink()
    snapshot = next((out / "fold_2" / "data").iterdir())
    snapshot.write_bytes(snapshot.read_bytes() + b"\x00")
    proc = backtest(str(out))
    assert proc.returncode == 1
    last = error_lines(proc.stderr)[-1]
    assert last.startswith("error: fold 2 (train 2024-11-01 .. 2025-05-27, test 2025-05-27 .. 2025-06-01): "
                           f"its pipeline failed: the pipeline at {out / 'fold_2'} finished, but 1 file(s)"), last
    assert f"{snapshot} is damaged: its sha256" in last  # checked by digest before anything is adopted
    wf = read_json(out / "walk_forward.json")
    assert not (out / "fold_2" / "test_result.json").exists()
    assert wf["complete"] is False and [r["fold"] for r in wf["folds"]] == [1]  # the progress so far


def test_another_layout_on_the_same_output_is_refused_before_anything_runs(wf_out, tmp_path):
    out = _copy(wf_out, tmp_path)
    stamps = _stamps(out)
    proc = run_cli(["backtest", "--walk-forward", *TINY_WF[:-4], "--fold-days", "4", "--folds", "2",
                    "--output", str(out)])
    assert proc.returncode == 2
    assert error_lines(proc.stderr)[-1].startswith(f"error: {out}/walk_forward.json belongs to a walk-forward "
                                                           "with another config, fold layout or seeds")
    assert _stamps(out) == stamps


def test_seeds_run_one_walk_forward_per_seed_and_adopt_one_run_alone(wf_out, tmp_path):
    # wf_out is the walk-forward with the default --seed 42: put where --seeds 42 43 keeps seed 42, it is adopted
    out = tmp_path / "out"
    shutil.copytree(wf_out[0], out / "seed_42")
    stamps = _stamps(out / "seed_42")
    proc = backtest(str(out), "--seeds", "42", "43")
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = [e for e in log_events_text(proc.stderr) if e.get("event", "").startswith(("fold_", "seed_"))]
    assert [(e["event"], e.get("seed", e.get("fold"))) for e in events] == [
        ("seed_started", 42), ("fold_adopted", 1), ("fold_adopted", 2),
        ("seed_started", 43), ("fold_started", 1), ("fold_finished", 1), ("fold_started", 2), ("fold_finished", 2)]
    changed = {k for k, v in _stamps(out / "seed_42").items() if stamps.get(k) != v}
    assert changed == {"walk_forward.json"}  # rewritten with the same rows; no fold touched
    seeds = {s: read_json(out / f"seed_{s}" / "walk_forward.json") for s in (42, 43)}
    assert seeds[42]["folds"] == read_json(wf_out[0] / "walk_forward.json")["folds"]
    for k in (1, 2):  # seed 43's pipelines ran with --seed 43, on the same fold windows
        summary = read_json(out / "seed_43" / f"fold_{k}" / "complete_training_summary.json")
        assert summary["config"]["seed"] == 43
        assert read_json(out / "seed_43" / f"fold_{k}" / "test_result.json")["window"] == \
            read_json(out / "seed_42" / f"fold_{k}" / "test_result.json")["window"]
    combined = read_json(out / "walk_forward.json")
    assert combined["complete"] is True and combined["seeds"] == [42, 43]
    assert combined["combined"] == combine_seeds({s: seeds[s]["folds"] for s in (42, 43)})
    assert combined["per_seed"] == {str(s): seeds[s]["aggregate"] for s in (42, 43)}
    assert render_seeds(combined["combined"]) in proc.stdout
    assert [r["agent"]["return"] for r in seeds[43]["folds"]] != [r["agent"]["return"] for r in seeds[42]["folds"]]


@pytest.mark.parametrize("flags, message", [
    ([], "error: backtest needs --walk-forward"),
    (["--walk-forward", "--fold-days", "0"], "error: --fold-days: 0 is out of range"),
    (["--walk-forward", "--fold-days", "10", "--step-days", "3"], "error: --step-days 3 is shorter than --fold-days 10"),
    (["--walk-forward", "--folds", "many"], "error: --folds"),
    (["--walk-forward", "--start", "2025-03-01", "--end", "2025-06-01", "--val-days", "30", "--fold-days", "10",
      "--folds", "4"], "error: fold 1 would train on 52 day(s) (2025-03-01 .. 2025-04-22)"),  # 92 - 40 days
    (["--walk-forward", "--start", "2025-01-01", "--end", "2025-07-01", "--val-days", "30", "--fold-days", "5"],
     "error: the candles end at"),
    (["--walk-forward", "--seeds", "42", "7", "42"], "error: --seeds 42 7 42 names a seed twice; accepted: distinct"),
    (["--walk-forward", "--seeds", "-1"], "error: --seeds: -1 is out of range; accepted: integers in [0, 2146483647]"),
    (["--walk-forward", "--seeds", "seven"], "error: --seeds must be a list of integer, got ['seven']"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(flags, message, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["backtest", *flags, "--pairs", "BTC/USDT", "--output", str(out)])
    assert proc.returncode == 2, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
    assert not out.exists()




# ------------------------------------------------------------------------------------------------ S3


def test_backtest_into_a_bucket_gives_the_local_numbers(seaweed, s3_env, wf_out):
    prefix = s3_env  # s3_env points this process's (and so the CLI's) AWS_* variables at the server
    env = None
    output = f"s3://{seaweed.bucket}/{prefix}"
    proc = backtest(output, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = seaweed.client()
    keys = {o["Key"][len(prefix) + 1:] for o in
            client.list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix + "/", MaxKeys=1000).get("Contents", [])}
    assert {"walk_forward.json", "fold_1/test_result.json", "fold_2/test_result.json",
            "fold_1/complete_training_summary.json", "fold_2/complete_training_summary.json"} <= keys
    read = lambda key: json.loads(client.get_object(Bucket=seaweed.bucket, Key=f"{prefix}/{key}")["Body"].read())  # noqa: E731
    local = read_json(wf_out[0] / "walk_forward.json")
    remote = read("walk_forward.json")
    assert remote["folds"] == local["folds"] and remote["aggregate"] == local["aggregate"]
    for k in (1, 2):
        r = read(f"fold_{k}/test_result.json")
        assert r["evaluation"]["model"].startswith(f"{output}/fold_{k}/")
        assert r["row"] == local["folds"][k - 1]
    # a rerun adopts both folds from the bucket
    proc = backtest(output, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [e["event"] for e in log_events_text(proc.stderr) if e.get("event", "").startswith("fold_")] == \
        ["fold_adopted", "fold_adopted"]
    # --seeds into the bucket: the walk-forward above, copied under <output>/seed_42/, is adopted as it is
    seeds_prefix = f"{prefix}-seeds"
    for key in keys:
        client.copy_object(Bucket=seaweed.bucket, Key=f"{seeds_prefix}/seed_42/{key}",
                           CopySource={"Bucket": seaweed.bucket, "Key": f"{prefix}/{key}"})
    proc = backtest(f"s3://{seaweed.bucket}/{seeds_prefix}", "--seeds", "42", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [e["event"] for e in log_events_text(proc.stderr) if e.get("event", "").startswith(("fold_", "seed_"))] == \
        ["seed_started", "fold_adopted", "fold_adopted"]
    combined = json.loads(client.get_object(Bucket=seaweed.bucket, Key=f"{seeds_prefix}/walk_forward.json")["Body"].read())
    assert combined["complete"] is True and combined["combined"] == combine_seeds({42: local["folds"]})
    assert combined["outputs"] == {"42": f"s3://{seaweed.bucket}/{seeds_prefix}/seed_42"}


# ---------------------------------------------------------------------------------------- Kubernetes


def test_folds_run_as_kubernetes_jobs_through_the_fake_api_server(s3, make_cluster, wf_out):
    """The same backtest with --executor kubernetes: every run of every fold is a Job of its fold's pipeline
    (the worker in a pod of the strict fake API server, the output in SeaweedFS), the numbers the local ones."""
    cluster = make_cluster(s3_server=s3)
    output = f"s3://{s3.bucket}/wf-k8s-{uuid.uuid4().hex}"
    args = build_parser().parse_args(["backtest", "--walk-forward", *TINY_WF, *k8s_flags(s3.endpoint_url),
                                      "--output", output])
    cfg, wf = resolve_pipeline_config(args), resolve_walk_forward(args)
    report = run_walk_forward(cfg, wf)
    local = read_json(wf_out[0] / "walk_forward.json")
    assert report["folds"] == local["folds"] and report["aggregate"] == local["aggregate"]
    folds = plan_folds("2024-11-01", "2025-06-01", wf, val_days=30)
    ids = [pipeline_id(fold_config(cfg, f, f"{output}/fold_{f.index}"), f"{output}/fold_{f.index}") for f in folds]
    assert len(set(ids)) == 2  # each fold is its own pipeline, so its Jobs never collide with another fold's
    assert cluster.jobs_created() == {f"nexlify-{pid}-{key}": 1 for pid in ids for key in ("init-1", "retrain-1")}
