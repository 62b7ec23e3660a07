"""Model zoo of the paper's recipes; any ``nn.Module`` works through the Python API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ModelDefaults:
    """What a model is made for, as timm's pretrained configs say it: its input, its class count, its dataset."""

    in_shape: tuple[int, int, int]
    num_classes: int
    dataset: str


# name -> ModelDefaults: read where no dataset decides (benchmarks, synthetic models); a model registered
# without one is taken as CIFAR-sized. A plugin registers its own beside its constructor.
MODEL_DEFAULTS: Registry[ModelDefaults] = Registry("model defaults")
for _name in ("resnet20", "resnet32", "resnet56"):
    MODEL_DEFAULTS.register(_name, ModelDefaults((3, 32, 32), 10, "cifar10"))
MODEL_DEFAULTS.register("resnet50", ModelDefaults((3, 224, 224), 1000, "imagenet"))
MODEL_DEFAULTS.register("mlp", ModelDefaults((1, 28, 28), 10, "mnist"))
CIFAR_SIZED = ModelDefaults((3, 32, 32), 10, "cifar10")


def model_defaults(name: str) -> ModelDefaults:
    """The input shape, class count and dataset a registered model is made for."""
    MODELS[name]  # noqa: B018 - ValueError listing the registered models
    return MODEL_DEFAULTS.get(name, CIFAR_SIZED)


def config_options(constructor) -> dict[str, str]:
    """Constructor parameter -> the config key it is set from (``constructor.config_options``; none by default)."""
    return dict(getattr(constructor, "config_options", {}))


def check_model_kwargs(name: str, kwargs: dict, *, user: bool = True) -> None:
    """Refuse options the model's constructor does not take ("did you mean"), and those set elsewhere.

    ``user``: ``kwargs`` are the user's further options (``--model-kwargs``), which may not set what the
    dataset (``num_classes``, ``in_shape``) or a flag of the model's own (``config_options``) sets.
    """
    constructor = MODELS[name]  # ValueError listing the registered models
    reserved = {"num_classes": "set by the dataset or --num-classes"}
    if user:
        reserved["in_shape"] = "set by the dataset"
        reserved.update({p: f"set by --{k.replace('_', '-')}" for p, k in config_options(constructor).items()})
    check_keywords(constructor, kwargs, f"model {name!r}", reserved=reserved)


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...] | None = None, **kwargs) -> nn.Module:
    """Build a registered model by name; ``in_shape`` (C, H, W) goes to constructors that take it."""
    check_model_kwargs(name, kwargs, user=False)
    constructor = MODELS[name]
    if in_shape is not None and accepts(constructor, "in_shape"):
        kwargs.setdefault("in_shape", tuple(in_shape))
    return constructor(num_classes=num_classes, **kwargs)


__all__ = ["MLP", "MODELS", "MODEL_DEFAULTS", "ModelDefaults", "check_model_kwargs", "model_defaults", "CifarResNet", "ResNet50", "build_model", "config_options", "resnet20", "resnet32", "resnet50",
           "resnet56"]
