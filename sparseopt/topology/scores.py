"""Pruning scores of one layer (pure functions): which active connections are dropped first.

Every score has the weight's shape and is ranked over the active entries only;
the smallest scores are pruned. ``scale`` is the per-neuron vector ``c`` the
optimizer applies to the gradient (ones for plain SGD).

* ``magnitude`` ``|w|``: RigL / SET as published (the default).
* ``scaled`` ``|w| / c_i``: undoes the preconditioner's effect on how far a
  weight has moved. A neuron with ``c_i < 1`` learns ``c_i`` times slower, so
  its weights are small because of the preconditioner, not because they are
  unimportant (hypothesis (a) of the SparseOpt-vs-baseline study).
* ``normalized`` ``|w_ij| / rms_i(w)``: magnitude relative to the neuron's own
  active weights. A BatchNorm after the layer makes each neuron's output
  invariant to the scale of its weight row, so comparing raw magnitudes across
  neurons compares arbitrary scales; this score is invariant to any per-row
  rescaling.
"""

from __future__ import annotations

import torch

from ..masks.neurons import fan_in, neuron_shape
from ..registry import Registry


def magnitude_score(weight: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return weight.abs()


def scaled_score(weight: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    if scale is None:
        return weight.abs()
    # A neuron with c_i = 0 has no active weight: its entries are never ranked, any finite divisor will do.
    c = scale.to(weight.dtype).clamp_min(torch.finfo(weight.dtype).tiny).reshape(neuron_shape(weight))
    return weight.abs() / c


def normalized_score(weight: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    w = weight.abs() * mask
    n = fan_in(mask).to(weight.dtype).clamp_min(1.0)
    rms = (w.reshape(w.shape[0], -1).pow(2).sum(dim=1) / n).sqrt()
    rms = rms.clamp_min(torch.finfo(weight.dtype).tiny).reshape(neuron_shape(weight))
    return weight.abs() / rms


# name -> fn(weight, mask, scale) -> score. A new pruning criterion is one call, PRUNE_SCORES.register("mine", fn);
# it is then a choice of RigL/SET(prune_score=...) and --prune-score.
PRUNE_SCORES: Registry = Registry("prune score")
PRUNE_SCORES.register("magnitude", magnitude_score)
PRUNE_SCORES.register("scaled", scaled_score)
PRUNE_SCORES.register("normalized", normalized_score)
