"""Model zoo of the paper's recipes; any ``nn.Module`` works through the Python API."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..registry import Registry
from .mlp import MLP
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet56
from .resnet_imagenet import ResNet50, resnet50

# name -> constructor(num_classes=..., **kwargs). A new model is one call, MODELS.register("mine", fn);
# it is then a choice of --model (the CLI passes num_classes; CIFAR ResNets also take shortcut=).
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
for _name, _fn in (("resnet20", resnet20), ("resnet32", resnet32), ("resnet56", resnet56), ("resnet50", resnet50),
                   ("mlp", MLP)):
    MODELS.register(_name, _fn)


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...] | None = None, **kwargs) -> nn.Module:
    """Build a registered model by name. ``in_shape`` (C, H, W) sizes the MLP input."""
    constructor = MODELS[name]  # ValueError listing the registered models
    if name == "mlp":
        if in_shape is not None:
            n = 1
            for d in in_shape:
                n *= d
            kwargs.setdefault("in_features", n)
        return MLP(num_classes=num_classes, **kwargs)
    return constructor(num_classes=num_classes, **kwargs)


__all__ = ["MLP", "MODELS", "CifarResNet", "ResNet50", "build_model", "resnet20", "resnet32", "resnet50", "resnet56"]
