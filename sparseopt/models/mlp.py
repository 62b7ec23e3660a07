"""The MLP of the paper's gradient experiment (appendix E.3): 784-64-10, optional BatchNorm / LayerNorm."""

from __future__ import annotations

from torch import nn

NORMS = ("none", "batchnorm", "layernorm")


class MLP(nn.Sequential):
    """Flatten -> Linear(in, hidden) -> [norm] -> ReLU -> Linear(hidden, classes)."""

    def __init__(self, in_features: int = 784, hidden: int = 64, num_classes: int = 10, norm: str = "batchnorm"):
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, hidden)]
        if norm == "batchnorm":
            layers.append(nn.BatchNorm1d(hidden))
        elif norm == "layernorm":
            layers.append(nn.LayerNorm(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, num_classes)]
        super().__init__(*layers)
