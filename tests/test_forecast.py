"""The forecast learner (nexlify.agent.forecast): its labels, its scores and the greedy rule on them, early
stopping and the refit, and one training run on the bundled candles through nexlify.training.train_run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from nexlify import checkpoint
from nexlify.agent import build_model, forecast_units
from nexlify.agent.dqn import DuelingQNet
from nexlify.agent.forecast import NEVER, ForecastAgent, ForecastNet, forward_log_returns, gain_t_stat
from nexlify.config import TrainConfig
from nexlify.configtools import to_dict
from nexlify.env.layout import CLOSE, HOLD, LEND, N_ACTIONS, OPEN_LONG
from nexlify.errors import InputError
from nexlify.evaluation import hold_unless_margin
from nexlify.training import prepare_data, train_run
from tests.helpers_market import one_torch_thread  # noqa: F401 (fixture)
from tests.pipeline_support import run_cli, train_args


def test_labels_are_the_return_from_the_next_open_over_the_horizon():
    open_ = np.array([[10.0], [11.0], [12.0], [13.0], [14.0]])
    close = np.array([[10.5], [11.5], [12.5], [13.5], [14.5]])
    y = forward_log_returns(open_, close, 2)
    # bar 0: filled at open[1] = 11, marked at close[2] = 12.5; bar 2: open[3] = 13 to close[4] = 14.5
    assert y[0, 0] == pytest.approx(math.log(12.5 / 11.0))
    assert y[1, 0] == pytest.approx(math.log(13.5 / 12.0))
    assert y[2, 0] == pytest.approx(math.log(14.5 / 13.0))
    assert np.isnan(y[3:, 0]).all()  # their horizon is past the series
    assert np.isnan(forward_log_returns(open_, close, 5)).all()


def _net_forecasting(values: list[float]) -> ForecastNet:
    """A ForecastNet on one feature whose forecast is the feature itself (for x >= 0, through the ReLUs)."""
    net = ForecastNet(1, 8)
    with torch.no_grad():
        for layer in net.members[0][0::2]:  # the three Linear layers
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[0, 0] = 1.0
    net.requires_grad_(False)
    assert torch.equal(net.forecast(torch.tensor(values).unsqueeze(-1)), torch.tensor(values))
    return net


@pytest.mark.parametrize("forecast, in_position, margin, expected", [
    (0.03, False, 0.02, OPEN_LONG),  # beats hold by more than the margin: enter
    (0.015, False, 0.02, HOLD),      # a gain inside the margin: stay out
    (0.015, False, 0.0, OPEN_LONG),  # margin 0 is the plain argmax
    (0.0, False, 0.0, HOLD),         # a tie with hold holds (argmax takes the first, hold)
    (0.03, True, 0.02, HOLD),        # in a position (no entry allowed) a gain keeps it
    (0.015, True, 0.02, HOLD),       # a small gain or loss inside the band keeps it
])
def test_scores_trade_the_forecast_with_a_band(forecast, in_position, margin, expected):
    net = _net_forecasting([forecast])
    obs = torch.tensor([[forecast, 123.0, -4.0]])  # the slot's state after the market feature is never read
    scores = net(obs)
    assert scores.shape == (1, N_ACTIONS)
    assert scores[0, HOLD] == 0.0 and scores[0, OPEN_LONG] == pytest.approx(forecast)
    assert scores[0, CLOSE] == pytest.approx(-forecast) and scores[0, LEND] == NEVER
    mask = torch.zeros((1, N_ACTIONS), dtype=torch.bool)
    mask[0, HOLD] = mask[0, LEND] = True
    mask[0, CLOSE if in_position else OPEN_LONG] = True
    assert int(hold_unless_margin(torch.where(mask, scores, -1e9), margin)[0]) == expected


def test_a_position_closes_when_the_forecast_falls_below_minus_the_margin():
    net = _net_forecasting([0.0])
    net.members[0][-1].weight[0, 0] = -1.0  # the forecast is now minus the feature
    scores = net(torch.tensor([[0.03], [0.01]]))  # forecasts -0.03 and -0.01
    assert scores[:, OPEN_LONG].tolist() == pytest.approx([-0.03, -0.01])
    mask = torch.zeros((2, N_ACTIONS), dtype=torch.bool)
    mask[:, HOLD] = mask[:, CLOSE] = True
    assert hold_unless_margin(torch.where(mask, scores, -1e9), 0.02).tolist() == [CLOSE, HOLD]


def test_an_untrained_forecast_is_zero_and_never_trades():
    net = ForecastNet(5, 16).requires_grad_(False)
    obs = torch.linspace(-3, 3, 40).reshape(8, 5)
    assert torch.equal(net.forecast(obs), torch.zeros(8))
    assert torch.equal(hold_unless_margin(net(obs), 0.0), torch.full((8,), HOLD))


def test_the_forecast_is_the_mean_of_the_members_and_silence_zeroes_each():
    torch.manual_seed(0)
    agent = ForecastAgent(3, 8, 1e-3, torch.device("cpu"), seed=0, members=3)
    with torch.no_grad():  # give each member a different, non-zero forecast: member k forecasts (k + 1) * x0
        for k, member in enumerate(agent.model.members):
            for layer in member[0::2]:
                layer.weight.zero_()
                layer.bias.zero_()
                layer.weight[0, 0] = 1.0
            member[-1].weight[0, 0] = float(k + 1)
    x = torch.tensor([[0.5, 9.0, -9.0], [2.0, 0.0, 0.0]])
    assert torch.equal(agent.model.member_forecasts(x), torch.tensor([[0.5, 2.0], [1.0, 4.0], [1.5, 6.0]]))
    assert torch.equal(agent.model.forecast(x), torch.tensor([1.0, 4.0]))  # (1 + 2 + 3) / 3 * x0
    agent.silence()
    assert torch.equal(agent.model.forecast(x), torch.zeros(2))


def test_one_member_is_the_single_network_of_before_and_reads_its_checkpoints():
    """A one-member ForecastNet draws the same initial weights as the single network it replaced (three
    Linear layers in the same order), and a state dict in that network's layout (torso.0, torso.2, head)
    loads into it unchanged; weights of one member do not fit five."""
    torch.manual_seed(7)
    net = ForecastNet(4, 8)
    torch.manual_seed(7)
    old = {"torso.0": nn.Linear(4, 8), "torso.2": nn.Linear(8, 8), "head": nn.Linear(8, 1)}
    assert torch.equal(net.members[0][0].weight, old["torso.0"].weight)
    assert torch.equal(net.members[0][2].bias, old["torso.2"].bias)
    layout = {f"{name}.{p}": t for name, layer in old.items() for p, t in layer.state_dict().items()}
    loaded = ForecastNet(4, 8)
    loaded.load_state_dict(layout)
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    expected = old["head"](torch.relu(old["torso.2"](torch.relu(old["torso.0"](x))))).squeeze(-1)
    assert torch.allclose(loaded.forecast(x), expected, atol=0, rtol=0)
    stored = to_dict(TrainConfig())
    del stored["agent"]["forecast_members"]  # a forecast checkpoint from before the ensemble
    cfg = checkpoint.train_config({"config": stored}, "old.pt")
    assert cfg.agent.forecast_members == 1
    cfg.agent.hidden = 8
    assert torch.equal(build_model(cfg.agent, 4, layout).forecast(x), loaded.forecast(x))
    cfg.agent.forecast_members = 5
    with pytest.raises(InputError, match=r"network \(5 members\) of 8 hidden units on 4 features"):
        build_model(cfg.agent, 4, layout)


def _rows(label) -> tuple[torch.Tensor, torch.Tensor]:
    """Features: the bundled BTC/USDT closes' hourly log returns over 2024 (scaled to unit size), and labels
    made from them by `label` (a known rule, so the fit has a right answer)."""
    cfg = TrainConfig()
    cfg.data.pairs = ["BTC/USDT"]
    cfg.data.start, cfg.data.end = "2024-01-01", "2024-07-01"
    market, _ = prepare_data(cfg)
    r = np.diff(np.log(market.close[:, 0]))
    x = torch.tensor(r / r.std(), dtype=torch.float32).unsqueeze(-1)
    return x, label(x[:, 0])


def _split(x, y, n_fit):
    return x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:], x, y


def test_no_step_beats_a_zero_label_so_the_fit_keeps_its_zero_start():
    x, y = _rows(torch.zeros_like)
    agent = ForecastAgent(1, 8, 5e-3, torch.device("cpu"), seed=0)
    fit = agent.train(*_split(x, y, 3000), batch_size=64, eval_every=10, patience=3, max_steps=200)
    # step 0 forecasts 0 and its loss is exactly 0; training only moves away from it
    assert (fit.best_step, fit.steps, fit.holdout_loss, fit.holdout_loss_zero) == (0, 0, 0.0, 0.0)
    assert agent.grad_steps == 0
    assert torch.equal(agent.model.forecast(x), torch.zeros(len(x)))


def test_early_stopping_then_a_refit_on_every_row():
    x, y = _rows(lambda v: 0.05 * v)  # a label the network can learn exactly
    torch.manual_seed(0)  # the initial weights (train_run's seeding block does this)
    agent = ForecastAgent(1, 8, 5e-3, torch.device("cpu"), seed=0)
    fit = agent.train(*_split(x, y, 3000), batch_size=64, eval_every=10, patience=3, max_steps=300)
    assert fit.best_step > 0 and fit.holdout_loss < fit.holdout_loss_zero / 4
    assert (fit.rows_fit, fit.rows_holdout) == (3000, len(x) - 3000)
    # the refit trains for the best step count scaled by the rows: the same passes over the data
    assert fit.steps == round(fit.best_step * len(x) / 3000) == agent.grad_steps
    # deterministic: the same seed gives the same weights
    torch.manual_seed(0)
    again = ForecastAgent(1, 8, 5e-3, torch.device("cpu"), seed=0)
    again.train(*_split(x, y, 3000), batch_size=64, eval_every=10, patience=3, max_steps=300)
    assert all(torch.equal(a, b) for a, b in zip(agent.model.state_dict().values(),
                                                  again.model.state_dict().values()))


def test_the_fit_reports_its_steps_and_a_refit_in_pieces_is_the_same_refit():
    x, y = _rows(lambda v: 0.05 * v)
    torch.manual_seed(0)
    agent = ForecastAgent(1, 8, 5e-3, torch.device("cpu"), seed=0)
    heard: list[tuple[int, int]] = []
    fit = agent.train(*_split(x, y, 3000), batch_size=64, eval_every=10, patience=3, max_steps=300,
                      on_progress=lambda done, total: heard.append((done, total)))
    # early stopping: after each measurement, the steps so far of the most the fit can take (300, then the refit
    # of 300 steps scaled by the rows); then the refit every 10 steps, of the steps it will have taken
    stopped = min(300, fit.best_step + 3 * 10)
    most = 300 + round(300 * len(x) / 3000)
    refit = [(stopped + min(d + 10, fit.steps), stopped + fit.steps) for d in range(0, fit.steps, 10)]
    assert heard == [(s, most) for s in range(10, stopped + 1, 10)] + refit
    assert heard[-1] == (stopped + fit.steps,) * 2
    # the refit's steps taken in pieces are the steps taken in one call: the same draws, the same weights
    one, pieces = (ForecastAgent(1, 8, 5e-3, torch.device("cpu"), seed=0) for _ in range(2))
    pieces.model.load_state_dict(one.model.state_dict())
    one._steps(x, y, 25, 64)
    for n in (10, 10, 5):
        pieces._steps(x, y, n, 64)
    assert all(torch.equal(a, b) for a, b in zip(one.model.state_dict().values(), pieces.model.state_dict().values()))


def test_a_preemption_during_the_refit_stops_the_fit():
    """should_stop is asked between the refit's pieces too: a preemption there ends the fit (the worker saves
    nothing and the run starts over), not after the whole refit."""
    x, y = _rows(lambda v: 0.05 * v)
    torch.manual_seed(0)
    agent = ForecastAgent(1, 8, 5e-3, torch.device("cpu"), seed=0)
    heard: list[tuple[int, int]] = []
    in_refit = lambda: bool(heard) and heard[-1][1] != 300 + round(300 * len(x) / 3000)  # noqa: E731
    with pytest.raises(InterruptedError):
        agent.train(*_split(x, y, 3000), batch_size=64, eval_every=10, patience=3, max_steps=300,
                    should_stop=in_refit, on_progress=lambda done, total: heard.append((done, total)))
    refit = [h for h in heard if h[1] != 300 + round(300 * len(x) / 3000)]
    assert len(refit) == 1  # one piece of the refit, then the question, then the stop


def _config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.pairs = ["BTC/USDT", "ETH/USDT"]
    cfg.data.start, cfg.data.end, cfg.data.val_days = "2024-06-01", "2025-06-01", 60
    cfg.agent.algorithm = "forecast"
    cfg.agent.forecast_holdout_days = 60
    cfg.agent.forecast_min_t = 0.0  # trade whatever it fits (the gate: its own test below)
    cfg.device = "cpu"
    return cfg


def test_a_forecast_run_on_the_bundled_candles_round_trips_through_a_checkpoint(tmp_path):
    cfg = _config()
    market, windows = prepare_data(cfg)
    out = train_run(cfg, market, windows, seed=3, episodes=8)
    fit = out.agent.fit
    assert type(out.agent.model) is ForecastNet and out.timings["env_steps"] == 0 and out.episodes_trained == 0
    assert fit.steps == out.agent.grad_steps and fit.holdout_loss <= fit.holdout_loss_zero
    assert math.isfinite(out.val_metrics["avg_return"]) and math.isfinite(out.train_return)
    assert out.agent.model.forecast(torch.zeros(1, out.agent.model.n_features)).isfinite().all()
    # labels in the learner's units: percent of equity at the fixed 5 % size
    assert forecast_units(cfg.agent, cfg.risk) == 100 * 0.05
    # the checkpoint rebuilds the same network by its config, and reads as forecast
    ckpt = checkpoint.build_checkpoint(out.agent.state_dict(), config=to_dict(cfg), normalizer=out.normalizer.to_dict(),
                                       episodes_trained=out.episodes_trained, seed=3, metrics=out.val_metrics)
    checkpoint.save(ckpt, tmp_path / "m.pt")
    loaded = checkpoint.load(tmp_path / "m.pt")
    cfg2 = checkpoint.train_config(loaded, "m.pt")
    assert cfg2.agent.algorithm == "forecast"
    model = build_model(cfg2.agent, out.agent.model.n_features)
    model.load_state_dict(loaded["model_state_dict"])
    obs = torch.linspace(-2, 2, 3 * model.n_features).reshape(3, -1)
    assert torch.equal(model(obs), out.agent.model(obs))
    # the same seed, data and config: the same weights and the same validation
    again = train_run(cfg, market, windows, seed=3, episodes=8)
    assert again.val_metrics["avg_return"] == out.val_metrics["avg_return"]
    assert all(torch.equal(a, b) for a, b in zip(again.agent.model.state_dict().values(),
                                                  out.agent.model.state_dict().values()))
    # a retraining run given this model (`init`) fits afresh from its own seed: its weights are a fresh seed-4
    # fit's, never a continuation of a model that has seen the holdout (which would make the gate in-sample)
    init = {**out.agent.state_dict(), "normalizer": out.normalizer.to_dict()}
    retrained = train_run(cfg, market, windows, seed=4, episodes=8, init=init)
    fresh = train_run(cfg, market, windows, seed=4, episodes=8)
    assert retrained.agent.fit.holdout_t == fresh.agent.fit.holdout_t
    assert all(torch.equal(a, b) for a, b in zip(retrained.agent.model.state_dict().values(),
                                                  fresh.agent.model.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(retrained.agent.model.state_dict().values(),
                                                      out.agent.model.state_dict().values()))


def test_a_fit_short_of_the_t_threshold_is_silenced_and_holds_cash_lent():
    cfg = _config()
    cfg.agent.forecast_min_t = 100.0  # no fit shows that much
    market, windows = prepare_data(cfg)
    out = train_run(cfg, market, windows, seed=3, episodes=8)
    assert out.agent.fit.silenced and out.agent.fit.holdout_t < 100.0
    assert torch.equal(out.agent.model.forecast(torch.ones(4, out.agent.model.n_features)), torch.zeros(4))
    assert out.val_metrics["total_trades"] == 0
    assert out.val_metrics["avg_return"] == pytest.approx(out.val_baselines["cash_plus_lending"]["avg_return"],
                                                          abs=1e-9)


@pytest.mark.parametrize("gain, lag, expected", [
    ([1.0, 3.0], 0, 2.0 / math.sqrt(1.0 / 2)),  # mean 2, variance 1, n 2
    # mean 2.5, variance 1.25, lag-1 autocovariance 1.25 / 4 at Bartlett weight 1/2: 1.5625; 2.5 / sqrt(1.5625 / 4)
    ([1.0, 2.0, 3.0, 4.0], 1, 4.0),
    ([0.0, 0.0, 0.0], 2, 0.0),  # no spread (a forecast of zero): no evidence
    ([-1.0, -3.0], 0, -2.0 / math.sqrt(1.0 / 2)),  # a loss is a negative t
])
def test_gain_t_stat_by_hand(gain, lag, expected):
    assert gain_t_stat(np.array(gain), lag) == pytest.approx(expected)


def test_a_checkpoint_from_before_the_algorithm_setting_reads_as_dqn():
    stored = to_dict(TrainConfig())
    del stored["agent"]["algorithm"]
    cfg = checkpoint.train_config({"config": stored}, "old.pt")
    assert cfg.agent.algorithm == "dqn"
    assert type(build_model(cfg.agent, 4)) is DuelingQNet


def test_weights_of_the_other_learner_are_a_clear_input_error():
    cfg = TrainConfig()
    cfg.agent.algorithm = "dqn"
    q_weights = build_model(cfg.agent, 4).state_dict()
    cfg.agent.algorithm = "forecast"
    with pytest.raises(InputError, match=r"do not fit a forecast network \(5 members\) of 64 hidden units on 4 features"):
        build_model(cfg.agent, 4, q_weights)


def test_a_pipeline_with_the_forecast_learner_runs_end_to_end(tmp_path):
    """`nexlify train` with the forecast learner on the tests' small pipeline (one pair, seven months): every
    run records its fit, runs no episodes, is silenced exactly when its holdout t falls short, and the
    pipeline writes its summary, verdict and report."""
    out = tmp_path / "out"
    proc = run_cli(train_args(str(out), "--algorithm", "forecast"))  # the last flag wins over the preset's dqn
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "complete_training_summary.json").read_text())
    assert summary["config"]["agent"]["algorithm"] == "forecast"
    min_t = summary["config"]["agent"]["forecast_min_t"]
    folders = [f"initial_runs/run_{r['run_id']}" for r in summary["initial_runs"]]
    folders += [f"retraining/iteration_{it['iteration']}" for it in summary["retraining_iterations"]]
    for folder in folders:
        result = json.loads((out / folder / "result.json").read_text())
        fit = result["forecast_fit"]
        assert result["episodes_trained"] == 0 and result["timings"]["env_steps"] == 0
        assert fit["silenced"] == (fit["holdout_t"] < min_t)
        if fit["silenced"]:  # holds cash, lent: no trades on validation
            assert result["val_metrics"]["total_trades"] == 0
    # retraining fits afresh from its own seed: no iteration continues from a model
    state = json.loads((out / "pipeline_state.json").read_text())
    assert state["retraining"] and all(it["continued_from"] is None for it in state["retraining"])
    assert summary["verdict"]["text"].startswith("Verdict")
    assert (out / "report.html").stat().st_size > 0
