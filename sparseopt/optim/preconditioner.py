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


def neuron_scales(mask: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """``c_i = sqrt(n_i / n_avg)`` for each output neuron of a weight mask, shape ``(out,)``.

    ``group_size``: consecutive neurons that share one normalization statistic
    (:func:`sparseopt.optim.norms.norm_group_size`; 1 for BatchNorm). Their
    skew is common to the group, so ``n_i`` is replaced by the group's mean
    fan-in; ``group_size = out`` gives ones (nothing to cancel).

    * all ones when every neuron (group) has the same fan-in (dense, N:M, constant fan-in);
    * zero for a neuron with no active weight;
    * all zeros for an all-zero mask.
    """
    n = fan_in(mask).to(torch.float32)
    alive = n > 0
    if group_size > 1:
        if n.numel() % group_size:
            raise ValueError(f"group_size {group_size} does not divide the layer's {n.numel()} neurons")
        n = n.reshape(-1, group_size).mean(1).repeat_interleave(group_size)
    n_avg = n.mean()
    # No data-dependent branch (no host synchronisation; works on any device, meta included).
    c = torch.where(n_avg > 0, torch.sqrt(n / n_avg.clamp_min(1e-30)), torch.zeros_like(n))
    return c * alive


def bn_scales(running_var: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``c_i = sigma_i / sqrt(mean_j sigma_j^2)`` from a BatchNorm's running variance ``sigma_i^2``.

    BatchNorm divides neuron ``i``'s gradient by its pre-activation scale
    ``sigma_i``; the fan-in formula predicts ``sigma_i^2 ~ n_i`` (i.i.d. weights,
    true at initialisation), this reads the actual value. Normalised like the
    fan-in scale (mean of ``c_i^2`` over the layer's neurons is 1), so the two
    agree at initialisation; zero for a neuron with no active weight.
    """
    var = running_var.detach().to(torch.float32).clamp_min(0.0)
    var = var * (fan_in(mask) > 0)
    mean = var.mean()
    return torch.where(mean > 0, torch.sqrt(var / mean.clamp_min(1e-30)), torch.zeros_like(var))


def smooth_scales(previous: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """One step of an exponential moving average of ``c`` towards ``target``.

    Neurons with no scale yet (``previous == 0``: new or revived) take the
    target at once, and neurons without active weights (``target == 0``) drop
    to 0: only the jumps of live neurons are smoothed.
    """
    smoothed = beta * previous + (1.0 - beta) * target
    smoothed = torch.where(previous > 0, smoothed, target)
    return torch.where(target > 0, smoothed, torch.zeros_like(target))


def gradient_multiplier(
    mask: torch.Tensor,
    scale: torch.Tensor | None,
    dtype: torch.dtype,
    grown: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tensor of the weight's shape that masks (and optionally preconditions) a gradient.

    ``grad *= gradient_multiplier(...)`` does both the gradient masking and the
    SparseOpt scaling (``scale``: the per-neuron ``c``, ``None`` for the plain
    masked gradient) in one elementwise multiply per step. ``grown``: positions
    whose scale is raised to at least 1 (new connections are not damped).
    """
    multiplier = mask.to(dtype)
    if scale is not None:
        c = scale.to(device=mask.device, dtype=dtype).reshape(neuron_shape(mask))
        if grown is None:
            multiplier = multiplier * c
        else:
            multiplier = multiplier * torch.where(grown.to(mask.device), c.clamp_min(1.0), c)
    return multiplier
