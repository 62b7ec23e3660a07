"""The MLP of the paper's gradient experiment (appendix E.3): 784-64-10, optional BatchNorm / LayerNorm.

``hidden`` may list several widths (e.g. ``[256, 256]``); a norm layer follows every hidden Linear.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

NORMS = ("none", "batchnorm", "layernorm")


class MLP(nn.Sequential):
    """Flatten -> [Linear -> norm -> ReLU] per hidden width -> Linear(classes)."""

    def __init__(self, in_features: int = 784, hidden: int | Sequence[int] = 64, num_classes: int = 10, norm: str = "batchnorm"):
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in widths:
            layers.append(nn.Linear(prev, width))
            if norm == "batchnorm":
                layers.append(nn.BatchNorm1d(width))
            elif norm == "layernorm":
                layers.append(nn.LayerNorm(width))
            layers.append(nn.ReLU())
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        super().__init__(*layers)
