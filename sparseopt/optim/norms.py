"""Which normalization layers skew a sparse layer's gradient, and over which neurons (docs/library.md).

A normalization layer divides each value by a standard deviation computed over
some set of values. The BatchNorm skew of SparseOpt (SPEC section 2) arises
because that deviation is *per neuron*: neuron ``i``'s pre-activation scale
grows like ``sqrt(n_i)``, so dividing by it amplifies neuron ``i``'s gradient by
``1/sqrt(1 - s_i)``. A layer that shares one deviation among several neurons
amplifies all of them by one common factor, which depends on the group's mean
fan-in, not on each neuron's own.

So each normalization has a *group size* ``g``: the number of consecutive
output channels of the sparse layer that share one statistic.

* ``g = 1`` (BatchNorm, SyncBatchNorm, InstanceNorm, GroupNorm with one channel
  per group, a LayerNorm/RMSNorm over dimensions that exclude the channels):
  the full per-neuron skew; SparseOpt's ``c_i = sqrt(n_i / n_avg)``.
* ``1 < g < C`` (GroupNorm): one skew per group; ``c_i = sqrt(mean_group n / n_avg)``.
* ``g = C`` (LayerNorm, RMSNorm over the features, GroupNorm with one group):
  no skew between the layer's neurons, so nothing to cancel; SparseOpt leaves
  the layer alone (a per-neuron ``c_i`` there *creates* a skew: measured in
  docs/results.md, section 4).
"""

from __future__ import annotations

import torch
from torch import nn

PER_CHANNEL_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
# RMSNorm arrived in torch 2.4; the package supports 2.3.
FEATURE_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
NORM_TYPES: tuple[type[nn.Module], ...] = (*PER_CHANNEL_NORMS, nn.GroupNorm, *FEATURE_NORMS)


def _shape(output: torch.Tensor | torch.Size) -> torch.Size:
    return output.shape if isinstance(output, torch.Tensor) else torch.Size(output)


def channel_dim(layer: nn.Module, output: torch.Tensor | torch.Size) -> int:
    """The (non-negative) dimension of ``output`` (a tensor or its shape) that holds the layer's output neurons.

    Convolutions put channels at dim 1 (``N, C, ...``); a Linear layer at the last dim (``..., C``).
    """
    return 1 if isinstance(layer, nn.modules.conv._ConvNd) else len(_shape(output)) - 1


def norm_group_size(norm: nn.Module, layer: nn.Module, output: torch.Tensor | torch.Size) -> int:
    """How many consecutive output neurons of ``layer`` share one statistic of ``norm`` (see the module doc)."""
    shape = _shape(output)
    dim = channel_dim(layer, shape)
    channels = shape[dim]
    if isinstance(norm, PER_CHANNEL_NORMS):
        return 1
    if isinstance(norm, nn.GroupNorm):
        return channels // norm.num_groups
    if isinstance(norm, FEATURE_NORMS):
        covered = len(norm.normalized_shape)  # the last `covered` dims are normalised together
        return channels if dim >= len(shape) - covered else 1
    raise TypeError(f"{type(norm).__name__} is not a normalization layer sparseopt knows; known: "
                    f"{[t.__name__ for t in NORM_TYPES]}")


def removes_skew(group_size: int, channels: int) -> bool:
    """Whether a layer normalised in groups of ``group_size`` has a skew between its neurons to cancel."""
    return group_size < channels
