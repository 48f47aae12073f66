"""report.html: the numbers on the page are the summary's and the evaluation's.

The shared tiny pipeline (tests/pipeline_support.Reference) writes report.html after its summary; the
page's embedded data (`<script type="application/json" id="report-data">`) is read back and compared with
the summary, the state, the runs' event files, and `nexlify evaluate` of the final model. The trace's own
bookkeeping is checked against the environment's identities (PnL sources add up to the equity change; one
exit per closed trade), and the tear-sheet formulas against numbers worked out by hand."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from nexlify.baselines import BASELINES
from nexlify.report.metrics import annual_return, calmar, max_drawdown, sortino
from nexlify.tb import EVENTS_FILE, read_scalars
from tests.pipeline_support import Reference, read_json, run_cli


def page_json(html: str, ident: str) -> dict:
    match = re.search(rf'<script type="application/json" id="{ident}">(.*?)</script>', html, re.S)
    assert match, f"no {ident} in the page"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return Reference.get(tmp_path_factory)


@pytest.fixture(scope="module")
def summary(out) -> dict:
    return read_json(out / "complete_training_summary.json")


@pytest.fixture(scope="module")
def page(out) -> str:
    return (out / "report.html").read_text()


@pytest.fixture(scope="module")
def data(page) -> dict:
    return page_json(page, "report-data")


def test_the_page_is_self_contained(page):
    # nothing to fetch (the browser test also watches the network: no request leaves the file)
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", page, re.I)
    assert page.count("Plotly.newPlot") >= 1 and len(page) > 3_000_000  # plotly.js is inside


def test_runs_winner_and_stop_reason_are_the_summarys(data, summary, out):
    p = data["pipeline"]
    state = read_json(out / "pipeline_state.json")
    want = [(f"init-{r['run_id']}", r["val_metrics"]["avg_return"], r["val_metrics"]["avg_sharpe"], r["val_score"])
            for r in summary["initial_runs"]]
    want += [(f"retrain-{it['iteration']}", it["metrics"]["avg_return"], it["metrics"]["avg_sharpe"], it["score"])
             for it in summary["retraining_iterations"]]
    assert [(r["key"], r["val_return"], r["val_sharpe"], r["score"]) for r in p["runs"]] == want
    assert p["stop_reason"] == summary["stop_reason"]
    assert p["winner"]["model_path"] == summary["final_model_key"]
    assert p["winner"]["url"] == summary["final_model_path"]
    assert p["winner"]["score"] == summary["final_best_score"]
    winner = next(r for r in p["runs"] if r["key"] == p["winner"]["key"])
    assert winner["model_path"] == summary["final_model_key"]
    its = [r for r in p["runs"] if r["phase"] == "retrain"]
    assert [r["patience_count"] for r in its] == [e["patience_count"] for e in state["retraining"]]
    assert [r["improvement_pct"] for r in its] == [e["improvement_pct"] for e in summary["retraining_iterations"]]
    assert p["data"]["files"] == summary["data"]["files"]  # the window and each file's sha256
    assert p["rule"] == {k: summary["config"][k] for k in ("improvement_threshold", "patience", "max_iterations")}


def test_the_final_models_evaluation_is_its_validation_and_test(data, summary):
    winner = next(r for r in summary["initial_runs"] + summary["retraining_iterations"]
                  if r["model_path"] == summary["final_model_key"])
    val = data["evaluation"]["windows"]["validation"]["metrics"]
    want_val = winner.get("val_metrics") or winner["metrics"]
    for key in ("avg_return", "avg_sharpe", "avg_win_rate", "avg_drawdown", "total_trades", "score", "pnl_breakdown"):
        assert val[key] == want_val[key], key
    test = data["evaluation"]["windows"]["test"]["metrics"]
    for key, value in summary["final_test_metrics"].items():
        assert test[key] == value, key
    assert data["evaluation"]["windows"]["validation"]["start"] == summary["data"]["validation"]["start"]
    assert data["evaluation"]["windows"]["validation"]["end"] == summary["data"]["validation"]["end"]
    assert data["evaluation"]["windows"]["validation"]["bars"] == summary["data"]["validation"]["bars"]


@pytest.mark.parametrize("window", ["validation", "test"])
def test_the_trace_adds_up(data, summary, window):
    w = data["evaluation"]["windows"][window]
    e0 = summary["config"]["env"]["initial_equity"]
    for pair, p in w["pairs"].items():
        m = w["metrics"]["per_pair"][pair]
        n = w["bars"] + 1  # the decision bar before the window, then every bar of it
        assert len(p["equity"]) == len(p["time"]) == len(p["close"]) == len(p["position"]) == n
        assert p["equity"][0] == e0
        assert (p["equity"][-1] / e0 - 1.0) * 100.0 == pytest.approx(m["total_return"], rel=1e-12, abs=1e-12)
        assert -min(p["drawdown"]) == pytest.approx(m["max_drawdown"], rel=1e-9, abs=1e-12)
        # the PnL by source adds up to the equity change at every bar, and ends at the evaluation's breakdown
        total = np.sum([p["pnl"][s] for s in p["pnl"]], axis=0)
        assert np.allclose(total, np.asarray(p["equity"]) - e0, rtol=0, atol=1e-6)
        for source, series in p["pnl"].items():
            assert series[-1] == pytest.approx(m["pnl_breakdown"][source], abs=1e-9)
        # spot alone: one exit per closed trade, one entry per position opened
        exits = [t for t in p["trades"] if t["side"] == "exit"]
        entries = [t for t in p["trades"] if t["side"] == "entry"]
        assert len(exits) == m["trades"]
        assert len(entries) == len(exits) + p["position"][-1]
        opened = sum(1 for a, b in zip(p["position"], p["position"][1:]) if b and not a)
        assert len(entries) >= opened
        assert all(t["kind"] in ("close", "stop", "trailing", "target", "exit") for t in exits)
        # the exposure to spot is the position: positive exactly where a position is open
        assert [x > 0 for x in p["exposure"]["spot"]] == [bool(x) for x in p["position"]]
        assert p["tear_sheet"]["exposure_share"] == pytest.approx(np.mean(p["position"][1:]))
        assert p["tear_sheet"]["fees_paid"] == m["costs_paid"] == pytest.approx(-p["pnl"]["fees_and_gas"][-1])
        # the evaluation's baselines with their curves: flat stays at E0, every curve ends at its return
        b = w["baselines"][pair]
        assert sorted(b) == sorted(list(BASELINES) + ["buy_and_hold (no fees)"])
        assert b["flat"]["equity"] == [e0] * n and b["flat"]["total_return"] == 0.0
        for name, baseline in b.items():
            assert len(baseline["equity"]) == n, name
            assert (baseline["equity"][-1] / e0 - 1.0) * 100.0 == pytest.approx(baseline["total_return"], abs=1e-9), name
        hold = b["buy_and_hold (no fees)"]  # from the first fill's open to the last close
        assert hold["equity"][-1] / e0 == pytest.approx(p["close"][-1] / p["first_open"])
        # the trace (evaluate_policy alone) gives the numbers of the evaluation beside the baselines
        assert w["trace_metrics"]["per_pair"][pair]["total_return"] == m["total_return"]
        assert w["trace_metrics"]["per_pair"][pair]["sharpe"] == m["sharpe"]


def test_the_baselines_are_the_runs_own(data, summary, out):
    """The report's baselines of the final model's validation window are the ones its run reported."""
    folder = summary["final_model_key"].rsplit("/", 1)[0]
    result = read_json(out / folder / "result.json")
    for window, key in (("validation", "val_baselines"), ("test", "test_baselines")):
        w = data["evaluation"]["windows"][window]
        for name, metrics in result[key].items():
            for pair, pm in metrics["per_pair"].items():
                drawn = w["baselines"][pair][name]
                for k in ("total_return", "sharpe", "max_drawdown", "trades", "fees_paid", "turnover"):
                    assert drawn[k] == pm[k], (window, name, k)


def test_training_curves_are_the_event_files(data, summary, out):
    folders = {f"init-{r['run_id']}": f"initial_runs/run_{r['run_id']}" for r in summary["initial_runs"]}
    folders.update({f"retrain-{it['iteration']}": f"retraining/iteration_{it['iteration']}"
                    for it in summary["retraining_iterations"]})
    assert sorted(data["training"]) == sorted(folders)
    for key, folder in folders.items():
        scalars = read_scalars([(out / folder / EVENTS_FILE).read_bytes()])
        assert data["training"][key] == {tag: [[s, v] for s, v in values] for tag, values in scalars.items()}
        assert [s for s, _ in scalars["train/episode_return"]] == list(range(1, 9))  # 8 episodes, each once
        result = read_json(out / folder / "result.json")
        assert scalars["val/score"] == [(8, pytest.approx(result["val_score"], rel=1e-6))]


def test_nexlify_report_rebuilds_the_same_page_data(out, data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    got = run_cli(["report", str(copy)], timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == str(copy / "report.html")
    assert page_json((copy / "report.html").read_text(), "report-data") == data


def test_nexlify_report_on_an_unfinished_output_is_bad_input(tmp_path):
    got = run_cli(["report", str(tmp_path)], timeout=60)
    assert got.returncode == 2
    last = json.loads(got.stderr.strip().splitlines()[-1])  # JSON logs (not a terminal): the error is an event
    assert last["event"] == "failed" and last["exit_code"] == 2
    assert "complete_training_summary.json does not exist" in last["error"] and "has not finished" in last["error"]
    assert not (tmp_path / "report.html").exists()


def test_nexlify_report_on_a_missing_folder_says_it_is_missing(tmp_path):
    for target, says in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "is a file, not a folder")):
        if target.name == "file":
            target.write_text("x")
        got = run_cli(["report", str(target)], timeout=60)
        assert got.returncode == 2 and got.stdout == ""
        (line,) = got.stderr.strip().splitlines()
        error = json.loads(line)["error"]
        assert error.startswith(f"{target} {says}") and "has not finished" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_evaluate_report_draws_the_evaluation_it_printed(out, summary, tmp_path):
    page_path = tmp_path / "eval.html"
    got = run_cli(["evaluate", "--model", summary["final_model_path"], "--start", "2025-05-01",
                   "--end", "2025-05-11", "--json", "--report", str(page_path)], timeout=120)
    assert got.returncode == 0, got.stderr
    printed = json.loads(got.stdout)
    w = page_json(page_path.read_text(), "report-data")["evaluation"]["windows"]["window"]
    assert (w["start"], w["end"], w["bars"]) == (printed["window"]["start"], printed["window"]["end"], 240)
    for key in ("avg_return", "avg_sharpe", "score", "total_trades", "per_pair"):
        assert w["metrics"][key] == printed["agent"][key], key
    hold = printed["buy_and_hold"]["BTC/USDT"]
    drawn = w["baselines"]["BTC/USDT"]["buy_and_hold (no fees)"]
    for key in ("total_return", "sharpe", "max_drawdown"):  # evaluation.buy_and_hold's numbers, with its curve
        assert drawn[key] == pytest.approx(hold[key], rel=1e-9), key
    for name, metrics in printed["baselines"].items():  # evaluate's baselines, each with its curve
        drawn = w["baselines"]["BTC/USDT"][name]
        assert drawn["total_return"] == metrics["per_pair"]["BTC/USDT"]["total_return"]
        assert len(drawn["equity"]) == 241
    assert "curves" not in printed  # drawn in the page; printed with --record only


# ------------------------------------------------------------------------ tear sheet, worked by hand


def test_tear_sheet_formulas_by_hand():
    equity = np.array([100.0, 110.0, 99.0, 108.9])  # returns +10 %, -10 %, +10 %
    assert max_drawdown(equity) == pytest.approx(0.1)  # 110 -> 99
    # mean(r) = 0.1/3, downside = sqrt(0.01/3); per bar (bars_per_year 1)
    assert sortino(equity, 1) == pytest.approx((0.1 / 3) / (0.01 / 3) ** 0.5)
    # 3 bars a "year" of 3 bars: annual return is the total, 8.9 %
    assert annual_return(equity, 3) == pytest.approx(0.089)
    assert calmar(equity, 3) == pytest.approx(0.089 / 0.1)
    assert sortino(np.array([100.0, 101.0, 102.0]), 1) == 0.0  # no downside
    assert calmar(np.array([100.0, 101.0, 102.0]), 1) == 0.0  # no drawdown


# ------------------------------------------------------------- baselines the evaluation reports


def test_reported_baselines_are_drawn_per_pair():
    from nexlify.env.batched import PNL_SOURCES
    from nexlify.report import per_pair_baselines
    from nexlify.report.page import window_figures
    from nexlify.report.trace import EXPOSURES

    reported = {
        "flat": {"avg_return": 0.0, "avg_sharpe": 0.0, "avg_drawdown": 0.0},
        "ma_crossover": {"avg_return": 1.5, "per_pair": {
            "BTC/USDT": {"total_return": 2.0, "sharpe": 1.1, "max_drawdown": 3.0, "equity": [100.0, 101.0, 102.0]},
            "ETH/USDT": {"total_return": 1.0, "sharpe": 0.5, "max_drawdown": 2.0}}},
    }
    got = per_pair_baselines(reported, ["BTC/USDT", "ETH/USDT"])
    assert got["BTC/USDT"]["ma_crossover"] == reported["ma_crossover"]["per_pair"]["BTC/USDT"]
    assert got["ETH/USDT"]["ma_crossover"]["total_return"] == 1.0 and "equity" not in got["ETH/USDT"]["ma_crossover"]
    assert got["ETH/USDT"]["flat"] == {"avg_return": 0.0, "avg_sharpe": 0.0, "avg_drawdown": 0.0, "total_return": 0.0,
                                       "sharpe": 0.0, "max_drawdown": 0.0}
    times = ["2025-05-01T00:00:00Z", "2025-05-01T01:00:00Z", "2025-05-01T02:00:00Z"]
    pair = {"time": times, "close": [10.0, 11.0, 12.0], "equity": [100.0, 100.5, 99.0], "drawdown": [0.0, 0.0, -1.49],
            "position": [0, 1, 0], "trades": [], "pnl": {s: [0.0, 0.0, 0.0] for s in PNL_SOURCES},
            "exposure": {s: [0.0, 0.05, 0.0] for s in EXPOSURES}}
    figs = window_figures("w", {"pairs": {"BTC/USDT": pair}, "baselines": {"BTC/USDT": got["BTC/USDT"]}})
    lines = {trace["name"]: list(trace["y"]) for trace in figs["w-btc-usdt-baselines"]["data"]}
    assert lines == {"agent": [100.0, 100.5, 99.0], "ma_crossover": [100.0, 101.0, 102.0]}  # flat has no curve
    # without cash plus lending's curve: the agent alone on the equity chart, and no excess panel
    assert [t["name"] for t in figs["w-btc-usdt-equity"]["data"]] == ["agent"] and "w-btc-usdt-excess" not in figs

    # with it: the equity chart is the agent against lending alone (buy-and-hold, random... on their own panel),
    # and the excess panel is the agent's equity less lending's, bar by bar: 100-100, 100.5-100.01, 99-100.02
    got["BTC/USDT"]["cash_plus_lending"] = {"total_return": 0.02, "equity": [100.0, 100.01, 100.02]}
    figs = window_figures("w", {"pairs": {"BTC/USDT": pair}, "baselines": {"BTC/USDT": got["BTC/USDT"]}})
    lines = {trace["name"]: list(trace["y"]) for trace in figs["w-btc-usdt-equity"]["data"]}
    assert lines == {"agent": [100.0, 100.5, 99.0], "cash_plus_lending": [100.0, 100.01, 100.02]}
    (excess,) = figs["w-btc-usdt-excess"]["data"]
    assert list(excess["y"]) == pytest.approx([0.0, 0.49, -1.02])
    assert {t["name"] for t in figs["w-btc-usdt-baselines"]["data"]} == {"agent", "ma_crossover", "cash_plus_lending"}
    # per-bar series on the bar grid: the first bar and the bar's length (1 h in ms), no timestamp per point
    for name in ("equity", "excess", "baselines", "drawdown", "price", "pnl", "exposure"):
        fig = figs[f"w-btc-usdt-{name}"]
        assert fig["layout"]["xaxis"]["type"] == "date"
        for trace in fig["data"]:
            assert "x" not in trace and (trace["x0"], trace["dx"]) == (times[0], 3_600_000), (name, trace["name"])
