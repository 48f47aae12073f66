"""Metrics and the score (nexlify.metrics) with hand numbers, and the config tree (nexlify.config,
nexlify.configtools): flags and YAML map onto the same fields, and bad input is an InputError that names
the flag and what is accepted."""

from __future__ import annotations

import argparse
import math

import jsonschema
import numpy as np
import pytest

from controller.config import PipelineConfig
from nexlify.cli import build_config
from nexlify.config import TrainConfig
from nexlify.configtools import add_flags, flags_to_mapping, from_dict, json_schema, load_yaml, to_dict
from nexlify.env.batched import HOLD, OPEN_LONG
from nexlify.errors import InputError
from nexlify.metrics import HOURS_PER_YEAR, average_metrics, pair_metrics, score, sharpe_from_sums, sharpe_vs_lending
from tests.helpers_market import actions, costless_env, flat, make_env, make_market, quiet_risk

# ============================================================================================ score


@pytest.mark.parametrize("ret, sharpe, win_rate, drawdown, expected", [
    (10.0, 1.5, 0.6, 20.0, 18.5),        # 4 + 4.5 + 12 - 2
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (-5.0, -0.5, 0.25, 12.0, 0.3),       # -2 - 1.5 + 5 - 1.2
    (0.0, 0.0, 0.0, 50.0, -5.0),         # drawdown alone lowers the score
    (100.0, 2.0, 1.0, 0.0, 66.0),        # 40 + 6 + 20
])
def test_score_formula(ret, sharpe, win_rate, drawdown, expected):
    assert score(ret, sharpe, win_rate, drawdown) == pytest.approx(expected)


def test_more_drawdown_lowers_the_score():
    assert score(10, 1.5, 0.6, 30) < score(10, 1.5, 0.6, 20)
    assert score(10, 1.5, 0.6, 30) - score(10, 1.5, 0.6, 20) == pytest.approx(-1.0)


# =========================================================================================== sharpe


@pytest.mark.parametrize("seed, n", [(0, 2), (1, 10), (2, 500), (3, 5000)])
def test_sharpe_from_sums_equals_numpy(seed, n):
    r = np.random.default_rng(seed).normal(0.0002, 0.01, size=n)
    expected = r.mean() / r.std(ddof=1) * math.sqrt(8760)
    assert HOURS_PER_YEAR == 8760
    assert sharpe_from_sums(float(r.sum()), float((r ** 2).sum()), n) == pytest.approx(expected, rel=1e-7)


def test_sharpe_hand_numbers():
    """Returns 0.01, 0.03: mean 0.02, sample std sqrt(2 * 0.01^2 / 1) = 0.0141421..."""
    expected = 0.02 / math.sqrt(0.0002) * math.sqrt(8760)
    assert sharpe_from_sums(0.04, 0.01 ** 2 + 0.03 ** 2, 2) == pytest.approx(expected)


@pytest.mark.parametrize("ret_sum, ret_sq_sum, n", [(0.01, 0.0001, 1), (0.0, 0.0, 0), (0.05, 5 * 0.01 ** 2, 5)])
def test_sharpe_undefined_is_zero(ret_sum, ret_sq_sum, n):
    """Fewer than 2 returns, or constant returns (no variation): 0, not inf or NaN."""
    assert sharpe_from_sums(ret_sum, ret_sq_sum, n) == 0.0


# ================================================================================ pair metrics


def test_pair_metrics_on_a_known_equity_path():
    """Equity 100 -> 110 -> 99 -> 121: returns +10%, -10%, +2/9; total +21%; worst drawdown 110 -> 99 = 10%."""
    path = np.array([100.0, 110.0, 99.0, 121.0])
    r = path[1:] / path[:-1] - 1
    m = pair_metrics(121.0, 100.0, float(r.sum()), float((r ** 2).sum()), 3, 0.10, trades=3, wins=2)
    assert m["total_return"] == pytest.approx(21.0)
    assert m["sharpe"] == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(8760))
    assert m["max_drawdown"] == pytest.approx(10.0)
    assert m["win_rate"] == pytest.approx(2 / 3)
    assert m["trades"] == 3


def test_pair_metrics_without_trades():
    m = pair_metrics(100.0, 100.0, 0.0, 0.0, 10, 0.0, trades=0, wins=0)
    assert m == {"total_return": 0.0, "sharpe": 0.0, "max_drawdown": 0.0, "win_rate": 0.0, "trades": 0}


def test_pair_metrics_from_the_environment_statistics():
    """A costless hand path: 50 units bought at 100, closes 110, 90, 120, 100 -> equity 10,500, 9,500,
    11,000, 10,000. Max drawdown 1 - 9500/10500; total return 0; Sharpe of the 4 returns by numpy."""
    market = make_market([flat(100), (100, 110, 100, 110), flat(90), flat(120), flat(100), flat(100)])
    env = make_env(market, quiet_risk(), costless_env(strategies=["spot"]))  # no sweep: no interest on the cash
    path = [env.equity.item()]
    for a in (OPEN_LONG, HOLD, HOLD, HOLD):
        env.step(actions(a))
        path.append(env.equity.item())
    assert path == [10_000.0, 10_500.0, 9_500.0, 11_000.0, 10_000.0]
    st = env.stats
    m = pair_metrics(float(st.equity[0]), st.initial_equity, float(st.ret_sum[0]), float(st.ret_sq_sum[0]),
                     st.n_returns, float(st.max_drawdown[0]), int(st.trades[0]), int(st.wins[0]))
    p = np.array(path)
    r = p[1:] / p[:-1] - 1
    assert m["total_return"] == pytest.approx(0.0, abs=1e-12)
    assert m["max_drawdown"] == pytest.approx((1 - 9500 / 10500) * 100)
    assert m["sharpe"] == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(8760), rel=1e-9)
    assert m["trades"] == 0 and m["win_rate"] == 0.0  # still open: no closed trade yet


def test_average_metrics():
    per_pair = {
        "A": {"total_return": 10.0, "sharpe": 1.0, "max_drawdown": 20.0, "win_rate": 0.5, "trades": 4},
        "B": {"total_return": -4.0, "sharpe": 2.0, "max_drawdown": 10.0, "win_rate": 0.7, "trades": 6},
    }
    avg = average_metrics(per_pair)
    assert (avg["avg_return"], avg["avg_sharpe"], avg["avg_drawdown"]) == (3.0, 1.5, 15.0)
    assert avg["avg_win_rate"] == pytest.approx(0.6)
    assert avg["total_trades"] == 10
    assert avg["score"] == pytest.approx(3 * 0.4 + 1.5 * 3 + 0.6 * 20 - 15 * 0.1)  # 16.2
    assert avg["per_pair"] is per_pair


# ============================================================================================ config


def parse_flags(argv: list[str], cls: type = TrainConfig) -> dict:
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    return flags_to_mapping(parser.parse_args(argv), cls)


def resolve(argv: list[str] = (), yaml_text: str | None = None, cls: type = TrainConfig):
    """defaults < YAML file < flags, validated: what the CLI does."""
    file_mapping = load_yaml(yaml_text, "config file") if yaml_text else None
    return build_config(cls, file_mapping, None, parse_flags(list(argv), cls))


def test_defaults_are_the_documented_ones():
    cfg = resolve()
    assert (cfg.risk.stop_loss, cfg.risk.take_profit, cfg.risk.trailing_stop) == (0.02, 0.05, 0.03)
    assert (cfg.risk.max_position, cfg.risk.max_trades, cfg.risk.daily_loss_limit) == (0.05, 3, 0.05)
    assert (cfg.env.fee, cfg.env.slippage_bps) == (0.001, 5.0)
    assert cfg.data.pairs == ["BTC/USDT", "ETH/USDT", "SOL/USDT"]


def test_flags_map_onto_the_tree():
    cfg = resolve(["--stop-loss", "0.03", "--pairs", "BTC/USDT", "ETH/USDT", "--no-kelly", "--hidden", "32",
                   "--data-dir", "/data", "--fee", "0.002"])
    assert cfg.risk.stop_loss == 0.03 and cfg.risk.kelly is False
    assert cfg.data.pairs == ["BTC/USDT", "ETH/USDT"] and cfg.data.data_dir == "/data"
    assert cfg.agent.hidden == 32 and isinstance(cfg.agent.hidden, int)
    assert cfg.env.fee == 0.002


NESTED = """
risk:
  stop_loss: 0.03
  kelly: false
agent:
  hidden: 32
data:
  pairs: [BTC/USDT, ETH/USDT]
"""
FLAT = """
stop_loss: 0.03
kelly: false
hidden: 32
pairs: [BTC/USDT, ETH/USDT]
"""


@pytest.mark.parametrize("text", [NESTED, FLAT], ids=["nested", "flat"])
def test_yaml_nested_and_flat_give_the_same_config(text):
    cfg = resolve(yaml_text=text)
    assert to_dict(cfg) == to_dict(resolve(["--stop-loss", "0.03", "--no-kelly", "--hidden", "32",
                                            "--pairs", "BTC/USDT", "ETH/USDT"]))


def test_flags_win_over_the_file():
    cfg = resolve(["--stop-loss", "0.04"], yaml_text=NESTED)
    assert cfg.risk.stop_loss == 0.04  # the flag
    assert cfg.agent.hidden == 32  # the file, where no flag was typed
    assert cfg.risk.take_profit == 0.05  # the default


def test_to_dict_from_dict_round_trip():
    cfg = resolve(yaml_text=NESTED)
    again = from_dict(TrainConfig, to_dict(cfg))
    assert again == cfg


@pytest.mark.parametrize("argv, text, cls, must_contain", [
    (["--stop-loss", "1"], None, TrainConfig, ["--stop-loss", "1.0", "[0.0, 1.0)"]),
    (["--stop-loss", "1.5"], None, TrainConfig, ["--stop-loss", "[0.0, 1.0)"]),
    ([], "risk: {stop_loss: 1.0}", TrainConfig, ["--stop-loss", "[0.0, 1.0)"]),
    (["--stop-loss", "-0.1"], None, TrainConfig, ["--stop-loss", "[0.0, 1.0)"]),
    (["--episode-bars", "-5"], None, TrainConfig, ["--episode-bars", "-5", "[0, 10000000]"]),
    (["--initial-episodes", "-3"], None, PipelineConfig, ["--initial-episodes", "-3", "[1, 1000000]"]),
    ([], "retrain_episodes: 0", PipelineConfig, ["--retrain-episodes", "[1, 1000000]"]),
    (["--max-position", "0"], None, TrainConfig, ["--max-position", "(0.0, 1.0]"]),
    (["--device", "tpu"], None, TrainConfig, ["--device", "'tpu'", "auto, cpu, cuda"]),
    (["--kelly-min-trades", "60"], None, TrainConfig, ["--kelly-min-trades", "--kelly-window"]),
    ([], "stop_los: 0.1", TrainConfig, ["'stop_los'", "accepted", "stop_loss"]),
    ([], "risk: {stop_los: 0.1}", TrainConfig, ["'stop_los'", "stop_loss"]),
    ([], "hidden: abc", TrainConfig, ["'hidden'", "integer", "'abc'"]),
    ([], "hidden: 3.5", TrainConfig, ["'hidden'", "integer", "3.5"]),
    ([], "kelly: maybe", TrainConfig, ["'kelly'", "true/false", "'maybe'"]),
    ([], "pairs: 5", TrainConfig, ["'pairs'", "list of string"]),
    ([], "stop_loss: [0.1]", TrainConfig, ["'stop_loss'", "number"]),
    ([], "- a list", TrainConfig, ["mapping"]),
    # a wrong type typed as a flag must name the flag the user typed
    pytest.param(["--hidden", "abc"], None, TrainConfig, ["--hidden", "integer", "'abc'"], id="flag-hidden-abc"),
    pytest.param(["--fee", "lots"], None, TrainConfig, ["--fee", "number", "'lots'"], id="flag-fee-lots"),
    # every count has an upper bound (a typo never starts a run that does not end)
    (["--initial-episodes", "99999999999999999999999"], None, PipelineConfig, ["[1, 1000000]"]),
    (["--buffer-size", "1000000000"], None, TrainConfig, ["--buffer-size", "[1, 100000000]"]),
    # one value per setting in one file: flat and nested, or a key written twice, is an error
    ([], "stop_loss: 0.02\nrisk: {stop_loss: 0.03}", TrainConfig, ["'stop_loss' is set twice"]),
    ([], "risk: {stop_loss: 0.03}\nstop_loss: 0.02", TrainConfig, ["'stop_loss' is set twice"]),
    ([], "hidden: 32\nhidden: 64", TrainConfig, ["'hidden' appears twice"]),
    ([], "risk: {stop_loss: 0.02, stop_loss: 0.03}", TrainConfig, ["'stop_loss' appears twice"]),
])
def test_bad_input_is_an_input_error_naming_the_setting(argv, text, cls, must_contain):
    with pytest.raises(InputError) as info:
        resolve(argv, text, cls)
    message = str(info.value)
    for part in must_contain:
        assert part in message, f"{part!r} missing from: {message}"
    assert info.value.exit_code == 2


def test_json_schema_accepts_the_defaults_and_rejects_unknown_keys():
    schema = json_schema(TrainConfig)
    jsonschema.validate(to_dict(TrainConfig()), schema)
    jsonschema.validate({"risk": {"stop_loss": 0.1}}, schema)
    bad = [
        {"stop_los": 0.1},                      # unknown top-level key
        {"risk": {"stop_los": 0.1}},            # unknown nested key
        {"risk": {"stop_loss": 1.0}},           # exclusive maximum
        {"agent": {"hidden": "abc"}},           # wrong type
        {"device": "tpu"},                      # not a choice
        {"data": {"pairs": "BTC/USDT"}},        # not a list
    ]
    for doc in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema)


def test_pipeline_json_schema_inlines_the_training_sections():
    schema = json_schema(PipelineConfig)
    jsonschema.validate(to_dict(PipelineConfig()), schema)
    assert {"risk", "agent", "env", "data", "initial_episodes", "kubernetes"} <= set(schema["properties"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"initial_episodes": -1}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kubernetes": {"nmespace": "x"}}, schema)


def _excess_sharpe_by_hand(returns: list[float], rf: list[float]) -> float:
    xs = [r - f for r, f in zip(returns, rf)]
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return mean / std * math.sqrt(8760)


@pytest.mark.parametrize("returns, rf, expected", [
    # a trading book: (mean - rf) / std, annualised, written out
    ([0.01, -0.005, 0.002, 0.0], [1e-5] * 4, _excess_sharpe_by_hand([0.01, -0.005, 0.002, 0.0], [1e-5] * 4)),
    # rf moves the mean, not the spread: the same returns against a higher rate score lower
    ([0.01, -0.005, 0.002, 0.0], [1e-3] * 4, _excess_sharpe_by_hand([0.01, -0.005, 0.002, 0.0], [1e-3] * 4)),
    # riskless books (annualised std of the excess below 0.01 %): cash, and cash plus lending at 85 %
    ([0.0] * 5, [4.6e-6] * 5, 0.0),
    ([0.85 * 4.6e-6] * 5, [4.6e-6] * 5, 0.0),
    # cash against a rate that moves (a utilization path): the excess varies, and it is negative
    ([0.0] * 4, [1e-4, 3e-4, 2e-4, 4e-4], _excess_sharpe_by_hand([0.0] * 4, [1e-4, 3e-4, 2e-4, 4e-4])),
    ([0.01], [1e-5], 0.0),  # one return: undefined
])
def test_sharpe_vs_lending_is_the_excess_sharpe_and_zero_for_riskless_books(returns, rf, expected):
    got = sharpe_vs_lending(np.array(returns), np.array(rf))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if expected:
        assert math.isfinite(got) and (got < 0) == (expected < 0)


def test_sharpe_vs_lending_lowers_a_books_sharpe_by_the_rate_over_its_volatility():
    r = np.array([0.01, -0.005, 0.002, 0.0])
    plain = sharpe_vs_lending(r, np.zeros(4))
    assert plain == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(8760), rel=1e-12)
    assert plain - sharpe_vs_lending(r, np.full(4, 1e-3)) == pytest.approx(1e-3 / r.std(ddof=1) * math.sqrt(8760),
                                                                           rel=1e-9)
