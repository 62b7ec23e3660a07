"""The run configuration: one typed object of scalars, from defaults <- YAML file <- command line.

Every field can be set in a YAML config (``safe_load``) and overridden on the
command line as ``--field-name value`` (booleans: ``--flag`` / ``--no-flag``;
optional values accept ``none``). Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..data import DATASETS, FOLDER_DATASETS
from ..data.augment import AUGMENTS
from ..masks.distributions import DISTRIBUTIONS
from ..masks.maskset import INITS
from ..masks.structure import STRUCTURES
from ..models import MODELS
from ..models.mlp import NORMS as MLP_NORMS
from ..models.resnet_cifar import SHORTCUTS
from ..optim.presets import OPTIMIZER_PRESETS
from ..optim.scales import SCALE_SOURCES
from ..optim.sparseopt import LAYER_CHOICES
from ..registry import closest, did_you_mean, takes_keyword
from ..topology.scores import PRUNE_SCORES
from ..topology.updaters import DST_METHODS, GROWTH_GRADIENTS
from ..training_kernels import KERNEL_MODES

logger = logging.getLogger("sparseopt")

ROLES = ("method", "run", "runtime")
# Keys renamed since earlier versions: old name -> new name. The old names still work in configs, sweep files
# and flags (with a warning), and run folders written with them load, resume and report as before.
RENAMED_KEYS = {"renorm": "max_grad_norm", "growth_grad": "growth_gradient"}
# torch.compile's modes (torch.compile(mode=...)).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
NORMALIZATIONS = ("dataset", "computed", "none")  # --normalize (sparseopt.train.data)
# SparseOpt's options: they do nothing for an optimizer preset that does not precondition.
PRECONDITIONER_KEYS = ("precondition_layers", "scale_source", "scale_kwargs", "scale_ema", "undamped_growth")


def option(default: Any = dataclasses.MISSING, help: str | Callable[[], str] = "", *, factory: Callable[[], Any] | None = None,
           role: str = "method", choices: Callable[[], list[str]] | None = None):
    """A config field with its help, its role and (for names) where its allowed values come from.

    ``role``: ``method`` keys define what a run computes (a report groups runs by them; a resume must
    keep them), ``run`` keys tell runs of one method apart (the seed: kept on resume, not a group key),
    ``runtime`` keys change only how or where it runs (free to change on resume, not a group key).
    ``choices``: a function, so that names registered later (plugins) are allowed too.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
    metadata = {"help": help, "role": role, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _optimizer_help() -> str:
    return "; ".join(f"{p.name}: {p.help}" for _, p in OPTIMIZER_PRESETS.items())


def names(source, *, auto: bool = False, first: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> Callable[[], list[str]]:
    """The allowed values of a key, read from ``source`` when asked: a registry has grown once plugins are loaded."""
    return lambda: [*(("auto",) if auto else ()), *first, *(n for n in source if n not in skip)]


@dataclass
class TrainConfig:
    # -- data ------------------------------------------------------------------
    dataset: str = option(
        "bundled_mnist", "dataset (bundled_mnist: the real-MNIST subset shipped with the package)", choices=names(DATASETS))
    data_dir: str | None = option(
        None, "folder holding the dataset (CIFAR archive or folder, MNIST IDX files, ImageNet train/ and val/)", role="runtime")
    download: bool = option(
        False, "download the dataset into data_dir first (CIFAR, MNIST; checked against the official MD5)", role="runtime")
    train_subset: int | None = option(None, "use a fixed random subset of N training examples (quick runs)")
    test_subset: int | None = option(None, "evaluate on a fixed random subset of N test examples")
    workers: int | None = option(
        None, "decoding workers per rank for folder datasets (default: the CPUs shared by the local ranks, at most 8; CIFAR/MNIST live on the device)", role="runtime")
    num_classes: int | None = option(
        None, "model outputs (default: the dataset's classes; folder datasets: the class folders of train/); at least that many")
    image_size: int | None = option(None, "crop size of folder datasets (default 224)")
    augment: str = option(
        "auto", "training augmentation: none, flip, crop (pad 4 + random crop), crop_flip (CIFAR's), imagenet (random-resized "
        "crop + flip, folders only); auto: the dataset's own (none for MNIST, crop_flip for CIFAR, imagenet for ImageNet; "
        "folders: imagenet, or none for images under 96 px)", choices=names(AUGMENTS, auto=True))
    normalize: str = option(
        "auto", "input normalization: dataset (the named dataset's mean/std), computed (the training images' own, from a "
        "fixed sample, recorded in env.json), none (pixels / 255); auto: dataset, computed for imagefolder",
        choices=names(NORMALIZATIONS, auto=True))
    resize_size: int | None = option(
        None, "evaluation resize of folder datasets before the centre crop (default image_size * 256 / 224)")
    # -- model -------------------------------------------------------------------
    model: str = option("mlp", "model (CIFAR ResNets 20/32/56, ImageNet ResNet-50 v1.5, or the MLP)", choices=names(MODELS))
    shortcut: str = option(
        "B", "CIFAR ResNet shortcut: B = 1x1 conv + BN projection, A = parameter-free", choices=names(SHORTCUTS))
    mlp_hidden: list[int] = option(help="hidden widths of the MLP", factory=lambda: [64])
    mlp_norm: str = option("batchnorm", "normalization after each hidden layer of the MLP", choices=names(MLP_NORMS))
    model_kwargs: dict[str, Any] = option(
        help="further keyword arguments of the model's constructor (YAML mapping; flag: key=value ...), checked against its signature",
        factory=dict)
    # -- sparsity and DST ----------------------------------------------------------
    dst: str = option(
        "rigl", "dynamic sparse training method (dense: no masks; static: masks never change)", choices=names(DST_METHODS, first=("dense",)))
    dst_kwargs: dict[str, Any] = option(
        help="further keyword arguments of the DST method's class (YAML mapping; flag: key=value ...), checked against its signature",
        factory=dict)
    sparsity: float = option(0.9, "global sparsity S in [0, 1) over all masked weights")
    distribution: str = option("erk", "layer densities (erk as RigL)", choices=names(DISTRIBUTIONS, skip=("custom",)))
    power_scale: float = option(1.0, "ERK exponent (1 as RigL)")
    structure: str = option(
        "unstructured", "where active weights may be: unstructured, constant_fan_in (every neuron of a layer the same fan-in, SRigL), nm (N of every M inputs)", choices=names(STRUCTURES))
    nm: str | None = option(None, "N:M pattern of structure nm (e.g. 2:4; the sparsity must then be 1 - N/M)")
    neuron_ablation: float | None = option(
        None, "SRigL's gamma_sal for structure constant_fan_in: neurons with fewer than gamma * k salient inputs are ablated (0.3 in SRigL)")
    dense_first: bool = option(False, "keep the first conv/linear layer dense")
    dense_last: bool = option(False, "keep the last linear layer dense")
    init: str = option("dense", "dense (init then mask) or sparse (Evci et al. 2022 per-neuron fan-in)", choices=names(INITS))
    delta_t: int = option(100, "steps between topology updates")
    delta_t_batch: int | None = option(
        None, "batch size at which delta_t is given; delta_t is rescaled by delta_t_batch / batch_size (ImageNet recipe)")
    alpha: float = option(0.3, "initial drop fraction of the cosine schedule")
    t_end_fraction: float = option(0.75, "topology updates stop after this fraction of the training steps")
    growth_gradient: str = option(
        "original", "RigL growth from the original (raw) or the SparseOpt-corrected gradient", choices=names(GROWTH_GRADIENTS))
    keep_regrown: bool = option(
        True, "a connection dropped and regrown in the same update keeps its value and optimizer state")
    reset_optimizer_state: bool = option(True, "new connections start with zeroed optimizer moments")
    skip_update: bool = option(True, "skip the weight update of the step that changes the topology (reference RigL)")
    prune_score: str = option(
        "auto", "which active connections are dropped: magnitude (|w|), scaled (|w| / c_i), normalized (|w| / neuron RMS); auto: scaled for sparseopt (identical to magnitude for sgd), magnitude for sparseopt_paper", choices=names(PRUNE_SCORES, auto=True))
    # -- optimizer -------------------------------------------------------------------
    optimizer: str = option("sparseopt", _optimizer_help, choices=names(OPTIMIZER_PRESETS))
    precondition_layers: str = option(
        "auto", "which masked layers SparseOpt scales: normalized (those feeding a BN/LN/GN), all; auto: normalized for sparseopt, all for sparseopt_paper", choices=names(LAYER_CHOICES, auto=True))
    scale_weight_decay: bool = option(
        False, "scale weight decay with the gradient (an L2 term in the loss) instead of adding it after the scaling")
    scale_source: str = option(
        "auto", "SparseOpt's c_i from the following BatchNorm's running variance (bn_stats) or the fan-in (fan_in, the paper); auto: bn_stats for sparseopt, fan_in for sparseopt_paper", choices=names(SCALE_SOURCES, auto=True))
    scale_kwargs: dict[str, Any] = option(
        help="further keyword arguments of the scale source's class (YAML mapping; flag: key=value ...), checked against its signature",
        factory=dict)
    scale_ema: float = option(
        0.0, "exponential moving average of c_i over steps (0: c_i jumps at each mask update, as the paper)")
    undamped_growth: bool = option(False, "connections grown at the last update get max(c_i, 1) instead of c_i")
    max_grad_norm: float | None = option(
        None, "clip the global gradient norm to this value after SparseOpt's correction (gradient clipping; the paper's "
        "appendix F ablation; formerly renorm)")
    ham: bool = option(False, "wrap the optimizer in Hyperbolic Aware Minimization")
    ham_alpha: float = option(200.0, "HAM alpha")
    ham_beta: float = option(1e-3, "HAM beta (1e-3 ImageNet; 16e-3 CIFAR-100, reported, unverified)")
    lr: float = option(0.1, "peak learning rate (base lr when lr_batch_scaling)")
    lr_batch_scaling: bool = option(False, "peak lr = lr * batch_size / 256 (ImageNet recipe)")
    lr_min: float = option(0.0, "final learning rate of the cosine schedule")
    warmup_epochs: float = option(5.0, "linear warmup length in epochs (fractions allowed)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(5e-4, "weight decay of conv/linear weights (not biases and norm parameters)")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss")
    epochs: int = option(100, "training epochs")
    batch_size: int = option(128, "global batch size (split over ranks in distributed runs)")
    eval_batch_size: int = option(1000, "batch size of evaluation", role="runtime")
    # -- runtime ---------------------------------------------------------------------
    seed: int = option(0, "seed of masks, initialisation, data order and augmentation", role="run")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:<index>", role="runtime")
    bf16: bool = option(False, "bfloat16 autocast (GPU speed option; ignored on CPU)", role="runtime")
    channels_last: bool = option(
        False, "channels-last memory format (GPU speed option; ignored on CPU)", role="runtime")
    compile: bool = option(False, "torch.compile the model (GPU speed option; ignored on CPU)", role="runtime")
    compile_mode: str = option(
        "default", "torch.compile mode: reduce-overhead captures the step in CUDA graphs (small, launch-bound models)", role="runtime", choices=names(COMPILE_MODES))
    kernels: str = option(
        "masked", "masked: dense kernels on masked weights; sparse: the compiled sparse kernels for every masked Conv2d "
        "and Linear they take (CPU, float32); auto: per layer, the faster of the two on the first batch", role="runtime",
        choices=names(KERNEL_MODES))
    cudnn_benchmark: bool = option(True, "let cuDNN pick the fastest convolution algorithms", role="runtime")
    reuse_memory: bool = option(
        True, "single-process CPU runs: keep freed memory in the process for the next step (glibc malloc without mmap for large blocks "
        "and without trimming) instead of faulting fresh pages in every step; same numbers, faster steps, the "
        "process keeps its peak memory (sparseopt.memory)", role="runtime")
    sync_bn: bool = option(False, "SyncBatchNorm across ranks in distributed runs (CUDA only)", role="runtime")
    check_masks: bool = option(
        False, "check after every topology update that the masks and the weights agree bitwise across ranks", role="runtime")
    monitor: bool = option(
        True, "log neuron statistics per epoch and the loss around every topology update in metrics.jsonl", role="runtime")
    out: str | None = option(None, "run folder (default: runs/<run name>; for sparseopt demo, runs/default)", role="runtime")
    resume: bool = option(False, "continue the run in --out from its checkpoint", role="runtime")
    overwrite: bool = option(
        False, "replace the run in --out (only a sparseopt run folder is ever cleared)", role="runtime")
    quiet: bool = option(False, "no progress bar (the one-line epoch summaries stay)", role="runtime")
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)", role="runtime")
    wandb: bool = option(False, "also log to Weights & Biases (needs the wandb package)", role="runtime")
    compare_optimizers: bool = option(
        False, "train twice (optimizer=sgd and sparseopt, same seed) and write a comparison", role="runtime")

    # -- validation ------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise ValueError naming the bad value and what is allowed; nothing is written before this."""
        for name, allowed in field_choices().items():
            if getattr(self, name) not in allowed:
                value = getattr(self, name)
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}{did_you_mean(value, allowed)}")
        # The options of a component (sparsity, alpha, delta_t, scale_ema, max_grad_norm, neuron_ablation, the
        # N:M rule, a method's or a model's own options) are checked by the component itself: RunSpec.from_config.
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0 or none, got {self.workers!r}")
        for name in ("train_subset", "test_subset", "num_classes", "image_size", "resize_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {v!r}")
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "lr_min"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not 0.0 < self.t_end_fraction <= 1.0:
            raise ValueError(f"t_end_fraction must be in (0, 1], got {self.t_end_fraction!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device must be auto, cpu, cuda or cuda:<index> (any torch device), got {self.device!r}") from None
        if self.delta_t_batch is not None and self.delta_t_batch < 1:
            raise ValueError(f"delta_t_batch must be >= 1 or none (the batch size delta_t is given for), got {self.delta_t_batch!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        self._check_method_options()
        if self.augment == "imagenet" and self.dataset not in FOLDER_DATASETS:
            raise ValueError(f"augment=imagenet (random-resized crops of decoded images) is for image folders; "
                             f"{self.dataset} is held as tensors: use none, flip, crop or crop_flip")
        if self.nm is not None and self.structure != "nm":
            raise ValueError(f"nm={self.nm!r} needs structure=nm (got structure={self.structure!r})")
        if not self.mlp_hidden or any(h < 1 for h in self.mlp_hidden):
            raise ValueError(f"mlp_hidden must be a non-empty list of positive widths, got {self.mlp_hidden!r}")
        return self

    def _check_method_options(self) -> None:
        """Refuse options this method would ignore: recorded, they would split identical runs into report groups."""
        if self.dst == "dense" and self.optimizer != "sgd":
            raise ValueError(f"dst=dense has no masks to precondition, so optimizer={self.optimizer} means nothing there: "
                             "use --optimizer sgd (the default with --dst dense) or a sparse --dst")
        preset = OPTIMIZER_PRESETS[self.optimizer]
        defaults = TrainConfig.__dataclass_fields__
        if not preset.precondition:
            idle = [k for k in PRECONDITIONER_KEYS if getattr(self, k) not in (_default(defaults[k]), getattr(preset, k, None))]
            if self.growth_gradient != "original":
                idle.append("growth_gradient")
            if idle:
                settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in idle)
                raise ValueError(f"optimizer={self.optimizer} does not precondition, so {settings} would do nothing "
                                 f"(c_i = 1): leave {'it' if len(idle) == 1 else 'them'} at the default, or use "
                                 "--optimizer sparseopt")
        if self.dst != "dense":
            updater = DST_METHODS[self.dst]
            if self.growth_gradient != "original" and not takes_keyword(updater, "growth_gradient"):
                raise ValueError(f"growth_gradient={self.growth_gradient!r} chooses the gradient RigL grows by; "
                                 f"dst={self.dst} does not grow by a gradient: leave --growth-gradient at original")
        elif self.dst_kwargs:
            raise ValueError(f"dst=dense has no topology updater to take dst_kwargs {self.dst_kwargs!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}


def _default(field: dataclasses.Field) -> Any:
    """A field's default value, also for those made by a factory."""
    return field.default_factory() if field.default is dataclasses.MISSING else field.default




def keys_with_role(*roles: str) -> frozenset[str]:
    """The config keys whose ``role`` (see :func:`option`) is one of ``roles``."""
    return frozenset(f.name for f in fields(TrainConfig) if f.metadata["role"] in roles)


# Keys that may change between a run and its resume; every other key must match the run's saved config.
# (A CPU run records the GPU speed options as off: runtime keys, so resuming with them on is the same run.)
RESUMABLE_KEYS = keys_with_role("runtime")
# Keys that do not define a method: runs differing only in these are seeds of one group in a report.
NON_METHOD_KEYS = keys_with_role("run", "runtime")
# What a key meant in the runs written before it existed, where the default has changed since.
LEGACY_DEFAULTS = {"scale_source": "fan_in"}


@dataclass(frozen=True)
class KeyDifference:
    """One config key that makes a run another run: its saved and its present value."""

    key: str
    saved: Any
    now: Any

    def __str__(self) -> str:
        return f"{self.key}: saved {self.saved!r}, now {self.now!r}"


def config_differences(saved: dict[str, Any], now: dict[str, Any],
                       resolved: dict[str, Any] | None = None) -> list[KeyDifference]:
    """Every key that makes ``now`` another run than ``saved`` (``str()`` of one: ``"key: saved a, now b"``).

    A key missing from ``saved`` (written before the key existed) counts at its default. ``resolved``: what the
    saved run made of its ``"auto"`` keys; naming that value explicitly now is the same run.
    """
    saved = with_defaults(saved)
    resolved = resolved or {}

    def same(key: str) -> bool:
        old = saved[key]
        return old == now[key] or (old == "auto" and key in resolved and resolved[key] == now[key])

    return [KeyDifference(k, saved[k], now[k]) for k in now if k not in RESUMABLE_KEYS and not same(k)]


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with every key it lacks (written before the key existed) at what it meant then."""
    return {**TrainConfig().to_dict(), **LEGACY_DEFAULTS, **current_keys(saved)}


def current_keys(values: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """``values`` with renamed keys (:data:`RENAMED_KEYS`) under their new names.

    ``source``: where the values come from, for a warning per old name (None: a record written by an
    earlier version, read silently). Both names of one key in the same place is an error.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        new = RENAMED_KEYS.get(key)
        if new is not None:
            if new in values or new.replace("_", "-") in values:
                raise ValueError(f"{source or 'the config'} sets both {key!r} and its new name {new!r}; keep {new!r}")
            if source is not None:
                logger.warning("%s: config key %r is renamed %r (the old name still works)", source, key, new)
            key = new
        out[key] = value
    return out


def field_choices() -> dict[str, list[str]]:
    """The allowed values of every config key that takes one of a set of names (validation and ``--help``)."""
    return {f.name: f.metadata["choices"]() for f in fields(TrainConfig) if f.metadata["choices"] is not None}


def field_docs() -> dict[str, str]:
    """Each config key's help text, for ``--help``."""
    docs = {}
    for f in fields(TrainConfig):
        text = f.metadata["help"]
        docs[f.name] = " ".join((text() if callable(text) else text).split())
    return docs


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


def unknown_key_message(name: str, flag: bool = False) -> str:
    """One line for an unknown key: the closest valid one, or where the list of keys is."""
    match = closest(name.lstrip("-").replace("-", "_"), FIELDS)
    hint = "" if match is None else f" (did you mean {('--' + match.replace('_', '-')) if flag else match!r}?)"
    where = "`sparseopt train --help` lists them" if flag or hint else f"valid keys: {', '.join(sorted(FIELDS))}"
    return f"unknown {'option' if flag else 'config key'} {name!r}{hint}; {where}"


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML / command-line value to the field's type, or raise ValueError."""
    if name not in FIELDS:
        raise ValueError(unknown_key_message(name))
    tp, optional = _base_type(_field_type(name))
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    if typing.get_origin(tp) is dict:  # its own messages name the pair that is wrong
        return parse_mapping(name, value)
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


_KEY = re.compile(r"(?:^|(?<=[\s,]))([A-Za-z_][\w.-]*)=")  # where a key=value pair starts


def parse_mapping(name: str, value: Any) -> dict[str, Any]:
    """A mapping from YAML, or from the command line's ``key=value`` pairs.

    The pairs are separated by spaces or commas, and each value is read as YAML, so a value may be a
    flow list or mapping with commas of its own: ``in_shape=[1,28,28] hidden=[64,32]``.
    """
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if value is None:
        return {}
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"config key {name!r} takes a mapping or key=value pairs, got {value!r}")
    text = value if isinstance(value, str) else " ".join(map(str, value))
    starts = list(_KEY.finditer(text))
    if not starts or text[:starts[0].start()].strip(" ,"):
        first = (text[:starts[0].start()] if starts else text).strip(" ,").split()[0]
        raise ValueError(f"config key {name!r} takes key=value pairs, got {first!r}")
    out = {}
    for match, following in zip(starts, starts[1:] + [None]):
        key = match.group(1)
        raw = text[match.end():following.start() if following else len(text)].strip().rstrip(",").strip()
        try:
            out[key] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            raise ValueError(f"config key {name!r}: the value of {key!r} is not valid YAML ({raw!r}: "
                             f"{' '.join(str(getattr(e, 'problem', None) or e).split())})") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def make_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- ``base`` <- YAML ``file`` <- ``overrides``; every value type-checked."""
    values: dict[str, Any] = {}
    sources = ((base or {}, None), (load_yaml(file) if file else {}, f"config file {file}"), (overrides or {}, "the given options"))
    for source, where in sources:
        for key, value in current_keys(source, where if source else None).items():
            values[key] = coerce(key, value)
    # Dense training has nothing to precondition: there the optimizer defaults to the baseline's.
    if values.get("dst") == "dense" and "optimizer" not in values:
        values["optimizer"] = "sgd"
    return TrainConfig(**values)
