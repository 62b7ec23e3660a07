"""Global gradient-norm clipping as an optimizer step: one definition for dense and sparse runs.

``SparseOpt(max_grad_norm=...)`` clips after its correction (the paper's appendix F);
a run without masks gets the same clip from :class:`ClipGradNorm` around its optimizer,
so a training loop never clips by itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from .wrapper import OptimizerWrapper, grads_of, use_foreach


def clip_grad_norm_of(param_groups: list[dict[str, Any]], max_norm: float, foreach: bool | None = None) -> torch.Tensor:
    """Clip the global gradient norm over every parameter of ``param_groups`` that has a gradient."""
    params, _ = grads_of(p for g in param_groups for p in g["params"])
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=use_foreach(params, foreach))


class ClipGradNorm(OptimizerWrapper):
    """``base`` whose step first clips the global gradient norm to ``max_norm``."""

    def __init__(self, base: Optimizer, max_norm: float, foreach: bool | None = None):
        super().__init__(base)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm!r}")
        self.max_norm = float(max_norm)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        clip_grad_norm_of(self.param_groups, self.max_norm, self.foreach)
        self.base.step()
        return loss

    def wrapper_state(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}
