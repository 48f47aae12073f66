"""Small helpers shared by the strategy modules: turn Python numbers into tensors that match the
dtype and device of the tensors they meet, without ever copying back to the host."""

from __future__ import annotations

import torch
from torch import Tensor

TensorLike = Tensor | float | int


def reference(*values: TensorLike) -> Tensor | None:
    """The first floating tensor among `values` (its dtype and device are the ones to match)."""
    for value in values:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value
    return None


def as_float_tensors(*values: TensorLike) -> tuple[Tensor, ...]:
    """All `values` as floating tensors on the dtype and device of the first floating tensor among
    them (float64 on the CPU when there is none). Tensors already on that dtype/device are returned
    as they are (no copy)."""
    ref = reference(*values)
    dtype = ref.dtype if ref is not None else torch.float64
    device = ref.device if ref is not None else torch.device("cpu")
    return tuple(torch.as_tensor(v, dtype=dtype, device=device) for v in values)
