"""The SparseOpt preconditioner as pure functions (SPEC section 2).

BatchNorm after a sparse layer amplifies the gradient of neuron ``i`` by
``1 / sqrt(1 - s_i)``. SparseOpt multiplies all incoming-weight gradients of
neuron ``i`` by

    c_i = sqrt(1 - s_i) / sqrt(1 - s_avg) = sqrt(n_i / n_avg)

which cancels the neuron-dependent factor while approximately preserving the
layer's gradient norm (``n_avg`` is the mean fan-in over the layer's neurons).
"""

from __future__ import annotations

import torch

from ..masks.neurons import fan_in, neuron_shape


def neuron_scales(mask: torch.Tensor) -> torch.Tensor:
    """``c_i = sqrt(n_i / n_avg)`` for each output neuron of a weight mask, shape ``(out,)``.

    * all ones when every neuron has the same fan-in (dense, N:M, constant fan-in);
    * zero for a neuron with no active weight;
    * all zeros for an all-zero mask.
    """
    n = fan_in(mask).to(torch.float32)
    n_avg = n.mean()
    if n_avg <= 0:
        return torch.zeros_like(n)
    return torch.sqrt(n / n_avg)


def gradient_multiplier(mask: torch.Tensor, precondition: bool, dtype: torch.dtype) -> torch.Tensor:
    """Tensor of the weight's shape that masks (and optionally preconditions) a gradient.

    ``grad *= gradient_multiplier(...)`` does both the gradient masking and the
    SparseOpt scaling in one elementwise multiply per step.
    """
    multiplier = mask.to(dtype)
    if precondition:
        multiplier = multiplier * neuron_scales(mask).to(dtype).reshape(neuron_shape(mask))
    return multiplier
