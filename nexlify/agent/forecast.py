"""The forecast learner: a few networks forecast a pair's return over the next few bars, their forecasts
averaged (an ensemble over random starts: AgentConfig.forecast_members), and the greedy policy trades the
average with a band.

Why (docs/planted-edges.md): for an edge that persists over hours, the Q-gap open_long - hold is the value
of entering now against an hour later, about one bar of drift, and it hides in the Q-values' noise. A
forecast of the position's return over `horizon` bars, trained lightly on the training window and stopped
early on its last days, separates the bars worth holding from the rest, and a band (enter above the margin,
leave below minus the margin) trades it about as often as the edge asks.

Each network reads one slot's market features (the first `n_features` of its observation, never the slot's
or the portfolio's state), so one network serves every pair, as the Q-network does. Its forward returns
action scores in the Q-network's units, so that every reader of a policy (evaluation, the report, the
backtest, paper trading) takes its decisions by the same greedy rule with the hold margin
(nexlify.evaluation.hold_unless_margin):

    hold       0
    open_long  forecast            (the position's expected gain over the horizon)
    close      -forecast           (the loss that staying would expect)
    others     -1 (never above hold: the forecast learner trades spot; the sweep lends idle cash)

The forecast is in the learner's reward units: the log return from the next open over `horizon` bars, times
`units` = reward_scale x the fixed size (percent of equity at the size a trade opens with), so the hold
margin means what it means for the Q-network. With the defaults (margin 0.02, horizon 8) the policy enters when
it forecasts +0.4 % over eight bars, about the round trip's 0.3 % of costs, and leaves below -0.4 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nexlify.env.layout import CLOSE, HOLD, N_ACTIONS, OPEN_LONG
from nexlify.errors import NonFiniteError

NEVER = -1.0  # the score of the actions the forecast learner does not take: below hold's 0 at any margin


def _member(n_features: int, hidden: int) -> nn.Sequential:
    """One forecaster: an MLP whose last layer starts at zero, so an untrained forecast is exactly 0 (never
    trades): the fit starts from "no edge", and early stopping keeps that start when no step forecasts the
    holdout better than it."""
    net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, 1))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class ForecastNet(nn.Module):
    """`members` MLPs on a slot's market features, their forecasts averaged -> the action scores above.

    The members start from their own random weights and draw their own batches, so the average keeps what
    they agree on and cancels much of what each fitted to noise (an ensemble over initialisations)."""

    def __init__(self, n_features: int, hidden: int, members: int = 1) -> None:
        super().__init__()
        self.n_features = n_features
        self.members = nn.ModuleList(_member(n_features, hidden) for _ in range(members))

    def member_forecasts(self, features: Tensor) -> Tensor:
        """[..., n_features] -> [members, ...], each member's forecast."""
        return torch.stack([m(features).squeeze(-1) for m in self.members])

    def forecast(self, features: Tensor) -> Tensor:
        """[..., n_features] normalised market features -> [...] forecast in the learner's units (the members'
        mean)."""
        return self.member_forecasts(features).mean(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # a one-member checkpoint written before members existed named its layers torso.0, torso.2, head
        for old, new in (("torso.0.", "members.0.0."), ("torso.2.", "members.0.2."), ("head.", "members.0.4.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, obs: Tensor) -> Tensor:
        f = self.forecast(obs[..., : self.n_features])
        scores = torch.full((*f.shape, N_ACTIONS), NEVER, dtype=f.dtype, device=f.device)
        scores[..., HOLD] = 0.0
        scores[..., OPEN_LONG] = f
        scores[..., CLOSE] = -f
        return scores


def forward_log_returns(open_: np.ndarray, close: np.ndarray, horizon: int) -> np.ndarray:
    """[T, P] the label of bar t: log(close[t + horizon]) - log(open[t + 1]), the return of a position filled at
    the next open and marked at the close `horizon` bars on; NaN where t + horizon is past the series."""
    y = np.full(close.shape, np.nan)
    n = close.shape[0] - horizon
    if n > 0:
        y[:n] = np.log(close[horizon:]) - np.log(open_[1: n + 1])
    return y


def gain_t_stat(gain: np.ndarray, lag: int) -> float:
    """The t-statistic of the mean of a series of per-bar loss gains, with the Newey-West (Bartlett kernel)
    variance over `lag` bars: consecutive labels share all but one bar of their horizon, so neighbouring
    gains are correlated and a plain t would overstate the evidence. 0 for a series without spread (e.g. a
    forecast of exactly zero, whose gain is 0 on every bar)."""
    n = len(gain)
    d = gain - gain.mean()
    var = float(d @ d) / n
    for k in range(1, min(lag, n - 1) + 1):
        var += 2.0 * (1.0 - k / (lag + 1)) * float(d[k:] @ d[:-k]) / n
    if n < 2 or var <= 0.0:
        return 0.0
    return float(gain.mean() / np.sqrt(var / n))


@dataclass
class ForecastFit:
    """What train_forecast did: the steps of the final fit, where the holdout loss was lowest, and that loss
    beside the loss of forecasting zero on the same rows (the fit is worth something only below it)."""

    steps: int
    best_step: int
    holdout_loss: float
    holdout_loss_zero: float
    holdout_t: float  # the t-statistic of the holdout gain over zero (gain_t_stat); 0 when no step beat zero
    rows_fit: int
    rows_holdout: int
    silenced: bool = False  # holdout_t fell short of AgentConfig.forecast_min_t: the forecast was set to zero


class ForecastAgent:
    """The forecast learner's state: the network, its optimiser and generator (the DQNAgent's interface that
    the pipeline uses: model, state_dict, load_state_dict, grad_steps)."""

    def __init__(self, n_features: int, hidden: int, learning_rate: float, device: torch.device, seed: int,
                 members: int = 1) -> None:
        self.device = device
        self.model = ForecastNet(n_features, hidden, members).to(device)
        self.learning_rate = learning_rate
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.grad_steps = 0
        self.fit: ForecastFit | None = None

    def state_dict(self) -> dict:
        return {"model_state_dict": self.model.state_dict(), "optimizer_state_dict": self.optimizer.state_dict(),
                "grad_steps": self.grad_steps}

    def load_state_dict(self, state: dict, *, with_optimizer: bool = True) -> None:
        self.model.load_state_dict(state["model_state_dict"])
        if with_optimizer and "optimizer_state_dict" in state:
            self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.grad_steps = int(state.get("grad_steps", 0))

    def silence(self) -> None:
        """Forecast zero everywhere from now on (every member's last layer zeroed): the policy never trades."""
        with torch.no_grad():
            for member in self.model.members:
                member[-1].weight.zero_()
                member[-1].bias.zero_()

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        return F.smooth_l1_loss(self.model.forecast(x), y)

    def _steps(self, x: Tensor, y: Tensor, n: int, batch_size: int) -> None:
        """n gradient steps; each member fits its own batch (its own loss: the members learn apart)."""
        members = len(self.model.members)
        for _ in range(n):
            i = torch.randint(0, x.shape[0], (members, batch_size), device=x.device, generator=self.generator)
            loss = sum(F.smooth_l1_loss(m(x[i[k]]).squeeze(-1), y[i[k]]) for k, m in enumerate(self.model.members))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.grad_steps += 1

    def train(self, x_fit: Tensor, y_fit: Tensor, x_hold: Tensor, y_hold: Tensor, x_all: Tensor, y_all: Tensor, *,
              batch_size: int, eval_every: int, patience: int, max_steps: int, rows_per_bar: int = 1, lag: int = 0,
              should_stop=None, on_progress=None) -> ForecastFit:
        """Early stopping, then a refit: train on (x_fit, y_fit), measuring the loss on (x_hold, y_hold) every
        `eval_every` steps (step 0 included: the starting weights), until it has not improved for `patience`
        measurements or `max_steps`; then train again from the starting weights and optimiser on all rows
        (x_all, y_all) for the best step count scaled by the rows (the same passes over the data). Labels are
        in the learner's units. `should_stop()` is asked between measurements and between pieces of the refit (a
        preemption).

        The fit also records the t-statistic of the early-stopped weights' holdout gain over forecasting zero
        (gain_t_stat): the holdout rows come `rows_per_bar` to a bar (the pairs), summed per bar, and their
        labels overlap over `lag` bars (the horizon).

        `on_progress(done, total)` hears the gradient steps done after every measurement and every `eval_every`
        steps of the refit: `total` is the most the fit can take (max_steps, then the refit's steps at most) until
        the early stopping ends, then the steps it will have taken."""
        refit_scale = x_all.shape[0] / max(1, x_fit.shape[0])
        progress = on_progress or (lambda done, total: None)
        start = {k: v.clone() for k, v in self.model.state_dict().items()}
        start_opt = self.optimizer.state_dict()
        start_gen = self.generator.get_state()
        start_steps = self.grad_steps

        def holdout_loss() -> float:
            with torch.no_grad():
                return float(self._loss(x_hold, y_hold))

        best, best_step, since, step = holdout_loss(), 0, 0, 0
        best_state = start
        while step < max_steps and since < patience:
            if should_stop is not None and should_stop():
                raise InterruptedError
            n = min(eval_every, max_steps - step)
            self._steps(x_fit, y_fit, n, batch_size)
            step += n
            loss = holdout_loss()
            if not np.isfinite(loss):
                raise NonFiniteError(f"the forecast's holdout loss is {loss} at gradient step {step}",
                                     quantity="forecast holdout loss", step=step)
            if loss < best:
                best, best_step, since = loss, step, 0
                best_state = {k: v.clone() for k, v in self.model.state_dict().items()}
            else:
                since += 1
            progress(step, max_steps + round(max_steps * refit_scale))
        # how sure the gain over forecasting zero is, for the early-stopped weights on the holdout
        self.model.load_state_dict(best_state)
        with torch.no_grad():
            gain = (F.smooth_l1_loss(torch.zeros_like(y_hold), y_hold, reduction="none")
                    - F.smooth_l1_loss(self.model.forecast(x_hold), y_hold, reduction="none"))
        t = gain_t_stat(gain.double().cpu().numpy().reshape(-1, rows_per_bar).sum(1), lag)
        # the refit on every row, from the same start
        self.model.load_state_dict(start)
        self.optimizer.load_state_dict(start_opt)
        self.generator.set_state(start_gen)
        self.grad_steps = start_steps
        steps = round(best_step * refit_scale)
        for done in range(0, steps, eval_every):  # in pieces, to report progress: the same steps as in one call
            if should_stop is not None and should_stop():
                raise InterruptedError
            n = min(eval_every, steps - done)
            self._steps(x_all, y_all, n, batch_size)
            progress(step + done + n, step + steps)
        with torch.no_grad():
            zero = float(F.smooth_l1_loss(torch.zeros_like(y_hold), y_hold))
        self.fit = ForecastFit(steps=steps, best_step=best_step, holdout_loss=best, holdout_loss_zero=zero,
                               holdout_t=t, rows_fit=int(x_fit.shape[0]), rows_holdout=int(x_hold.shape[0]))
        return self.fit
