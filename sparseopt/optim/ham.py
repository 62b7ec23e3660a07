"""HAM, Hyperbolic Aware Minimization (Jacobs et al., 2026), as an optimizer wrapper.

After the base step, every weight tensor with ``ndim >= 2`` (biases and
normalization parameters untouched) is multiplied elementwise by

    w <- w * exp(clamp(lr * (-alpha * sign(w) * g - beta), -5, 5))

with ``g`` the gradient the step received (no momentum, no weight decay; the
SparseOpt-corrected one when SparseOpt wraps HAM) and ``lr`` the group's
current learning rate. Its continuous limit is a Riemannian gradient flow with
inverse metric ``1 + alpha * |w|``; ``beta`` adds a multiplicative decay that
biases towards sparsity. Exact zeros (masked weights) stay zero.

``sign(w)`` is taken after the base step, on the weight being multiplied.
Defaults ``alpha = 200``, ``beta = 1e-3`` (ImageNet); the paper reports
``beta = 16e-3`` for CIFAR-100 (reported, not verified by us).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from .wrapper import OptimizerWrapper


def _ham_update_single(weights, grads, lr: float, alpha: float, beta: float, clamp: float) -> None:
    for w, g in zip(weights, grads):
        exponent = (lr * (-alpha * torch.sign(w) * g - beta)).clamp_(-clamp, clamp)
        w.mul_(torch.exp(exponent))


def _ham_update_foreach(weights, grads, lr: float, alpha: float, beta: float, clamp: float) -> None:
    exponent = torch._foreach_sign(weights)
    torch._foreach_mul_(exponent, grads)
    torch._foreach_mul_(exponent, -alpha * lr)
    torch._foreach_add_(exponent, -beta * lr)
    torch._foreach_clamp_min_(exponent, -clamp)
    torch._foreach_clamp_max_(exponent, clamp)
    torch._foreach_exp_(exponent)
    torch._foreach_mul_(weights, exponent)


@torch.no_grad()
def ham_update_(weights, grads, lr: float, alpha: float, beta: float, clamp: float = 5.0, foreach: bool = True) -> None:
    """The hyperbolic step in place on lists of weights and their gradients."""
    if not weights:
        return
    (_ham_update_foreach if foreach else _ham_update_single)(list(weights), list(grads), float(lr), alpha, beta, clamp)


class HAM(OptimizerWrapper):
    """Wrap ``base`` with HAM's hyperbolic step.

    Args:
        base: any ``torch.optim.Optimizer`` (SGD with momentum in the paper).
        alpha: strength of the hyperbolic term (default 200).
        beta: multiplicative decay per unit learning rate (default 1e-3).
        clamp: bound on the exponent (default 5).
        max_weight_norm: if set, rescale each affected weight tensor so its norm
            is at most this value after the hyperbolic step.
        foreach: use the fused ``torch._foreach_*`` path (default) or the per-tensor one.

    A param group may override ``ham_alpha`` / ``ham_beta``.
    """

    def __init__(
        self,
        base: Optimizer,
        alpha: float = 200.0,
        beta: float = 1e-3,
        *,
        clamp: float = 5.0,
        max_weight_norm: float | None = None,
        foreach: bool = True,
    ):
        super().__init__(base)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0:
                raise ValueError(f"HAM {name} must be >= 0, got {value!r}")
        if not clamp > 0:
            raise ValueError(f"HAM clamp must be positive, got {clamp!r}")
        if max_weight_norm is not None and not max_weight_norm > 0:
            raise ValueError(f"max_weight_norm must be positive or None, got {max_weight_norm!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.clamp = float(clamp)
        self.max_weight_norm = max_weight_norm
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        self.base.step()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.dim() >= 2]
            if not params:
                continue
            lr = float(group["lr"])
            alpha = group.get("ham_alpha", self.alpha)
            beta = group.get("ham_beta", self.beta)
            ham_update_(params, [p.grad for p in params], lr, alpha, beta, self.clamp, self.foreach)
            if self.max_weight_norm is not None:
                norms = torch._foreach_norm(params)
                factors = [(self.max_weight_norm / n.clamp_min(1e-12)).clamp_max(1.0) for n in norms]
                torch._foreach_mul_(params, factors)
        return loss

    def wrapper_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "clamp": self.clamp, "max_weight_norm": self.max_weight_norm}
