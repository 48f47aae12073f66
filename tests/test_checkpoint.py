"""Checkpoints (nexlify.checkpoint): a round trip through save/load with weights_only=True, the original
guide's `load_state_dict(torch.load(...)["model_state_dict"])`, and refusal of anything that is not plain
data or not a nexlify checkpoint, as an InputError naming the file."""

from __future__ import annotations

import os

import pytest
import torch

from nexlify import checkpoint
from nexlify.agent.dqn import DQNAgent
from nexlify.config import AgentConfig, TrainConfig
from nexlify.configtools import to_dict
from nexlify.env.batched import N_ACTIONS
from nexlify.errors import InputError
from nexlify.features import Normalizer
from tests.helpers_market import one_torch_thread  # noqa: F401  (autouse fixture)

CPU = torch.device("cpu")
OBS = 7


class Opaque:
    """An arbitrary class instance: weights_only loading must refuse to rebuild it."""

    def __init__(self) -> None:
        self.secret = 42


class RunsCode:
    """A pickle that calls os.mkdir(path) when unpickled: loading must never get that far."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def trained_agent(seed: int = 1) -> DQNAgent:
    """A small agent after a few gradient steps, so the optimiser has state to save."""
    torch.manual_seed(seed)
    agent = DQNAgent(OBS, N_ACTIONS, AgentConfig(hidden=16, buffer_size=64, batch_size=8, learning_starts=0), CPU,
                     seed)
    n = 32
    gen = torch.Generator().manual_seed(seed)
    agent.buffer.add(torch.randn((n, OBS), generator=gen), torch.randint(0, 3, (n,), generator=gen),
                     torch.randn(n, generator=gen), torch.full((n,), 0.9), torch.randn((n, OBS), generator=gen),
                     torch.ones((n, N_ACTIONS), dtype=torch.bool))  # every action valid
    for _ in range(5):
        agent.learn()
    return agent


def make_checkpoint(agent: DQNAgent, **extra) -> dict:
    normalizer = Normalizer(mean=[0.5] * OBS, std=[2.0] * OBS)
    return checkpoint.build_checkpoint(
        agent.state_dict(), config=to_dict(TrainConfig()), normalizer=normalizer.to_dict(), episodes_trained=8,
        seed=7, metrics={"score": 1.25, "per_pair": {"BTC/USDT": {"total_return": 3.5, "trades": 4}}},
        extra=extra or None)


def test_round_trip_through_a_file(tmp_path):
    agent = trained_agent()
    ckpt = make_checkpoint(agent, val_window=[100, 200])
    path = tmp_path / "runs" / checkpoint.checkpoint_name(3.456)
    checkpoint.save(ckpt, path)
    assert path.name == "model_return3.5.pt"
    assert sorted(os.listdir(path.parent)) == ["model_return3.5.pt"]  # no temporary file left behind

    loaded = checkpoint.load(path)
    assert set(checkpoint.REQUIRED_KEYS) <= set(loaded)
    for key in ("model_state_dict", "target_model_state_dict"):
        assert loaded[key].keys() == ckpt[key].keys()
        assert all(torch.equal(loaded[key][k], ckpt[key][k]) for k in ckpt[key])
    assert loaded["config"] == to_dict(TrainConfig())
    assert Normalizer.from_dict(loaded["normalizer"]) == Normalizer(mean=[0.5] * OBS, std=[2.0] * OBS)
    assert (loaded["episodes_trained"], loaded["seed"], loaded["val_window"]) == (8, 7, [100, 200])
    assert loaded["metrics"]["per_pair"]["BTC/USDT"]["trades"] == 4
    assert loaded["grad_steps"] == agent.grad_steps == 5


def test_loaded_weights_reproduce_the_network(tmp_path):
    agent = trained_agent()
    path = tmp_path / "m.pt"
    checkpoint.save(make_checkpoint(agent), path)
    obs = torch.randn((10, OBS), generator=torch.Generator().manual_seed(9))

    fresh = DQNAgent(OBS, N_ACTIONS, AgentConfig(hidden=16, buffer_size=8), CPU, 99)
    assert not torch.equal(fresh.model(obs), agent.model(obs))
    fresh.model.load_state_dict(checkpoint.load(path)["model_state_dict"])
    assert torch.equal(fresh.model(obs), agent.model(obs))

    # the original guide's line, verbatim in spirit: plain torch.load with weights_only=True
    guide = DQNAgent(OBS, N_ACTIONS, AgentConfig(hidden=16, buffer_size=8), CPU, 98)
    guide.model.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])
    assert torch.equal(guide.model(obs), agent.model(obs))

    # the whole agent, optimiser included, continues where it was
    cont = DQNAgent(OBS, N_ACTIONS, AgentConfig(hidden=16, buffer_size=8), CPU, 97)
    cont.load_state_dict(checkpoint.load(path))
    assert cont.grad_steps == 5
    assert torch.equal(cont.target_model(obs), agent.target_model(obs))
    assert cont.optimizer.state_dict()["state"].keys() == agent.optimizer.state_dict()["state"].keys()


def test_round_trip_through_bytes():
    agent = trained_agent()
    loaded = checkpoint.load(checkpoint.to_bytes(make_checkpoint(agent)))
    assert all(torch.equal(loaded["model_state_dict"][k], v) for k, v in agent.model.state_dict().items())


def test_a_class_instance_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(make_checkpoint(trained_agent(), payload=Opaque()), path)
    with pytest.raises(InputError) as info:
        checkpoint.load(path)
    assert str(path) in str(info.value) and "weights_only" in str(info.value)


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save(make_checkpoint(trained_agent(), payload=RunsCode(str(marker))), path)
    with pytest.raises(InputError):
        checkpoint.load(path)
    assert not marker.exists()
    with pytest.raises(InputError):
        checkpoint.load(path.read_bytes())
    assert not marker.exists()


@pytest.mark.parametrize("drop", ["model_state_dict", "normalizer", "config", "format_version"])
def test_missing_keys_are_named(tmp_path, drop):
    ckpt = make_checkpoint(trained_agent())
    del ckpt[drop]
    path = tmp_path / "partial.pt"
    torch.save(ckpt, path)
    with pytest.raises(InputError) as info:
        checkpoint.load(path)
    assert drop in str(info.value) and "missing" in str(info.value)


def test_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(InputError) as info:
        checkpoint.load(path)
    assert "model_state_dict" in str(info.value)


def test_newer_format_is_refused():
    ckpt = make_checkpoint(trained_agent())
    ckpt["format_version"] = checkpoint.FORMAT_VERSION + 1
    with pytest.raises(InputError) as info:
        checkpoint.load(checkpoint.to_bytes(ckpt))
    assert "format_version" in str(info.value)


def test_garbage_and_missing_files_are_input_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(InputError) as info:
        checkpoint.load(garbage)
    assert str(garbage) in str(info.value)
    with pytest.raises(InputError) as info:
        checkpoint.load(tmp_path / "nope.pt")
    assert "nope.pt" in str(info.value) and "does not exist" in str(info.value)


@pytest.mark.parametrize("value, name", [(3.456, "model_return3.5.pt"), (-3.21, "model_return-3.2.pt"),
                                         (0.0, "model_return0.0.pt")])
def test_checkpoint_name(value, name):
    assert checkpoint.checkpoint_name(value) == name


class _NotACheckpoint:
    """Any pickled object: torch refuses it under weights_only=True and advises weights_only=False."""

    def __init__(self) -> None:
        self.value = 1


def test_a_non_checkpoint_pt_is_refused_without_the_advice_to_drop_weights_only(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": _NotACheckpoint()}, path)
    with pytest.raises(InputError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert f"checkpoint {path} cannot be loaded safely" in message and "not a nexlify checkpoint" in message
    assert "weights_only=False" not in message and "\n" not in message


def test_a_folder_given_as_checkpoint_is_one_line(tmp_path):
    with pytest.raises(InputError, match=f"checkpoint {tmp_path} is a folder; expected a .pt file"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("lending, sweep", [
    ({"max_idle_share": 0.7}, False),                  # written before the sweep existed: it lent by hand
    ({"max_idle_share": 0.7, "sweep": True}, True),    # recorded: kept
    ({"max_idle_share": 0.7, "sweep": False}, False),
    (None, True),                                      # no lending section at all: today's defaults
])
def test_train_config_keeps_the_lending_rule_a_checkpoint_was_trained_under(lending, sweep):
    stored = {"risk": {"stop_loss": 0.03}}
    if lending is not None:
        stored["lending"] = lending
    cfg = checkpoint.train_config({"config": stored}, "old.pt")
    assert cfg.lending.sweep is sweep and cfg.risk.stop_loss == 0.03
    assert cfg.lending.max_idle_share == (0.7 if lending is not None else 0.85)


@pytest.mark.parametrize("agent, margin", [
    ({"hidden": 32}, 0.0),                          # written before the hold margin existed: plain argmax
    ({"hidden": 32, "hold_margin": 0.05}, 0.05),    # recorded: kept
    ({"hidden": 32, "hold_margin": 0.0}, 0.0),
    (None, AgentConfig().hold_margin),              # no agent section at all: today's default
])
def test_train_config_keeps_the_acting_rule_a_checkpoint_was_trained_under(agent, margin):
    stored = {} if agent is None else {"agent": agent}
    cfg = checkpoint.train_config({"config": stored}, "old.pt")
    assert cfg.agent.hold_margin == margin
    assert cfg.agent.hidden == (32 if agent is not None else AgentConfig().hidden)


def _flip_inside_tensor_data(blob: bytes) -> bytes:
    """8 bytes inverted in the middle of the largest tensor's stored bytes (the zip's headers intact)."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # local header: 30 bytes + name + extra, then the member's stored bytes
    name_len = int.from_bytes(blob[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(blob[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    return blob[:start] + bytes(b ^ 0xFF for b in blob[start:start + 8]) + blob[start + 8:]


@pytest.mark.parametrize("damage, named", [
    (_flip_inside_tensor_data, "fails its CRC-32 check"),
    (lambda blob: blob[: len(blob) // 2], "not a complete torch file"),
    (lambda blob: blob[:-7], "not a complete torch file"),
    (lambda blob: b"", "not a complete torch file"),
])
def test_a_damaged_checkpoint_is_named_never_loaded_with_other_weights(tmp_path, damage, named):
    path = tmp_path / "model.pt"
    path.write_bytes(damage(checkpoint.to_bytes(make_checkpoint(trained_agent()))))
    with pytest.raises(InputError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert f"checkpoint {path} cannot be loaded safely" in message and named in message, message
    assert "\n" not in message
