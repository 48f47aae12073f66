"""`nexlify evaluate` (nexlify.evaluate_cmd.evaluate_checkpoint) on a checkpoint written here: its window
rules and the baselines it reports beside the agent. Bundled candles only."""

from __future__ import annotations

import shutil

import pytest

from nexlify import baselines as bl
from nexlify.config import TrainConfig
from nexlify.data.candles import bundled_dir
from nexlify.errors import InputError
from nexlify.evaluate_cmd import evaluate_checkpoint, render_table
from tests.helpers_market import one_torch_thread, write_untrained_model  # noqa: F401 (fixture)


def write_model(folder, pairs: list[str]) -> str:
    return write_untrained_model(folder, pairs)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return write_model(tmp_path_factory.mktemp("ckpt"), ["BTC/USDT"])


def test_start_without_end_runs_to_the_end_of_the_data(model_path):
    report = evaluate_checkpoint(model_path, start="2025-05-25")
    # to the last bundled candle (2025-05-31 23:00), not to the checkpoint's data end (2025-04-01)
    assert report["window"] == {"start": "2025-05-25T00:00:00Z", "end": "2025-06-01T00:00:00Z", "bars": 7 * 24}
    assert set(report["baselines"]) == set(bl.BASELINES)
    assert "switched on" in report["baseline_notes"][bl.CASH_PLUS_LENDING]  # the checkpoint trades spot only
    table = render_table(report)
    for name in ("agent",) + bl.BASELINES:
        assert f"\n{name} " in table


def test_start_and_end_and_the_default_window(model_path):
    report = evaluate_checkpoint(model_path, start="2025-05-25", end="2025-05-28", record=True)
    assert report["window"] == {"start": "2025-05-25T00:00:00Z", "end": "2025-05-28T00:00:00Z", "bars": 3 * 24}
    curve = report["curves"][bl.BUY_AND_HOLD_FULL]["equity"]["BTC/USDT"]
    assert len(curve) == 3 * 24 + 1 and len(report["curves"]["bar_ms"]) == 3 * 24 + 1
    # neither: the checkpoint's validation window, its last val_days before its data end
    report = evaluate_checkpoint(model_path)
    assert report["window"] == {"start": "2025-03-22T00:00:00Z", "end": "2025-04-01T00:00:00Z", "bars": 10 * 24}
    assert "curves" not in report


def test_start_after_the_data_is_refused(model_path):
    with pytest.raises(InputError, match="after the data.s last candle"):
        evaluate_checkpoint(model_path, start="2025-06-03")  # its warm-up days hold candles, the window none


@pytest.mark.parametrize("start", ["2025-07-01", "2030-01-01", "2025-06-03"])
def test_a_start_beyond_the_data_names_the_date_typed_and_the_datas_range(model_path, start):
    with pytest.raises(InputError) as err:
        evaluate_checkpoint(model_path, start=start)
    message = str(err.value)
    assert f"--start {start}" in message and "\n" not in message
    assert "2025-05-31T23:00:00Z" in message  # the data's last candle (bundled: 2023-06-01 .. 2025-05-31 23:00)
    assert "2025-06-2" not in message and "2029-12-" not in message  # never the warm-up's start, an internal date


def test_the_verdict_of_one_model_evaluated(model_path):
    from nexlify.evaluate_cmd import render_table
    from nexlify.verdict import verdict

    got = evaluate_checkpoint(model_path, start="2025-05-01", end="2025-05-15")
    a, lending = got["agent"], got["baselines"]["cash_plus_lending"]
    excess = a["excess_return_moments"]
    assert got["verdict"] == pytest.approx(verdict(a["avg_return"], lending["avg_return"], excess, [excess["sharpe"]],
                                                   window=f"{got['window']['start']} .. {got['window']['end']}"))
    assert got["verdict"]["beats_cash_plus_lending"] == (a["avg_return"] > lending["avg_return"])
    assert got["verdict"]["models_tried"] == 1
    assert render_table(got).splitlines()[-1] == got["verdict"]["text"]


def test_the_hold_margin_is_the_checkpoints_unless_given(model_path):
    window = {"start": "2025-05-01", "end": "2025-05-15"}
    own = evaluate_checkpoint(model_path, **window)
    assert own["hold_margin"] == TrainConfig().agent.hold_margin  # stored in the checkpoint's config
    plain = evaluate_checkpoint(model_path, hold_margin=0.0, **window)
    never = evaluate_checkpoint(model_path, hold_margin=1e6, **window)
    assert plain["hold_margin"] == 0.0 and plain["agent"]["total_trades"] > 0  # the untrained net trades
    # a margin no Q-gap reaches: hold on every bar, spot only and lending off: the flat book
    assert never["agent"]["total_trades"] == 0
    assert never["agent"]["per_pair"] == never["baselines"][bl.FLAT]["per_pair"]
    with pytest.raises(InputError, match=r"--hold-margin: -0.5 is out of range; accepted: a number in \[0.0, "):
        evaluate_checkpoint(model_path, hold_margin=-0.5, **window)


def test_other_pairs_see_the_market_of_the_training_pairs(tmp_path):
    # a model of BTC and ETH evaluated on ETH alone: each pair trades its own book, so ETH's numbers are exactly
    # its row of the evaluation on both, because its market features still come from BTC and ETH (computed
    # over ETH alone they differ, and so would every number)
    path = write_model(tmp_path, ["BTC/USDT", "ETH/USDT"])
    window = {"start": "2025-05-01", "end": "2025-05-15", "hold_margin": 0.0}
    both = evaluate_checkpoint(path, **window)
    alone = evaluate_checkpoint(path, pairs=["eth-usdt"], **window)  # any spelling load_market takes
    assert both["agent"]["per_pair"]["ETH/USDT"]["trades"] > 0  # the untrained net acts: the comparison means something
    assert alone["agent"]["per_pair"] == {"ETH/USDT": both["agent"]["per_pair"]["ETH/USDT"]}
    # ETH with SOL: SOL's candles are read for its book, BTC's beside for the market; ETH's row unchanged
    mixed = evaluate_checkpoint(path, pairs=["SOL/USDT", "ETH/USDT"], **window)
    assert mixed["agent"]["per_pair"]["ETH/USDT"] == both["agent"]["per_pair"]["ETH/USDT"]
    # without the training pairs' candles the evaluation cannot build them: one line says which are needed
    only_eth = tmp_path / "candles"
    only_eth.mkdir()
    shutil.copy(bundled_dir() / "binance_ETH-USDT_1h.csv.gz", only_eth)
    with pytest.raises(InputError, match=r"^the model's market features are computed over the pairs it was trained "
                                         r"on \(BTC/USDT ETH/USDT\), whose candles are needed beside --pairs: no "
                                         r"candles for BTC/USDT"):
        evaluate_checkpoint(path, pairs=["ETH/USDT"], data_dir=str(only_eth), **window)
