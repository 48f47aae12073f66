"""Finite numbers, checked as a run goes: the first NaN or infinity stops the run with a NonFiniteError.

The environment is finite by construction (nexlify.env.batched: cash never below zero, fixed costs in
proportion, so equity stays > 0); these checks are the runtime guard that catches any violation of it,
and of the learning (a loss or a weight gone non-finite), before it poisons the replay buffer or reaches
a checkpoint. They cost one device sync per environment step (rewards and observations together) and
one per `LEARN_CHECK_EVERY` gradient steps (the losses since the last check and every parameter); the
losses are accumulated on the device in between.

The error names the run (seed; the worker adds the run key), the episode (its index in the batch, its
first bar and that bar's date), the quantity (the reward of a pair slot, an observation feature by name,
the loss, a parameter by name) and the step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from nexlify.errors import NonFiniteError

LEARN_CHECK_EVERY = 256  # gradient steps between checks of the loss and the parameters


def _iso(ms: int) -> str:
    return np.datetime64(int(ms), "ms").astype("datetime64[s]").astype(str) + "Z"


@dataclass
class StepContext:
    """What names a non-finite value of the environment: the run's seed, each episode's first bar [B],
    the market's timestamps, pairs per slot and the observation's feature names."""

    seed: int | None
    starts: Sequence[int]
    timestamps: np.ndarray
    pairs: Sequence[str]
    obs_names: Sequence[str]

    def episode(self, b: int) -> dict:
        bar = int(self.starts[b])
        return {"episode": int(b), "start_bar": bar, "start_date": _iso(int(self.timestamps[bar]))}


def obs_names(n_market_features: int, state_names: Sequence[str]) -> list[str]:
    """The observation's feature names: the market features (nexlify.features), then the slot state."""
    from nexlify.features import FEATURE_NAMES

    market = list(FEATURE_NAMES) if len(FEATURE_NAMES) == n_market_features else [
        f"market_{j}" for j in range(n_market_features)]
    return market + list(state_names)


def check_step(reward: Tensor, obs: Tensor, step: int, ctx: StepContext) -> None:
    """Rewards [B, P] and observations [B, P, O] of one batched step; raises at the first non-finite one."""
    if bool(torch.isfinite(reward).all() & torch.isfinite(obs).all()):
        return
    bad_reward = ~torch.isfinite(reward)
    if bool(bad_reward.any()):
        b, p = (int(i) for i in bad_reward.nonzero()[0])
        quantity, value = f"reward[{ctx.pairs[p]}]", float(reward[b, p])
    else:
        b, p, j = (int(i) for i in (~torch.isfinite(obs)).nonzero()[0])
        name = ctx.obs_names[j] if j < len(ctx.obs_names) else f"feature_{j}"
        quantity, value = f"observation {name}[{ctx.pairs[p]}]", float(obs[b, p, j])
    _raise(quantity, value, step=step, seed=ctx.seed, **ctx.episode(b))


class LearnWatch:
    """Watches the losses of the gradient steps (on the device, no sync) and checks them with the network's
    parameters every LEARN_CHECK_EVERY gradient steps and at `check`."""

    def __init__(self, model: nn.Module, seed: int | None = None, every: int | None = None) -> None:
        self.model, self.seed, self.every = model, seed, every or LEARN_CHECK_EVERY
        self.first_bad: Tensor | None = None  # grad step of the first non-finite loss, -1 while none
        self.losses = 0

    def loss(self, loss: Tensor | None, grad_step: int) -> None:
        """Record one gradient step's loss (None: no step was taken)."""
        if loss is None:
            return
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=loss.device)
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, grad_step, self.first_bad)
        self.losses += 1
        if self.losses % self.every == 0:
            self.check(grad_step)

    def check(self, grad_step: int) -> None:
        """Raises if a loss since the start or a parameter is non-finite (names the parameter first)."""
        loss_step = -1 if self.first_bad is None else int(self.first_bad)
        check_parameters(self.model, step=grad_step, seed=self.seed,
                         note=f"the loss was first non-finite at gradient step {loss_step}" if loss_step >= 0 else "")
        if loss_step >= 0:
            _raise("loss", float("nan"), step=loss_step, seed=self.seed, step_kind="gradient step")


def check_parameters(model: nn.Module, *, step: int, seed: int | None = None, note: str = "") -> None:
    """Every parameter and buffer of `model` finite (one sync), else NonFiniteError naming the first bad one."""
    tensors = [(f"parameter {name}", t) for name, t in model.named_parameters()]
    tensors += [(f"buffer {name}", t) for name, t in model.named_buffers() if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return
    name, t = next((n, t) for n, t in tensors if not bool(torch.isfinite(t).all()))
    value = float(t.detach().flatten()[~torch.isfinite(t.detach().flatten())][0])
    _raise(name, value, step=step, seed=seed, step_kind="gradient step", note=note)


def check_metrics(metrics: Mapping, what: str) -> None:
    """Every number in a metrics mapping (nested) finite, else NonFiniteError naming it: a score of NaN is
    never recorded as a result."""
    bad = _first_bad_number(metrics, "")
    if bad is not None:
        raise NonFiniteError(f"non-finite {what} metric {bad}", quantity=f"{what} {bad}")


def _first_bad_number(obj: object, path: str) -> str | None:
    if isinstance(obj, float):
        return None if np.isfinite(obj) else f"{path} = {obj}"
    return _first_in_children(obj, path, _first_bad_number)


def _first_in_children(obj: object, path: str, check) -> str | None:
    """`check(child, its path)` over a mapping's values or a sequence's items: the first finding, or None."""
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = check(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def check_checkpoint(ckpt: Mapping, what: str = "checkpoint") -> None:
    """No checkpoint with a non-finite tensor (weights, target, optimiser moments) is ever written: raises
    NonFiniteError naming the tensor's key path."""
    bad = _first_bad_tensor(ckpt, "")
    if bad is not None:
        raise NonFiniteError(f"non-finite {bad} in the {what}: not written", quantity=bad, what=what)


def _first_bad_tensor(obj: object, path: str) -> str | None:
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return path or "tensor"
        return None
    return _first_in_children(obj, path, _first_bad_tensor)


def _raise(quantity: str, value: float, *, step: int, seed: int | None, step_kind: str = "step",
           note: str = "", **episode: object) -> None:
    where = [f"seed {seed}"] if seed is not None else []
    if episode:
        where.append(f"episode {episode['episode']} of the batch (start bar {episode['start_bar']}, "
                     f"{episode['start_date']})")
    message = f"non-finite {quantity} = {value} at {step_kind} {step}" + (f" ({', '.join(where)})" if where else "")
    if note:
        message += f"; {note}"
    raise NonFiniteError(message, quantity=quantity, step=int(step), step_kind=step_kind, seed=seed, **episode)
