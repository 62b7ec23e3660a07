"""HAM, Hyperbolic Aware Minimization (Jacobs et al., ICLR 2026), as an optimizer wrapper.

After the base step, every weight tensor with ``ndim >= 2`` (biases and
normalization parameters untouched) is multiplied elementwise by

    w <- w * exp(clamp(lr * (-alpha * sign(w) * g - beta), -5, 5))

with ``g`` the gradient the step received (no momentum, no weight decay; the
SparseOpt-corrected one when SparseOpt wraps HAM) and ``lr`` the group's
current learning rate. Its continuous limit is a Riemannian gradient flow with
inverse metric ``1 + alpha * |w|``; ``beta`` adds a multiplicative decay that
biases towards sparsity. Exact zeros (masked weights) stay zero.

Checked against the authors' ``HamOptimizerWrapper`` (github TomJacobs05/HAM,
README, read 2026-11-29; tests/test_ham.py re-derives it independently); the
same, in this order, after the base step:

1. the update above, ``sign(w)`` taken after the base step, on tensors with a
   gradient and ``ndim >= 2`` only, zeros left at zero; ``alpha = 200``,
   ``beta = 1e-3``, clamp 5;
2. every parameter with a gradient (biases and norm parameters too) whose
   norm exceeds ``max_weight_norm = 1000`` is rescaled to that norm;
3. each param group's gradients are clipped to a total norm of
   ``max_grad_norm = 20`` *after* the step. The step itself used the unclipped
   gradient; the clip only changes what code reading ``.grad`` after
   ``step()`` sees. sparseopt's RigL reads the gradient before the step, so in
   its loop the clip changes nothing (tested); in loops that grow connections
   after ``optimizer.step()`` it changes what growth ranks.

Differences, kept on purpose: the authors check every tensor for NaN (a host
synchronisation per tensor per step), skip it and print; here no check (the
trainer stops on a non-finite loss). The authors pass ``closure`` to the base
step; here it is evaluated once by the wrapper, as torch.optim does. The paper
reports ``beta = 16e-3`` for CIFAR-100 (reported, not verified by us).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer

from .wrapper import OptimizerWrapper, use_foreach


def _ham_update_single(weights, grads, lr: float, alpha: float, beta: float, clamp: float) -> None:
    # The operations of the foreach path in the same order: both paths give the same bits.
    for w, g in zip(weights, grads):
        exponent = torch.sign(w).mul_(g).mul_(-alpha * lr).add_(-beta * lr).clamp_(-clamp, clamp)
        w.mul_(exponent.exp_())


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
def ham_update_(weights, grads, lr: float, alpha: float, beta: float, clamp: float = 5.0,
                foreach: bool | None = None) -> None:
    """The hyperbolic step in place on lists of weights and their gradients (``foreach``: as torch.optim)."""
    weights = list(weights)
    if not weights:
        return
    (_ham_update_foreach if use_foreach(weights, foreach) else _ham_update_single)(weights, list(grads), float(lr), alpha,
                                                                                 beta, clamp)


class HAM(OptimizerWrapper):
    """Wrap ``base`` with HAM's hyperbolic step.

    Args:
        base: any ``torch.optim.Optimizer`` (SGD with momentum in the paper).
        alpha: strength of the hyperbolic term (default 200).
        beta: multiplicative decay per unit learning rate (default 1e-3).
        clamp: bound on the exponent (default 5).
        max_weight_norm: rescale every parameter with a gradient whose norm exceeds
            this value to that norm, after the hyperbolic step (default 1000, the
            authors'; ``None``: off).
        max_grad_norm: clip each param group's gradients to this total norm after
            the step (default 20, the authors'; ``None``: off). The step uses the
            unclipped gradient.
        foreach: use the multi-tensor ``torch._foreach_*`` kernels (``None``, the default: when the
            weights are on a CUDA device, as torch.optim decides) or one kernel per tensor (``False``).

    A param group may override ``ham_alpha`` / ``ham_beta``.
    """

    def __init__(
        self,
        base: Optimizer,
        alpha: float = 200.0,
        beta: float = 1e-3,
        *,
        clamp: float = 5.0,
        max_weight_norm: float | None = 1000.0,
        max_grad_norm: float | None = 20.0,
        foreach: bool | None = None,
    ):
        super().__init__(base)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"HAM {name} must be a finite number >= 0, got {value!r}")
        if not clamp > 0:
            raise ValueError(f"HAM clamp must be positive, got {clamp!r}")
        for name, value in (("max_weight_norm", max_weight_norm), ("max_grad_norm", max_grad_norm)):
            if value is not None and not value > 0:
                raise ValueError(f"HAM {name} must be positive or None, got {value!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.clamp = float(clamp)
        self.max_weight_norm = max_weight_norm
        self.max_grad_norm = max_grad_norm
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        self.base.step()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            weights = [p for p in with_grad if p.dim() >= 2]
            alpha = group.get("ham_alpha", self.alpha)
            beta = group.get("ham_beta", self.beta)
            ham_update_(weights, [p.grad for p in weights], float(group["lr"]), alpha, beta, self.clamp, self.foreach)
            if self.max_weight_norm is not None and with_grad:
                # Every parameter with a gradient, as the authors: biases and norm parameters too.
                norms = [p.norm() for p in with_grad]
                for p, n in zip(with_grad, norms):
                    p.mul_((self.max_weight_norm / n.clamp_min(1e-12)).clamp_max(1.0))
            if self.max_grad_norm is not None and with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, self.max_grad_norm, foreach=self.foreach)
        return loss

    def wrapper_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "clamp": self.clamp, "max_weight_norm": self.max_weight_norm,
                "max_grad_norm": self.max_grad_norm}

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        """A checkpoint continues only the HAM it was written by (as SparseOpt checks its own settings)."""
        for key, value in self.wrapper_state().items():
            if key in state and state[key] != value:  # a key an older checkpoint lacks is not checked
                raise ValueError(f"checkpoint was written with HAM {key}={state[key]}, this HAM has {key}={value}")
