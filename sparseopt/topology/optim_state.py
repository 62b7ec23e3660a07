"""Resetting optimizer state at chosen positions, for any torch optimizer."""

from __future__ import annotations

import torch
from torch.optim import Optimizer


@torch.no_grad()
def zero_state_(optimizer: Optimizer, param: torch.Tensor, positions: torch.Tensor) -> int:
    """Zero every state tensor of ``param`` that has the parameter's shape at ``positions``.

    Covers SGD's ``momentum_buffer``, Adam's ``exp_avg`` / ``exp_avg_sq`` /
    ``max_exp_avg_sq`` and any other optimizer storing per-weight moments,
    without a hard-coded list. Scalars such as Adam's ``step`` are left alone.
    Returns the number of state tensors touched.
    """
    touched = 0
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(positions, 0)
            touched += 1
    return touched
