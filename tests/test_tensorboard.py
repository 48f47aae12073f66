"""TensorBoard: a run's event file holds the numbers the run reported, and travels with the run's files.

A real (tiny) `nexlify worker train` runs in-process on the bundled candles into a folder; its event file
is read back with nexlify.tb's TFRecord reader and compared with what the training loop handed to its
on_round callback and with the run's result.json. The Q statistics are checked on a hand-made table."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from controller import worker
from nexlify.agent.dqn import NEG_INF
from nexlify.agent.stats import TrainingStats
from nexlify.tb import EVENTS_FILE, RunBoard, read_records, read_scalars
from tests.helpers_market import one_torch_thread  # noqa: F401  (autouse fixture)

TINY = {"pairs": ["BTC/USDT"], "start": "2025-01-01", "end": "2025-06-01", "val_days": 20, "test_days": 10,
        "num_envs": 2, "episode_bars": 200, "learning_starts": 64, "batch_size": 32, "strategies": ["spot"],
        "device": "cpu", "algorithm": "dqn"}  # the Q-learner: its rounds and gradient steps make the curves


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run_1"
    rounds: list[dict] = []
    original = worker._Progress.round

    def record(self, info):
        rounds.append(dict(info))
        original(self, info)

    worker._Progress.round = record
    try:
        assert worker.run_worker(run_key="init-1", seed=7, episodes=4, out_url=str(out), overrides=dict(TINY),
                                 checkpoint_every=0) == 0
    finally:
        worker._Progress.round = original
    files = sorted(glob.glob(str(out / "*tfevents*")))
    result = json.loads((out / "result.json").read_text())
    return {"rounds": rounds, "files": files, "result": result,
            "scalars": read_scalars([open(f, "rb").read() for f in files])}


def approx32(x: float):
    return pytest.approx(x, rel=1e-6, abs=1e-12)  # TensorBoard keeps float32


def test_the_event_file_lands_in_the_run_folder_beside_result_json(run):
    assert [os.path.basename(f) for f in run["files"]] == [EVENTS_FILE]
    assert len(run["rounds"]) == 2  # 4 episodes, 2 at a time


def test_episode_returns_are_the_loops_returns(run):
    got = run["scalars"]["train/episode_return"]
    want = [r for info in run["rounds"] for r in info["returns"]]
    assert [step for step, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == [approx32(x) for x in want]
    assert len(set(want)) > 1  # real, different episodes


@pytest.mark.parametrize("tag, key", [("train/round_return", "mean_return"), ("train/epsilon", "epsilon"),
                                      ("train/loss", "loss"), ("q/mean_max", "q_max_mean"),
                                      ("q/best_gap", "q_gap_mean"), ("checks/finite_share", "finite_share")])
def test_round_scalars_are_the_loops_numbers(run, tag, key):
    want = [(info["episodes_done"], info[key]) for info in run["rounds"] if info[key] is not None]
    assert want, f"the loop reported no {key}"
    assert [s for s, _ in run["scalars"][tag]] == [s for s, _ in want]
    assert [v for _, v in run["scalars"][tag]] == [approx32(v) for _, v in want]


def test_the_round_mean_is_the_mean_of_its_episodes(run):
    for info in run["rounds"]:
        assert info["mean_return"] == pytest.approx(sum(info["returns"]) / len(info["returns"]))
    assert run["rounds"][-1]["finite_share"] == 1.0 and run["rounds"][-1]["loss"] > 0


@pytest.mark.parametrize("prefix, key", [("val", "val_metrics"), ("test", "test_metrics")])
def test_validation_and_test_metrics_are_the_results(run, prefix, key):
    metrics = run["result"][key]
    for name in ("avg_return", "avg_sharpe", "avg_drawdown", "avg_win_rate", "score"):
        assert run["scalars"][f"{prefix}/{name}"] == [(4, approx32(metrics[name]))]


def test_q_statistics_by_hand():
    stats = TrainingStats(torch.device("cpu"))
    q = torch.tensor([[1.0, 3.0, 2.5, 9.0], [0.5, -1.0, 7.0, 0.0], [4.0, 8.0, 8.0, 1.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    stats.add_q(torch.where(mask, q, NEG_INF), mask)
    stats.add_loss(torch.tensor(0.25))
    stats.add_loss(torch.tensor(float("nan")))
    stats.add_reward(torch.tensor([0.1, float("inf"), 0.2, 0.3]))
    got = stats.take()
    # max over valid: 3.0, 0.5 (only hold is valid), 8.0 -> mean 11.5 / 3
    assert got["q_max_mean"] == pytest.approx(11.5 / 3)
    # gaps where two actions are valid: 3.0 - 2.5 and 8.0 - 8.0 (a tie) -> 0.25
    assert got["q_gap_mean"] == pytest.approx(0.25)
    assert got["loss"] == pytest.approx(0.25)  # the mean of the finite losses
    assert got["finite_share"] == pytest.approx((1 + 3) / (2 + 4))
    assert stats.take()["q_max_mean"] is None  # started over


def test_a_damaged_event_file_is_refused(run):
    blob = bytearray(open(run["files"][0], "rb").read())
    assert len(read_records(bytes(blob))) > 10
    blob[40] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        read_records(bytes(blob))


def test_a_resumed_runs_events_follow_the_ones_in_its_checkpoint(tmp_path):
    first = RunBoard(str(tmp_path / "a"))
    first.round({"episodes_done": 2, "returns": [1.0, 2.0], "epsilon": 0.5, "mean_return": 1.5})
    carried = first.blob()  # what the resume checkpoint holds
    second = RunBoard(str(tmp_path / "b"), carried)
    second.round({"episodes_done": 4, "returns": [3.0, -1.0], "epsilon": 0.25, "mean_return": 1.0})
    second.close()
    got = read_scalars([second.blob()])
    assert got["train/episode_return"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, -1.0)]
    assert got["train/epsilon"] == [(2, 0.5), (4, 0.25)]
