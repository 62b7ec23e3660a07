"""Per-neuron quantities of a mask (pure functions).

A *neuron* is one output unit: row ``i`` of a Linear weight ``(out, in)``,
output channel ``i`` of a conv weight ``(out, in/groups, *kernel)``.
"""

from __future__ import annotations

import torch


def fan_in(mask: torch.Tensor) -> torch.Tensor:
    """``n_i``: number of active incoming weights of each output neuron, shape ``(out,)``."""
    if mask.dim() < 2:
        raise ValueError(f"a weight mask has at least 2 dims (out, in, ...), got shape {tuple(mask.shape)}")
    return mask.reshape(mask.shape[0], -1).sum(dim=1)


def neuron_sparsity(mask: torch.Tensor) -> torch.Tensor:
    """``s_i = 1 - n_i / N`` per output neuron, with ``N`` the dense fan-in."""
    dense_fan_in = mask[0].numel()
    return 1.0 - fan_in(mask).to(torch.float32) / dense_fan_in


def neuron_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-neuron vector against ``weight``: ``(out, 1, ..., 1)``."""
    return (weight.shape[0],) + (1,) * (weight.dim() - 1)
