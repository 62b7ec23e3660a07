"""The MLP of the paper's gradient experiment (appendix E.3): 784-64-10, optional normalization.

``hidden`` may list several widths (e.g. ``[256, 256]``); a norm layer follows every hidden Linear.
``groupnorm`` uses ``gcd(32, width)`` groups (32 as Wu & He, 2 neurons a group at width 64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

NORMS = ("none", "batchnorm", "layernorm", "groupnorm", "rmsnorm")


def make_norm(norm: str | Callable[[int], nn.Module], width: int) -> nn.Module | None:
    """The normalization layer named ``norm`` over ``width`` features (``None`` for ``"none"``).

    ``norm`` may also be a factory ``width -> module`` (a GroupNorm with other groups, say).
    """
    if callable(norm):
        return norm(width)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
    if norm == "rmsnorm" and not hasattr(nn, "RMSNorm"):
        raise ValueError("norm='rmsnorm' needs torch >= 2.4 (nn.RMSNorm)")
    return {
        "none": lambda: None,
        "batchnorm": lambda: nn.BatchNorm1d(width),
        "layernorm": lambda: nn.LayerNorm(width),
        "groupnorm": lambda: nn.GroupNorm(math.gcd(32, width), width),
        "rmsnorm": lambda: nn.RMSNorm(width),
    }[norm]()


class MLP(nn.Sequential):
    """Flatten -> [Linear -> norm -> ReLU] per hidden width -> Linear(classes)."""

    # Config keys the constructor reads (build_model passes them): parameter <- config key.
    config_options = {"hidden": "mlp_hidden", "norm": "mlp_norm"}

    def __init__(self, in_features: int = 784, hidden: int | Sequence[int] = 64, num_classes: int = 10,
                 norm: str | Callable[[int], nn.Module] = "batchnorm", in_shape: Sequence[int] | None = None):
        if in_shape is not None:  # (C, H, W) of the input: the flattened size
            in_features = math.prod(in_shape)
        if not callable(norm) and norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in widths:
            layers.append(nn.Linear(prev, width))
            if norm != "none":
                layers.append(make_norm(norm, width))
            layers.append(nn.ReLU())
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        super().__init__(*layers)
