"""Model zoo of the paper's recipes; any ``nn.Module`` works through the Python API."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .mlp import MLP
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet56
from .resnet_imagenet import ResNet50, resnet50

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet50": resnet50,
    "mlp": MLP,
}


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...] | None = None, **kwargs) -> nn.Module:
    """Build a registered model by name. ``in_shape`` (C, H, W) sizes the MLP input."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name == "mlp":
        if in_shape is not None:
            n = 1
            for d in in_shape:
                n *= d
            kwargs.setdefault("in_features", n)
        return MLP(num_classes=num_classes, **kwargs)
    return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["MLP", "MODELS", "CifarResNet", "ResNet50", "build_model", "resnet20", "resnet32", "resnet50", "resnet56"]
