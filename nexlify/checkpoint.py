"""Checkpoints: one torch file holding weights, optimiser, config, normaliser and metrics.

Always loaded with `torch.load(..., weights_only=True)`: a checkpoint from a bucket must never run
pickled code. Everything stored is therefore tensors or plain Python data (dicts, lists, numbers,
strings). Users of the original guide can keep writing
`agent.model.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])`.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path

import torch

from nexlify import finite
from nexlify.config import TrainConfig
from nexlify.configtools import apply_mapping
from nexlify.errors import InputError

FORMAT_VERSION = 1
# (a DQN checkpoint also holds target_model_state_dict; the forecast learner has no target network)
REQUIRED_KEYS = ("model_state_dict", "optimizer_state_dict", "config", "normalizer",
                 "episodes_trained", "seed", "metrics", "format_version")


def checkpoint_name(val_return: float) -> str:
    """model_return{R:.1f}.pt, R the validation return in percent."""
    return f"model_return{val_return:.1f}.pt"


def build_checkpoint(agent_state: dict, *, config: dict, normalizer: dict, episodes_trained: int, seed: int,
                     metrics: dict, extra: dict | None = None) -> dict:
    ckpt = dict(agent_state)
    ckpt.update(config=config, normalizer=normalizer, episodes_trained=int(episodes_trained), seed=int(seed),
                metrics=metrics, format_version=FORMAT_VERSION)
    if extra:
        ckpt.update(extra)
    return ckpt


def to_bytes(ckpt: dict) -> bytes:
    """The checkpoint as bytes; NonFiniteError (nothing written) if a tensor in it is not finite."""
    finite.check_checkpoint(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def save(ckpt: dict, path: str | Path) -> None:
    """Write atomically: a temporary file beside the target, then rename. NonFiniteError (nothing written)
    if a tensor in it is not finite."""
    finite.check_checkpoint(ckpt, f"checkpoint {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(ckpt, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_failure(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line, WITHOUT torch's advice to retry with
    weights_only=False (never safe for a file from elsewhere)."""
    text = str(exc)
    if isinstance(exc, ValueError) and ("CRC-32" in text or "torch file" in text or "damaged member" in text):
        return text
    if "weights_only" in text or "Weights only load failed" in text:
        return ("it holds objects other than tensors and plain data (refused by weights_only=True: it could run "
                "code when loaded); not a nexlify checkpoint")
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def check_zip(fh) -> None:
    """Read every member of a torch file (a zip) and check its CRC-32: torch.load does not, so a checkpoint
    with flipped bytes inside its tensors would load with other weights. ValueError naming the member."""
    try:
        with zipfile.ZipFile(fh) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a complete torch file (truncated or not a zip: {exc})") from None
    except (EOFError, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise ValueError(f"not a readable torch file ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - zlib.error, struct.error from a damaged member
        raise ValueError(f"a damaged member ({type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise ValueError(f"member {bad} fails its CRC-32 check (the file's bytes changed after it was written)")
    fh.seek(0)


def safe_torch_load(fh, map_location: str | torch.device = "cpu"):
    """torch.load(weights_only=True) of an open binary file, after every member's CRC-32 is checked."""
    check_zip(fh)
    return torch.load(fh, map_location=map_location, weights_only=True)


def load(source: str | Path | bytes, map_location: str | torch.device = "cpu", *, name: str | None = None) -> dict:
    """Load safely (weights_only=True) and check the format; InputError naming the file otherwise."""
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    if not isinstance(source, bytes) and os.path.isdir(source):
        raise InputError(f"checkpoint {name} is a folder; expected a .pt file written by nexlify (a run's "
                         "model_return*.pt, or final_model_path of a summary)")
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise InputError(f"checkpoint {name} does not exist; expected a .pt file written by nexlify") from None
    except OSError as exc:
        raise InputError(f"checkpoint {name} cannot be read ({exc.strerror or exc}); expected a .pt file "
                         "written by nexlify") from None
    try:
        with fh:
            ckpt = safe_torch_load(fh, map_location)
    except Exception as exc:  # a pickle with code in it, a truncated file, not a torch file at all
        raise InputError(f"checkpoint {name} cannot be loaded safely: {load_failure(exc)}") from None
    missing = [k for k in REQUIRED_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(REQUIRED_KEYS)
    if missing:
        raise InputError(f"checkpoint {name} is not a nexlify checkpoint: missing {', '.join(missing)}")
    if int(ckpt["format_version"]) > FORMAT_VERSION:
        raise InputError(f"checkpoint {name} has format_version {ckpt['format_version']}; "
                         f"this nexlify reads up to {FORMAT_VERSION}")
    return ckpt


def train_config(ckpt: dict, name: str) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with: its stored `config` over today's defaults, with the
    environment rules it was trained under kept. A config stored before `lending.sweep` existed lent by
    hand (LEND / WITHDRAW), so it reads as sweep false, not today's default; one stored before
    `agent.hold_margin` existed acted on the plain argmax, so it reads as margin 0; one stored before
    `agent.algorithm` existed is a Q-network, so it reads as dqn whatever today's default; a forecast stored
    before `agent.forecast_members` existed is one network, so it reads as 1."""
    stored = dict(ckpt["config"])
    lending = stored.get("lending")
    if isinstance(lending, dict) and "sweep" not in lending:
        stored["lending"] = {**lending, "sweep": False}
    agent = stored.get("agent")
    if isinstance(agent, dict) and "hold_margin" not in agent:
        stored["agent"] = agent = {**agent, "hold_margin": 0.0}
    if isinstance(agent, dict) and "algorithm" not in agent:
        stored["agent"] = agent = {**agent, "algorithm": "dqn"}
    if isinstance(agent, dict) and "forecast_members" not in agent:
        stored["agent"] = {**agent, "forecast_members": 1}
    cfg = TrainConfig()
    apply_mapping(cfg, stored, f"checkpoint {name}")
    return cfg
