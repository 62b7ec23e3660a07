"""The run configuration: one typed object of scalars, from defaults <- YAML file <- command line.

Every field can be set in a YAML config (``safe_load``) and overridden on the
command line as ``--field-name value`` (booleans: ``--flag`` / ``--no-flag``;
optional values accept ``none``). Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..masks.distributions import DISTRIBUTIONS

DST_METHODS = ("dense", "static", "set", "rigl")
OPTIMIZERS = ("sgd", "sparseopt")


@dataclass
class TrainConfig:
    # -- data ------------------------------------------------------------------
    dataset: str = "bundled_mnist"
    """mnist, fashion_mnist, cifar10, cifar100, imagenet, or bundled_mnist (shipped subset)"""
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    """use a fixed random subset of N training examples (quick runs)"""
    test_subset: int | None = None
    workers: int = 8
    """decoding workers (ImageNet only; CIFAR/MNIST live on the device)"""
    # -- model -------------------------------------------------------------------
    model: str = "mlp"
    """resnet20, resnet32, resnet56, resnet50, mlp"""
    shortcut: str = "B"
    """CIFAR ResNet shortcut: B = 1x1 conv + BN projection, A = parameter-free"""
    mlp_hidden: list[int] = field(default_factory=lambda: [64])
    mlp_norm: str = "batchnorm"
    # -- sparsity and DST ----------------------------------------------------------
    dst: str = "rigl"
    """dense, static, set, rigl"""
    sparsity: float = 0.9
    distribution: str = "erk"
    power_scale: float = 1.0
    dense_first: bool = False
    dense_last: bool = False
    init: str = "dense"
    """dense (init then mask) or sparse (Evci et al. 2022 per-neuron fan-in)"""
    delta_t: int = 100
    delta_t_batch: int | None = None
    """batch size at which delta_t is given; delta_t is rescaled by delta_t_batch / batch_size (ImageNet recipe)"""
    alpha: float = 0.3
    t_end_fraction: float = 0.75
    growth_grad: str = "original"
    """RigL growth from the original (raw) or the SparseOpt-corrected gradient"""
    keep_regrown: bool = True
    reset_optimizer_state: bool = True
    skip_update: bool = True
    # -- optimizer -------------------------------------------------------------------
    optimizer: str = "sparseopt"
    """sgd (masked DST baseline) or sparseopt (preconditioned)"""
    precondition_layers: str = "all"
    """all or normalized (only layers feeding a BN/LN/GN)"""
    scale_weight_decay: bool = False
    renorm: float | None = None
    """clip the global gradient norm to this value after the correction (appendix F)"""
    ham: bool = False
    ham_alpha: float = 200.0
    ham_beta: float = 1e-3
    lr: float = 0.1
    lr_batch_scaling: bool = False
    """peak lr = lr * batch_size / 256 (ImageNet recipe)"""
    lr_min: float = 0.0
    warmup_epochs: float = 5.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    epochs: int = 100
    batch_size: int = 128
    """global batch size (split over ranks in distributed runs)"""
    eval_batch_size: int = 1000
    # -- runtime ---------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = True
    sync_bn: bool = False
    check_masks: bool = False
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    tensorboard: bool = False
    wandb: bool = False
    compare_optimizers: bool = False
    """train twice (optimizer=sgd and sparseopt, same seed) and write a comparison"""

    # -- validation ------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise ValueError naming the bad value and what is allowed; nothing is written before this."""
        from ..data import DATASETS
        from ..models import MODELS

        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

        choice("dataset", DATASETS)
        choice("model", MODELS)
        choice("dst", DST_METHODS)
        choice("optimizer", OPTIMIZERS)
        choice("distribution", [d for d in DISTRIBUTIONS if d != "custom"])
        choice("init", ("dense", "sparse"))
        choice("growth_grad", ("original", "corrected"))
        choice("precondition_layers", ("all", "normalized"))
        choice("shortcut", ("A", "B"))
        choice("mlp_norm", ("none", "batchnorm", "layernorm"))
        if not (0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "delta_t"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("train_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {v!r}")
        for name in ("lr", "ham_alpha", "ham_beta", "weight_decay", "momentum", "warmup_epochs", "lr_min", "workers"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha (drop fraction) must be in [0, 1], got {self.alpha!r}")
        if not 0.0 < self.t_end_fraction <= 1.0:
            raise ValueError(f"t_end_fraction must be in (0, 1], got {self.t_end_fraction!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.renorm is not None and not self.renorm > 0:
            raise ValueError(f"renorm must be > 0 or none, got {self.renorm!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.dst == "dense" and self.optimizer == "sparseopt":
            raise ValueError("dst=dense has no masks to precondition: use --optimizer sgd (or a sparse --dst)")
        if not self.mlp_hidden or any(h < 1 for h in self.mlp_hidden):
            raise ValueError(f"mlp_hidden must be a non-empty list of positive widths, got {self.mlp_hidden!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method(self) -> dict[str, Any]:
        """The fields a report groups runs by."""
        return {k: getattr(self, k) for k in ("dataset", "model", "dst", "optimizer", "ham", "renorm", "growth_grad",
                                               "sparsity", "epochs", "seed")}


FIELDS = {f.name: f for f in fields(TrainConfig)}


def _field_type(name: str):
    hints = typing.get_type_hints(TrainConfig)
    return hints[name]


def _base_type(tp):
    """(base scalar type or list, optional?) of an annotation like ``float | None`` or ``list[int]``."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in args if a is not type(None))
    return tp, optional


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML / command-line value to the field's type, or raise ValueError."""
    if name not in FIELDS:
        raise ValueError(f"unknown config key {name!r}; valid keys: {', '.join(sorted(FIELDS))}")
    tp, optional = _base_type(_field_type(name))
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    try:
        if typing.get_origin(tp) is list:
            (inner,) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            return [inner(v) for v in value]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {name!r} expects {tp.__name__ if hasattr(tp, '__name__') else tp}"
                         f"{' or none' if optional else ''}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def make_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- ``base`` <- YAML ``file`` <- ``overrides``; every value type-checked."""
    values: dict[str, Any] = {}
    for source in (base or {}, load_yaml(file) if file else {}, overrides or {}):
        for key, value in source.items():
            key = key.replace("-", "_")
            values[key] = coerce(key, value)
    return TrainConfig(**values)
