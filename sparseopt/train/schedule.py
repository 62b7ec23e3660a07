"""Learning-rate schedule of the paper's recipes (appendix E.2), as a pure function."""

from __future__ import annotations

import math

import torch


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float, lr_min: float = 0.0) -> float:
    """Linear warmup from ~0 to ``peak`` over ``warmup_steps``, then cosine decay to ``lr_min``.

    ``step`` is 0-based; the first step uses ``peak / warmup_steps`` and the
    last warmup step reaches ``peak``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return lr_min + 0.5 * (peak - lr_min) * (1.0 + math.cos(math.pi * progress))


def peak_lr(base_lr: float, batch_size: int, batch_scaling: bool) -> float:
    """ImageNet recipe: ``base_lr * batch / 256``; CIFAR: ``base_lr``."""
    return base_lr * batch_size / 256 if batch_scaling else base_lr


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, peak: float,
                            lr_min: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following :func:`warmup_cosine_lr` (the groups' ``lr`` must be ``peak``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_lr(step, total_steps, warmup_steps, peak, lr_min) / max(peak, 1e-30)
    )
