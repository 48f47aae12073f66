"""The whole pipeline with the local executor on a local folder, run as the real `nexlify train` process.

One tiny uninterrupted pipeline (tests.pipeline_support.Reference) is run once and inspected from every
side: the summary's fields against the original guide's, the output layout, the decisions replayed
through controller.rules, the data snapshot's sha256, the best model loaded safely and re-evaluated by
`nexlify evaluate` to the same score, the test window. Then the output's ownership: another config is
refused with exit 2 and nothing changed, and --force starts over.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import nexlify
from controller import rules
from controller.selection import final_lines
from nexlify.data.candles import candle_filename
from nexlify.tb import EVENTS_FILE
from tests.pipeline_support import (
    Reference,
    comparable,
    error_lines,
    folder_tree,
    log_events,
    read_json,
    run_cli,
    sha256,
    train_args,
)

AVG_KEYS = ("avg_return", "avg_sharpe", "avg_win_rate", "avg_drawdown")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return Reference.get(tmp_path_factory)


@pytest.fixture(scope="module")
def summary(out: Path) -> dict:
    return read_json(out / "complete_training_summary.json")


def expected_snapshot(cfg: dict) -> list[str]:
    """data/ holds each pair's candles and, with arbitrage on, the second venue's candles of each pair."""
    keys = [f"data/{candle_filename(cfg['data']['exchange'], pair, '1h')}" for pair in cfg["data"]["pairs"]]
    if "arbitrage" in cfg["env"]["strategies"]:
        from nexlify.data.second_venue import second_venue_pair

        arb = cfg["arbitrage"]
        keys += [f"data/{candle_filename(arb['second_exchange'], second_venue_pair(pair, arb['second_quote']), '1h')}"
                 for pair in cfg["data"]["pairs"]]
    return sorted(keys)


# ------------------------------------------------------------------------------------- the summary


def test_summary_has_the_guides_fields(out, summary):
    assert summary["pipeline_complete"] is True
    # threshold 0 and patience 3: no rule stops before max_iterations (2)
    assert summary["stop_reason"] == rules.MAX_ITERATIONS

    initial = summary["initial_runs"]
    assert [r["run_id"] for r in initial] == [1, 2]
    assert [r["seed"] for r in initial] == [42, 1042]
    for r in initial:
        assert isinstance(r["val_score"], float) and math.isfinite(r["val_score"])
        assert isinstance(r["train_return"], float)
        assert set(AVG_KEYS) <= set(r["val_metrics"])
        # the score is the guide's formula of the four averages
        m = r["val_metrics"]
        assert r["val_score"] == pytest.approx(
            m["avg_return"] * 0.4 + m["avg_sharpe"] * 10 * 0.3 + m["avg_win_rate"] * 100 * 0.2 - m["avg_drawdown"] * 0.1,
            rel=1e-9, abs=1e-9)

    iterations = summary["retraining_iterations"]
    assert len(iterations) == 2
    for k, it in enumerate(iterations, start=1):
        assert it["iteration"] == k
        assert it["seed"] == rules.retrain_seed(42, 2, k) == 42 + 1000 * (1 + k)
        assert isinstance(it["score"], float) and isinstance(it["improvement_pct"], float)
        assert set(AVG_KEYS) <= set(it["metrics"])
        assert it["model_path"].startswith(f"retraining/iteration_{k}/model_return")

    best_initial = max(r["val_score"] for r in initial)
    assert summary["best_initial_score"] == best_initial
    # a new best is always a higher score, so the final best is the highest of them
    final = max([best_initial] + [it["score"] for it in iterations if it["new_best"]])
    assert summary["final_best_score"] == final
    assert summary["total_improvement_pct"] == pytest.approx((final - best_initial) / abs(best_initial) * 100,
                                                             rel=1e-12, abs=1e-12)
    assert summary["final_model_path"].endswith(".pt")
    assert summary["failures"] == []
    # the path works from where the command ran; the key is the same file relative to the output
    assert summary["final_model_path"] == str(out / summary["final_model_key"]) and os.path.isabs(summary["final_model_path"])


def test_every_run_reports_the_baselines_and_the_summary_is_honest_about_the_selection(out, summary):
    runs = [("init-1", "initial_runs/run_1"), ("init-2", "initial_runs/run_2"),
            ("retrain-1", "retraining/iteration_1"), ("retrain-2", "retraining/iteration_2")]
    results = {src: read_json(out / folder / "result.json") for src, folder in runs}
    for src, result in results.items():
        baselines = result["val_baselines"]
        assert set(baselines) == {"flat", "cash_plus_lending", "buy_and_hold_full", "buy_and_hold_sized",
                                  "ma_crossover", "random_valid"}, src
        assert baselines["flat"]["avg_return"] == 0.0 and baselines["cash_plus_lending"]["avg_return"] > 0.0
        for m in [result["val_metrics"]] + list(baselines.values()):
            assert {"avg_return", "avg_sharpe", "exposure", "turnover", "fees_paid"} <= set(m)
        assert result["val_metrics"]["return_moments"]["n"] == 30 * 24
        assert "switched on" in result["baseline_notes"]["cash_plus_lending"]  # the tiny pipeline trades spot only
    # the same window and environment for every run: the same baselines (the random seeds are fixed)
    assert all(r["val_baselines"] == results["init-1"]["val_baselines"] for r in results.values())

    # every candidate's validation return and Sharpe beside its score; exactly the final model is selected
    entries = summary["initial_runs"] + summary["retraining_iterations"]
    cands = summary["candidates"]
    assert [c["source"] for c in cands] == [src for src, _ in runs]
    for c, e in zip(cands, entries):
        metrics = e.get("val_metrics") or e["metrics"]
        assert (c["val_return"], c["val_sharpe"]) == (metrics["avg_return"], metrics["avg_sharpe"])
        assert c["val_sharpe_vs_lending"] == metrics["avg_sharpe_vs_lending"] is not None
        assert c["val_score"] == e.get("val_score", e.get("score"))
        assert c["selected"] == (e["model_path"] == summary["final_model_key"])
    assert sum(c["selected"] for c in cands) == 1

    sel = summary["selection"]
    winner = next(c for c in cands if c["selected"])
    assert sel["selected"] == winner["source"] and sel["models_tried"] == 4
    lending = results[winner["source"]]["val_baselines"]["cash_plus_lending"]
    assert sel["cash_plus_lending"]["avg_return"] == lending["avg_return"]
    assert sel["beats_cash_plus_lending"] == (winner["val_return"] > lending["avg_return"])
    assert ("does not beat" in sel["verdict"]) == (not sel["beats_cash_plus_lending"])
    # the verdict: the deflated Sharpe of the winner's Sharpe in excess of lending, recomputed from the runs'
    # result.json with the rule (nexlify.verdict), for the 4 models tried
    from nexlify.verdict import verdict

    own = results[winner["source"]]["val_metrics"]["excess_return_moments"]
    trials = [r["val_metrics"]["excess_return_moments"]["sharpe"] for r in results.values()]
    expected = verdict(winner["val_return"], lending["avg_return"], own, trials,
                       window=f"{winner['source']} on the validation window")
    assert summary["verdict"] == pytest.approx(expected) and summary["verdict"]["models_tried"] == 4
    assert sel["verdict"] == summary["verdict"]["text"]
    assert sel["deflated_sharpe"]["value"] == summary["verdict"]["deflated_sharpe"]
    if own["sharpe"] is not None:
        assert own["n"] == 30 * 24 and 0.0 <= summary["verdict"]["deflated_sharpe"] <= 1.0
        assert summary["verdict"]["sharpe_vs_lending"] == pytest.approx(own["sharpe"] * (24 * 365) ** 0.5)
    assert summary["final_val_baselines"]["cash_plus_lending"]["avg_return"] == lending["avg_return"]
    # the units of the numbers, by field name: percent, fractions, and the score that is not a return
    units = summary["units"]
    assert "percent" in units["avg_return"] and "fraction" in units["avg_win_rate"]
    assert "fraction" in units["exposure"] and "not a return" in units["total_improvement_pct"]

    # the train command's last lines say the same, the verdict last, word for word
    # (JSON logs here: every line is an event, the closing lines `pipeline_verdict` events in words)
    last = [json.loads(line)["line"] for line in (out.parent / "train.log").read_text().strip().splitlines()[-4:]]
    assert last[0].startswith(f"winner: {winner['source']}") and "4 models tried" in last[0]
    assert last[2].startswith("cash plus lending, same window: return")
    assert last[3] == summary["verdict"]["text"]
    assert ("does not beat cash plus lending" in last[3]) == (not sel["beats_cash_plus_lending"])


def test_the_page_and_the_command_say_the_summarys_verdict(out, summary):
    # report.html: the verdict is the first thing on the page, before any score, in the summary's words
    import html as html_lib
    import re

    page = (out / "report.html").read_text()
    shown = re.search(r'<p id="verdict" class="verdict (\w+)" data-beats="(\w+)">(.*?)</p>', page, flags=re.S)
    assert shown, "no verdict on the page"
    v = summary["verdict"]
    assert html_lib.unescape(shown.group(3)) == v["text"]
    assert shown.group(2) == json.dumps(v["beats_cash_plus_lending"])
    body = page[page.index("<body"):]
    assert body.index('id="verdict"') < body.index("score")
    # the headline score is labelled as the guide's selection score, not a return
    assert "selection score" in page and "it is not a" in page
    # the train command: its printed result and its last line say the same
    events = [json.loads(line) for line in (out.parent / "train.log").read_text().strip().splitlines()]
    result = next(e for e in reversed(events) if e.get("event") == "pipeline_result")
    assert result["verdict"] == v["text"] and result["beats_cash_plus_lending"] == v["beats_cash_plus_lending"]
    assert result["deflated_sharpe"] == v["deflated_sharpe"] and result["sharpe_vs_lending"] == v["sharpe_vs_lending"]
    assert "not returns" in result["score_note"]
    assert events[-1]["line"] == v["text"]


def test_summary_records_config_data_versions_device_and_timings(out, summary):
    cfg = summary["config"]
    assert cfg == read_json(out / "pipeline_config.json")
    assert (cfg["initial_runs"], cfg["initial_episodes"], cfg["retrain_episodes"], cfg["max_iterations"]) == (2, 8, 8, 2)
    assert cfg["data"]["pairs"] == ["BTC/USDT"] and cfg["env"]["num_envs"] == 4 and cfg["agent"]["learning_starts"] == 256
    assert cfg["output"] == str(out)

    data = summary["data"]
    assert data["pairs"] == ["BTC/USDT"] and data["exchange"] == "binance" and data["timeframe"] == "1h"
    # 2024-11-01 .. 2025-06-01 is 212 days of hourly bars; validation 30 days, test 15 days, the rest train
    assert (data["start"], data["end"]) == ("2024-11-01T00:00:00Z", "2025-06-01T00:00:00Z")
    assert data["bars"] == 212 * 24
    assert data["validation"] == {"start": "2025-04-17T00:00:00Z", "end": "2025-05-17T00:00:00Z", "bars": 30 * 24}
    assert data["test"] == {"start": "2025-05-17T00:00:00Z", "end": "2025-06-01T00:00:00Z", "bars": 15 * 24}
    assert data["train"]["bars"] == (212 - 45) * 24
    snapshot_files = sorted(f"data/{p.name}" for p in (out / "data").iterdir())
    assert snapshot_files == sorted(f["key"] for f in data["files"]) == expected_snapshot(cfg)
    for f in data["files"]:
        assert f["sha256"] == sha256((out / f["key"]).read_bytes())
        assert f["rows"] == 212 * 24  # the bundled venues have no missing bars in this window

    assert summary["versions"]["nexlify"] == nexlify.__version__
    assert summary["versions"]["torch"] == str(torch.__version__)
    assert summary["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert summary["device_requested"] == "auto"
    assert summary["timings"]["initial_s"] > 0 and summary["timings"]["retraining_s"] > 0
    for entry in summary["initial_runs"] + summary["retraining_iterations"]:
        assert entry["timings"]["total_s"] > 0


# ------------------------------------------------------------------------------------- the layout


def test_output_layout(out, summary):
    names = set(folder_tree(out))
    for i, run in enumerate(summary["initial_runs"], start=1):
        result = read_json(out / f"initial_runs/run_{i}/result.json")
        assert result["status"] == "succeeded" and result["seed"] == run["seed"]
        assert result["val_score"] == run["val_score"]
        assert result["episodes_trained"] == 8
        # model_return{R}.pt, R the validation return in percent with one decimal
        expected_name = f"model_return{result['val_metrics']['avg_return']:.1f}.pt"
        assert run["model_path"] == f"initial_runs/run_{i}/{expected_name}"
    total_episodes = {r["model_path"]: 8 for r in summary["initial_runs"]}  # model -> episodes behind it
    state = read_json(out / "pipeline_state.json")
    for it, recorded in zip(summary["retraining_iterations"], state["retraining"]):
        k = it["iteration"]
        result = read_json(out / f"retraining/iteration_{k}/result.json")
        assert result["status"] == "succeeded" and result["val_score"] == it["score"]
        # 8 more episodes on top of the model it continued from
        assert result["episodes_trained"] == 8
        assert result["episodes_total"] == total_episodes[recorded["continued_from"]] + 8
        total_episodes[it["model_path"]] = result["episodes_total"]
        assert it["model_path"] == f"retraining/iteration_{k}/model_return{result['val_metrics']['avg_return']:.1f}.pt"
    for path in [r["model_path"] for r in summary["initial_runs"]] + \
            [it["model_path"] for it in summary["retraining_iterations"]] + [summary["final_model_key"]]:
        assert (out / path).is_file(), path
    expected = {"complete_training_summary.json", "pipeline_state.json", "pipeline_config.json", "training.log",
                "report.html"}
    expected |= set(expected_snapshot(summary["config"]))
    expected |= {f"initial_runs/run_{i}/{name}" for i in (1, 2) for name in ("result.json", EVENTS_FILE)}
    expected |= {r["model_path"] for r in summary["initial_runs"]}
    for it in summary["retraining_iterations"]:
        folder = f"retraining/iteration_{it['iteration']}"
        expected |= {f"{folder}/result.json", f"{folder}/{EVENTS_FILE}", it["model_path"]}
    # the baselines of the validation and test windows, computed once for the pipeline and stored under the
    # digest of what they depend on (controller.worker.SnapshotBaselines)
    stored = {n for n in names if n.startswith("baselines/")}
    assert len(stored) == 1 + (summary["data"]["test"] is not None)
    for n in stored:
        assert read_json(out / n)["key"] == n[len("baselines/"):-len(".json")]
    expected |= stored
    assert names == expected  # nothing else: no resume.pt left behind, no temporary files

    assert read_json(out / "pipeline_state.json")["phase"] == "DONE"
    events = [e["event"] for e in log_events(out / "training.log")]
    assert events.count("phase_changed") >= 4
    assert "pipeline_complete" in events and "iteration_finished" in events
    assert events.count("checkpoint_saved") >= 2 + len(summary["retraining_iterations"])  # relayed from workers


def test_decisions_match_the_rules_on_the_recorded_scores(out, summary):
    cfg = summary["config"]
    state = read_json(out / "pipeline_state.json")
    def trails(metrics: dict, entry: dict) -> bool:  # the state keeps each run's baselines on validation
        return rules.trails_lending(metrics["avg_return"], entry["val_baselines"])

    runs = state["initial_runs"]
    best_id = rules.select_best([(r["run_id"], r["val_score"]) for r in summary["initial_runs"]],
                                {r["run_id"]: trails(r["val_metrics"], runs[str(r["run_id"])]) for r in summary["initial_runs"]})
    assert summary["best_initial_run"] == best_id
    best_score = summary["best_initial_score"]
    best_model = summary["initial_runs"][best_id - 1]["model_path"]
    best_trails = trails(summary["initial_runs"][best_id - 1]["val_metrics"], runs[str(best_id)])
    count, stop = 0, None
    for it, recorded in zip(summary["retraining_iterations"], state["retraining"]):
        # every iteration continued from the best model at its time (the init_from chain)
        assert recorded["continued_from"] == best_model
        assert read_json(out / f"retraining/iteration_{it['iteration']}/result.json")["init_from"] == str(out / best_model)
        it_trails = trails(it["metrics"], recorded)
        d = rules.decide(it["score"], best_score, count, it["iteration"], threshold=cfg["improvement_threshold"],
                         patience=cfg["patience"], max_iterations=cfg["max_iterations"], trails=it_trails,
                         best_trails=best_trails)
        assert it["improvement_pct"] == d.improvement_pct
        assert it["new_best"] == d.new_best
        if d.new_best:
            best_score, best_model, best_trails = it["score"], it["model_path"], it_trails
        count, stop = d.patience_count, d.stop_reason
        if stop is not None:
            break
    assert it is summary["retraining_iterations"][-1]  # the pipeline stopped exactly where the rules say
    assert summary["stop_reason"] == stop
    assert summary["final_best_score"] == best_score
    assert summary["final_model_key"] == best_model


# ------------------------------------------------------------------------------- the final model


def test_best_model_loads_safely_and_evaluate_reproduces_its_scores(out, summary):
    model = out / summary["final_model_key"]
    ckpt = torch.load(model, weights_only=True, map_location="cpu")
    assert {"model_state_dict", "optimizer_state_dict", "config", "normalizer", "seed", "metrics"} <= set(ckpt)
    assert ckpt["metrics"]["val"]["score"] == summary["final_best_score"]

    val, test = summary["data"]["validation"], summary["data"]["test"]
    # the validation window, read from the pipeline's own snapshot: the same score, to the last bit
    got = run_cli(["evaluate", "--model", str(model), "--json", "--data-dir", str(out / "data"),
                   "--start", val["start"], "--end", val["end"]], timeout=120)
    assert got.returncode == 0, got.stderr
    report = json.loads(got.stdout)
    assert report["window"] == val
    assert report["agent"]["score"] == summary["final_best_score"]

    # --test-days: the test window is reported for the final model, and evaluate agrees
    final_test = summary["final_test_metrics"]
    assert final_test is not None and set(AVG_KEYS) <= set(final_test)
    final_entry = next(e for e in summary["initial_runs"] + summary["retraining_iterations"]
                       if e["model_path"] == summary["final_model_key"])
    assert final_entry["test_metrics"] == final_test
    got = run_cli(["evaluate", "--model", str(model), "--json", "--start", test["start"]], timeout=120)
    assert got.returncode == 0, got.stderr
    report = json.loads(got.stdout)
    assert report["window"] == test
    for key in AVG_KEYS + ("score",):
        assert report["agent"][key] == final_test[key], key


# ------------------------------------------------------------------------------- output ownership


def test_finished_pipeline_run_again_changes_nothing(out, summary, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = folder_tree(copy)
    got = run_cli(train_args(str(copy)), timeout=120)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["final_best_score"] == summary["final_best_score"]
    # --log-format json: every line is an event, the printed result and the closing lines included
    assert [json.loads(line)["event"] for line in got.stdout.splitlines()] == ["pipeline_result"]
    words = final_lines(summary)
    events = [json.loads(line) for line in got.stderr.splitlines()]
    assert words and [e.get("line") for e in events[-len(words):]] == words
    assert {e["event"] for e in events[-len(words):]} == {"pipeline_verdict"}
    assert "pipeline_already_done" in [e["event"] for e in events[:-len(words)]]
    after = folder_tree(copy)
    before.pop("training.log"), after.pop("training.log")  # the log records this start too
    # the copy lives elsewhere: the workers' config names its new place, and nothing else changed
    before.pop("pipeline_config.json"), after.pop("pipeline_config.json")
    moved = read_json(out / "pipeline_config.json")
    moved["output"] = str(copy)
    assert read_json(copy / "pipeline_config.json") == moved
    assert after == before
    assert comparable(read_json(copy / "complete_training_summary.json")) == comparable(summary)
    assert "pipeline_already_done" in [e["event"] for e in log_events(copy / "training.log")]


def test_another_config_is_refused_and_force_starts_over(out, summary, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = folder_tree(copy)
    changed = ["--initial-episodes", "4", "--max-iterations", "0"]

    got = run_cli(train_args(str(copy), *changed), timeout=120)
    assert got.returncode == 2
    errors = error_lines(got.stderr)
    assert len(errors) == 1
    assert "another config" in errors[0] and "--force" in errors[0] and str(copy) in errors[0]
    assert folder_tree(copy) == before  # nothing changed, training.log included

    got = run_cli(train_args(str(copy), *changed, "--force"), timeout=120)
    assert got.returncode == 0, got.stderr
    new = read_json(copy / "complete_training_summary.json")
    assert new["config"]["initial_episodes"] == 4 and new["pipeline_id"] != summary["pipeline_id"]
    assert new["stop_reason"] == rules.MAX_ITERATIONS and new["retraining_iterations"] == []
    assert not [p for p in (copy / "retraining").rglob("*") if p.is_file()]  # the old iterations are gone
    for i in (1, 2):  # the runs were redone, not adopted from the old config
        assert read_json(copy / f"initial_runs/run_{i}/result.json")["episodes_trained"] == 4
        old_model = copy / summary["initial_runs"][i - 1]["model_path"]
        new_model = copy / new["initial_runs"][i - 1]["model_path"]
        assert new_model.is_file()
        assert not old_model.exists() or old_model == new_model
        assert len(list((copy / f"initial_runs/run_{i}").glob("*.pt"))) == 1
    # a fresh log for the fresh pipeline: no event of the old one, one warning naming what was discarded
    events = log_events(copy / "training.log")
    assert {e.get("pipeline") for e in events if "pipeline" in e} == {new["pipeline_id"]}
    forced = [e for e in events if e["event"] == "pipeline_forced"]
    assert len(forced) == 1 and forced[0]["previous_hash"] == summary["config_hash"]


def test_a_resume_with_other_runtime_settings_hands_them_to_the_workers(out, tmp_path):
    """device and threads do not change the pipeline's hash; a resumed pipeline's workers read this start's."""
    from controller.cli import build_parser, resolve_pipeline_config
    from controller.pipeline import Pipeline
    from controller.stores import open_store
    from tests.pipeline_support import TINY

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    first = read_json(copy / "pipeline_config.json")
    assert (first["device"], first["threads"]) == ("auto", 1)
    args = build_parser().parse_args(["train", *TINY, "--output", str(copy), "--device", "cpu", "--threads", "2"])
    cfg = resolve_pipeline_config(args)
    pipeline = Pipeline(cfg, open_store(str(copy)), executor=None)  # type: ignore[arg-type] - no runs here
    pipeline.load_or_plan()
    assert pipeline.state.config_hash == read_json(out / "pipeline_state.json")["config_hash"]  # same pipeline
    now = read_json(copy / "pipeline_config.json")
    assert (now["device"], now["threads"]) == ("cpu", 2)
    first.update(device="cpu", threads=2, output=str(copy))
    assert now == first  # nothing else changed
