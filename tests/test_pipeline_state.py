"""pipeline_state.json as typed records (controller.state): a file the pipeline wrote before the records
existed reads back into them and is written back byte for byte, so an output started by an earlier
version resumes; keys not known are kept; fields not yet decided stay out of the file."""

from __future__ import annotations

import json

import pytest

from controller.state import Best, DataSnapshot, Failure, InitialRun, Iteration, PipelineState


def run_entry(run_id: int, seed: int, score: float, **extra) -> dict:
    """An initial run's entry as the pipeline has written it (metric tables trimmed to a few numbers)."""
    key = f"initial_runs/run_{run_id}/model_return{score:.1f}.pt"
    return {"run_id": run_id, "seed": seed, "val_score": score, "train_return": -0.63,
            "val_metrics": {"avg_return": -0.14, "avg_sharpe": -0.49, "score": score},
            "per_pair": {"BTC/USDT": {"total_return": -0.14}}, "model_key": key, "model_path": key,
            "test_metrics": None, "timings": {"train_s": 3.1}, "device": "cpu",
            "versions": {"torch": "2.13.0+cpu"}, "return_moments": {"n": 2160}, "val_baselines": None, **extra}


# A state the pipeline wrote in RETRAINING, in the order it adds keys (taken from a --quick-test output)
WRITTEN = {
    "state_version": 1, "pipeline_id": "p-1", "config_hash": "abc", "started_at": "2026-12-05T04:15:30Z",
    "initial_runs": {"1": run_entry(1, 42, 4.6), "2": run_entry(2, 1042, 9.5)},
    "retraining": [{
        "iteration": 1, "seed": 3042, "score": 12.0, "improvement_pct": 26.3, "metrics": {"avg_return": 0.8},
        "per_pair": None, "model_path": "retraining/iteration_1/model_return0.8.pt", "train_return": 0.2,
        "new_best": True, "patience_count": 0, "continued_from": "initial_runs/run_2/model_return9.5.pt",
        "test_metrics": {"avg_return": 0.1}, "timings": None, "device": "cpu", "versions": None,
        "return_moments": None, "val_baselines": {"flat": {"avg_return": 0.0}}}],
    "timings": {"initial_s": 45.824},
    "phase": "RETRAINING", "updated_at": "2026-12-05T04:16:40Z",
    "data": {"exchange": "binance", "pairs": ["BTC/USDT"], "timeframe": "1h", "start": "2023-06-01T00:00:00Z",
             "end": "2025-06-01T00:00:00Z", "bars": 17544,
             "train": {"start": "2023-06-01T00:00:00Z", "end": "2025-03-03T00:00:00Z", "bars": 15384},
             "validation": {"start": "2025-03-03T00:00:00Z", "end": "2025-06-01T00:00:00Z", "bars": 2160},
             "test": None,
             "files": [{"pair": "BTC/USDT", "key": "data/binance_BTC-USDT_1h.csv.gz", "rows": 17544,
                        "sha256": "0" * 64, "source": "bundled", "gaps": {"missing_bars": 0}}]},
    "runs": 2,
    "best": {"score": 12.0, "model_key": "retraining/iteration_1/model_return0.8.pt", "source": "retrain-1"},
    "best_initial_run": 2, "best_initial_score": 9.5, "patience_count": 0, "iteration": 2,
}


def test_a_written_state_reads_into_records_and_writes_back_byte_for_byte():
    state = PipelineState.from_dict(json.loads(json.dumps(WRITTEN)))
    assert isinstance(state.best, Best) and (state.best.score, state.best.source) == (12.0, "retrain-1")
    assert isinstance(state.data, DataSnapshot) and state.data.validation["bars"] == 2160
    assert [type(e) for e in state.initial_runs.values()] == [InitialRun, InitialRun]
    assert [e.seed for e in state.initial_runs.values()] == [42, 1042]
    assert isinstance(state.retraining[0], Iteration) and state.retraining[0].new_best is True
    assert (state.phase, state.iteration, state.patience_count, state.stop_reason) == ("RETRAINING", 2, 0, None)
    assert state.failures is None
    assert json.dumps(state.to_dict(), indent=2) == json.dumps(WRITTEN, indent=2)


def test_a_new_state_holds_only_what_is_decided():
    # what the pipeline wrote before its first transition: nothing optional, not even as null
    state = PipelineState(pipeline_id="p-1", config_hash="abc", started_at="2026-12-05T04:15:30Z")
    assert state.to_dict() == {"state_version": 1, "pipeline_id": "p-1", "config_hash": "abc",
                               "started_at": "2026-12-05T04:15:30Z", "initial_runs": {}, "retraining": [],
                               "timings": {}}
    state.phase, state.runs = "INITIAL_RUNNING", 2
    state.failures = [Failure(run="init-1", reason="worker failed: exit code 3", details={"exit_code": 3})]
    written = state.to_dict()
    assert list(written)[-3:] == ["phase", "runs", "failures"] and "best" not in written
    assert written["failures"] == [{"run": "init-1", "reason": "worker failed: exit code 3",
                                    "details": {"exit_code": 3}}]


@pytest.mark.parametrize("where, change, read", [
    # keys a later version may add: kept where they were found, written back
    ("top", {"lease_holder": "pod-7"}, lambda s: s.extra == {"lease_holder": "pod-7"}),
    ("initial run", {"checkpoint_every": 4}, lambda s: s.initial_runs["1"].extra == {"checkpoint_every": 4}),
    ("best", {"note": "x"}, lambda s: s.best.extra == {"note": "x"}),
])
def test_unknown_keys_are_kept(where, change, read):
    data = json.loads(json.dumps(WRITTEN))
    {"top": data, "initial run": data["initial_runs"]["1"], "best": data["best"]}[where].update(change)
    state = PipelineState.from_dict(data)
    assert read(state)
    assert state.to_dict() == data


def test_an_entry_from_before_the_honesty_fields_reads_them_as_none():
    data = json.loads(json.dumps(WRITTEN))
    for key in ("return_moments", "val_baselines", "device", "versions"):
        del data["initial_runs"]["1"][key]
    run = PipelineState.from_dict(data).initial_runs["1"]
    assert (run.return_moments, run.val_baselines, run.device, run.versions) == (None, None, None, None)
    assert run.val_score == 4.6


def test_a_null_stop_reason_reads_as_still_running_and_is_left_out():
    # the pipeline wrote "stop_reason": null after an iteration that did not stop it
    data = dict(json.loads(json.dumps(WRITTEN)), stop_reason=None)
    state = PipelineState.from_dict(data)
    assert state.stop_reason is None
    assert "stop_reason" not in state.to_dict()
    state.stop_reason = "patience"
    assert state.to_dict()["stop_reason"] == "patience"
