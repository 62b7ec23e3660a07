"""An example sparseopt plugin (docs/plugins.md): three extensions registered from outside the package.

* ``--dst momentum``: grows where a moving average of the dense gradient is largest and moves
  regrowth between layers by their mean momentum, as Sparse Momentum (Dettmers & Zettlemoyer 2019)
  does; its own option ``beta`` is set with ``--dst-kwargs beta=0.95`` or ``dst_kwargs: {beta: 0.95}``.
* ``--scale-source fan_in_quarter``: SparseOpt with ``c_i = (n_i / n_avg) ** 0.25``.
* ``--model vgg_bn``: a small VGG with BatchNorm, with its own option ``width``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparseopt import DST_METHODS, MODELS, DSTUpdater
from sparseopt.optim import SCALE_SOURCES, ScaleSource
from sparseopt.topology.updaters import LayerPlan


class SparseMomentum(DSTUpdater):
    """Growth by an exponential moving average of the dense gradient; regrowth shared by mean momentum."""

    def __init__(self, masks, optimizer=None, *, beta: float = 0.9, **kwargs):
        super().__init__(masks, optimizer, **kwargs)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self.momentum = [torch.zeros_like(w) for w in masks.weights]

    def step(self) -> bool:
        for m, w in zip(self.momentum, self.masks.weights):  # the dense gradient, before the optimizer masks it
            if w.grad is not None:
                m.mul_(self.beta).add_(w.grad, alpha=1.0 - self.beta)
        return super().step()

    def plan(self, fraction, counts):
        drops = [int(fraction * c) for c in counts]
        # Each layer's share of the regrowth: its mean momentum magnitude over its active weights.
        weight = [float((m.abs() * mask).sum()) / max(c, 1) for m, mask, c in zip(self.momentum, self.masks.masks, counts)]
        total, norm = sum(drops), sum(weight) or 1.0
        room = [mask.numel() - c + d for mask, c, d in zip(self.masks.masks, counts, drops)]
        grows = [min(r, math.floor(total * w / norm)) for r, w in zip(room, weight)]
        for i in sorted(range(len(grows)), key=lambda i: -weight[i]):  # what rounding and full layers left over
            extra = min(total - sum(grows), room[i] - grows[i])
            grows[i] += max(0, extra)
        return [LayerPlan(d, g) for d, g in zip(drops, grows)]

    def grow_scores(self, index, layer):
        return self.momentum[index].abs()

    def config(self):
        return {**super().config(), "beta": self.beta}

    def state_dict(self):
        return {**super().state_dict(), "momentum": [m.clone() for m in self.momentum]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for m, saved in zip(self.momentum, state["momentum"]):
            m.copy_(saved)


class QuarterPowerFanIn(ScaleSource):
    """``c_i = (n_i / n_avg) ** power``: by default 0.25, half the paper's correction in log space.

    ``power`` is an option (``SparseOpt(scale_kwargs={"power": 0.5})``, ``--scale-kwargs power=0.5``).
    """

    name = "fan_in_quarter"

    def __init__(self, power: float = 0.25):
        self.power = float(power)

    def scales(self, inputs, process_group=None):
        return [x.fan_in_scale.pow(2 * self.power) for x in inputs]  # fan_in_scale is (n_i / n_avg) ** 0.5


def vgg_bn(num_classes: int = 10, in_shape=(3, 32, 32), width: int = 32) -> nn.Module:
    """conv-BN-ReLU x2, pool, conv-BN-ReLU x2, pool, linear: a small VGG for 28-32 pixel images."""
    c = in_shape[0]

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(c, width), *block(width, width), nn.MaxPool2d(2),
                         *block(width, 2 * width), *block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(2 * width, num_classes))


def register() -> None:
    """Called once by sparseopt's command line (entry point group ``sparseopt.plugins``)."""
    DST_METHODS.register("momentum", SparseMomentum)
    SCALE_SOURCES.register("fan_in_quarter", QuarterPowerFanIn)
    MODELS.register("vgg_bn", vgg_bn)
