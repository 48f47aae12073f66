"""The torch device a `--device NAME` names here. A module of its own, importing nothing but torch, so
that the controller's device probe (nexlify.probe) pays for torch alone and not for the environment."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """auto: cuda where torch sees a device, else cpu; cuda where none is: InputError naming what is accepted."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from nexlify.errors import InputError

        raise InputError("--device cuda: no CUDA device is available here; accepted: auto, cpu")
    return torch.device(name)
