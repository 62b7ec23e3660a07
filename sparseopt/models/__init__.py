"""Model zoo of the paper's recipes; any ``nn.Module`` works through the Python API."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..registry import Registry, accepts, check_keywords
from .mlp import MLP
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet56
from .resnet_imagenet import ResNet50, resnet50

# name -> constructor(num_classes=..., **kwargs). A new model is one call, MODELS.register("mine", fn); it is then
# a choice of --model. build_model passes num_classes, and in_shape when the constructor's signature names it.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
for _name, _fn in (("resnet20", resnet20), ("resnet32", resnet32), ("resnet56", resnet56), ("resnet50", resnet50),
                   ("mlp", MLP)):
    MODELS.register(_name, _fn)


def config_options(constructor) -> dict[str, str]:
    """Constructor parameter -> the config key it is set from (``constructor.config_options``; none by default)."""
    return dict(getattr(constructor, "config_options", {}))


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...] | None = None, **kwargs) -> nn.Module:
    """Build a registered model by name; ``in_shape`` (C, H, W) goes to constructors that take it."""
    constructor = MODELS[name]  # ValueError listing the registered models
    check_keywords(constructor, kwargs, f"model {name!r}", reserved={"num_classes": "set by the dataset or --num-classes"})
    if in_shape is not None and accepts(constructor, "in_shape"):
        kwargs.setdefault("in_shape", tuple(in_shape))
    return constructor(num_classes=num_classes, **kwargs)


__all__ = ["MLP", "MODELS", "CifarResNet", "ResNet50", "build_model", "config_options", "resnet20", "resnet32", "resnet50",
           "resnet56"]
