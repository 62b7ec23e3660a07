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
from ..masks.structure import STRUCTURES
from ..optim.sparseopt import SCALE_SOURCES
from ..topology.scores import PRUNE_SCORES

OPTIMIZERS = ("sgd", "sparseopt", "sparseopt_paper")


@dataclass
class TrainConfig:
    # -- data ------------------------------------------------------------------
    dataset: str = "bundled_mnist"
    """dataset (bundled_mnist: the real-MNIST subset shipped with the package)"""
    data_dir: str | None = None
    """folder holding the dataset (CIFAR archive or folder, MNIST IDX files, ImageNet train/ and val/)"""
    download: bool = False
    """download the dataset into data_dir first (CIFAR, MNIST; checked against the official MD5)"""
    train_subset: int | None = None
    """use a fixed random subset of N training examples (quick runs)"""
    test_subset: int | None = None
    """evaluate on a fixed random subset of N test examples"""
    workers: int | None = None
    """decoding workers per rank for folder datasets (default: the CPUs shared by the local ranks, at most 8; CIFAR/MNIST live on the device)"""
    num_classes: int | None = None
    """model outputs (default: the dataset's classes; folder datasets: the class folders of train/); at least that many"""
    image_size: int | None = None
    """crop size of folder datasets (default 224)"""
    resize_size: int | None = None
    """evaluation resize of folder datasets before the centre crop (default image_size * 256 / 224)"""
    # -- model -------------------------------------------------------------------
    model: str = "mlp"
    """model (CIFAR ResNets 20/32/56, ImageNet ResNet-50 v1.5, or the MLP)"""
    shortcut: str = "B"
    """CIFAR ResNet shortcut: B = 1x1 conv + BN projection, A = parameter-free"""
    mlp_hidden: list[int] = field(default_factory=lambda: [64])
    """hidden widths of the MLP"""
    mlp_norm: str = "batchnorm"
    """normalization after each hidden layer of the MLP"""
    # -- sparsity and DST ----------------------------------------------------------
    dst: str = "rigl"
    """dynamic sparse training method (dense: no masks; static: masks never change)"""
    sparsity: float = 0.9
    """global sparsity S in [0, 1) over all masked weights"""
    distribution: str = "erk"
    """layer densities (erk as RigL)"""
    power_scale: float = 1.0
    """ERK exponent (1 as RigL)"""
    structure: str = "unstructured"
    """where active weights may be: unstructured, constant_fan_in (every neuron of a layer the same fan-in, SRigL), nm (N of every M inputs)"""
    nm: str | None = None
    """N:M pattern of structure nm (e.g. 2:4; the sparsity must then be 1 - N/M)"""
    neuron_ablation: float | None = None
    """SRigL's gamma_sal for structure constant_fan_in: neurons with fewer than gamma * k salient inputs are ablated (0.3 in SRigL)"""
    dense_first: bool = False
    """keep the first conv/linear layer dense"""
    dense_last: bool = False
    """keep the last linear layer dense"""
    init: str = "dense"
    """dense (init then mask) or sparse (Evci et al. 2022 per-neuron fan-in)"""
    delta_t: int = 100
    """steps between topology updates"""
    delta_t_batch: int | None = None
    """batch size at which delta_t is given; delta_t is rescaled by delta_t_batch / batch_size (ImageNet recipe)"""
    alpha: float = 0.3
    """initial drop fraction of the cosine schedule"""
    t_end_fraction: float = 0.75
    """topology updates stop after this fraction of the training steps"""
    growth_grad: str = "original"
    """RigL growth from the original (raw) or the SparseOpt-corrected gradient"""
    keep_regrown: bool = True
    """a connection dropped and regrown in the same update keeps its value and optimizer state"""
    reset_optimizer_state: bool = True
    """new connections start with zeroed optimizer moments"""
    skip_update: bool = True
    """skip the weight update of the step that changes the topology (reference RigL)"""
    prune_score: str = "auto"
    """which active connections are dropped: magnitude (|w|), scaled (|w| / c_i), normalized (|w| / neuron RMS); auto: scaled for sparseopt (identical to magnitude for sgd), magnitude for sparseopt_paper"""
    # -- optimizer -------------------------------------------------------------------
    optimizer: str = "sparseopt"
    """sgd: masked DST baseline; sparseopt: preconditioned by BatchNorm statistics, with preconditioner-aware pruning (recommended); sparseopt_paper: as the paper describes it"""
    precondition_layers: str = "auto"
    """which masked layers SparseOpt scales: normalized (those feeding a BN/LN/GN), all; auto: normalized for sparseopt, all for sparseopt_paper"""
    scale_weight_decay: bool = False
    """scale weight decay with the gradient (an L2 term in the loss) instead of adding it after the scaling"""
    scale_source: str = "auto"
    """SparseOpt's c_i from the following BatchNorm's running variance (bn_stats) or the fan-in (fan_in, the paper); auto: bn_stats for sparseopt, fan_in for sparseopt_paper"""
    scale_ema: float = 0.0
    """exponential moving average of c_i over steps (0: c_i jumps at each mask update, as the paper)"""
    undamped_growth: bool = False
    """connections grown at the last update get max(c_i, 1) instead of c_i"""
    renorm: float | None = None
    """clip the global gradient norm to this value after the correction (appendix F)"""
    ham: bool = False
    """wrap the optimizer in Hyperbolic Aware Minimization"""
    ham_alpha: float = 200.0
    """HAM alpha"""
    ham_beta: float = 1e-3
    """HAM beta (1e-3 ImageNet; 16e-3 CIFAR-100, reported, unverified)"""
    lr: float = 0.1
    """peak learning rate (base lr when lr_batch_scaling)"""
    lr_batch_scaling: bool = False
    """peak lr = lr * batch_size / 256 (ImageNet recipe)"""
    lr_min: float = 0.0
    """final learning rate of the cosine schedule"""
    warmup_epochs: float = 5.0
    """linear warmup length in epochs (fractions allowed)"""
    momentum: float = 0.9
    """SGD momentum"""
    nesterov: bool = False
    """Nesterov momentum"""
    weight_decay: float = 5e-4
    """weight decay of conv/linear weights (not biases and norm parameters)"""
    label_smoothing: float = 0.0
    """label smoothing of the cross-entropy loss"""
    epochs: int = 100
    """training epochs"""
    batch_size: int = 128
    """global batch size (split over ranks in distributed runs)"""
    eval_batch_size: int = 1000
    """batch size of evaluation"""
    # -- runtime ---------------------------------------------------------------------
    seed: int = 0
    """seed of masks, initialisation, data order and augmentation"""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:<index>"""
    bf16: bool = False
    """bfloat16 autocast (GPU speed option; ignored on CPU)"""
    channels_last: bool = False
    """channels-last memory format (GPU speed option; ignored on CPU)"""
    compile: bool = False
    """torch.compile the model (GPU speed option; ignored on CPU)"""
    compile_mode: str = "default"
    """torch.compile mode: reduce-overhead captures the step in CUDA graphs (small, launch-bound models)"""
    cudnn_benchmark: bool = True
    """let cuDNN pick the fastest convolution algorithms"""
    sync_bn: bool = False
    """SyncBatchNorm across ranks in distributed runs (CUDA only)"""
    check_masks: bool = False
    """check after every topology update that the masks and the weights agree bitwise across ranks"""
    monitor: bool = True
    """log neuron statistics per epoch and the loss around every topology update in metrics.jsonl"""
    out: str | None = None
    """run folder (default runs/<run name>)"""
    resume: bool = False
    """continue the run in --out from its checkpoint"""
    overwrite: bool = False
    """replace the run in --out (only a sparseopt run folder is ever cleared)"""
    quiet: bool = False
    """no progress bar (the one-line epoch summaries stay)"""
    tensorboard: bool = False
    """also log to TensorBoard (needs the tensorboard package)"""
    wandb: bool = False
    """also log to Weights & Biases (needs the wandb package)"""
    compare_optimizers: bool = False
    """train twice (optimizer=sgd and sparseopt, same seed) and write a comparison"""

    # -- validation ------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise ValueError naming the bad value and what is allowed; nothing is written before this."""
        for name, allowed in field_choices().items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.scale_ema < 1.0:
            raise ValueError(f"scale_ema must be in [0, 1), got {self.scale_ema!r}")
        if not (0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "delta_t"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0 or none, got {self.workers!r}")
        for name in ("train_subset", "test_subset", "num_classes", "image_size", "resize_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {v!r}")
        for name in ("lr", "ham_alpha", "ham_beta", "weight_decay", "momentum", "warmup_epochs", "lr_min"):
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
        if self.dst == "dense" and self.optimizer != "sgd":
            raise ValueError("dst=dense has no masks to precondition: use --optimizer sgd (or a sparse --dst)")
        if self.neuron_ablation is not None and (self.structure != "constant_fan_in" or not 0 < self.neuron_ablation <= 1):
            raise ValueError(f"neuron_ablation must be in (0, 1] with structure=constant_fan_in, got "
                             f"{self.neuron_ablation!r} with structure={self.structure!r}")
        if self.nm is not None and self.structure != "nm":
            raise ValueError(f"nm={self.nm!r} needs structure=nm (got structure={self.structure!r})")
        if self.structure == "nm":
            from ..masks.structure import Structure

            density = Structure.parse("nm", self.nm).density
            if abs((1 - self.sparsity) - density) > 1e-9:
                raise ValueError(f"nm={self.nm} fixes the sparsity at {1 - density:g}: pass --sparsity {1 - density:g} "
                                 f"(got {self.sparsity:g})")
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


# Keys that may change between a run and its resume; every other key must match the run's saved config.
RESUMABLE_KEYS = {"out", "resume", "overwrite", "quiet", "tensorboard", "wandb", "workers", "data_dir", "download",
                  "compile", "compile_mode", "device", "eval_batch_size", "check_masks", "compare_optimizers", "monitor"}
# What a key meant in the runs written before it existed, where the default has changed since.
LEGACY_DEFAULTS = {"scale_source": "fan_in"}
# GPU speed options a CPU run records as off (the trainer ignores them there): not a change of method.
DEVICE_FALLBACK_KEYS = {"bf16", "channels_last", "compile", "sync_bn"}


def config_differences(saved: dict[str, Any], now: dict[str, Any], resolved: dict[str, Any] | None = None) -> list[str]:
    """``"key: saved a, now b"`` for every key that makes ``now`` another run than ``saved``.

    A key missing from ``saved`` (written before the key existed) counts at its default. ``resolved``: what the
    saved run made of its ``"auto"`` keys; naming that value explicitly now is the same run.
    """
    defaults = {**TrainConfig().to_dict(), **LEGACY_DEFAULTS}
    resolved = resolved or {}

    def same(key: str) -> bool:
        old = saved.get(key, defaults[key])
        return old == now[key] or (old == "auto" and key in resolved and resolved[key] == now[key])

    return [f"{k}: saved {saved.get(k, defaults[k])!r}, now {now[k]!r}" for k in now
            if k not in RESUMABLE_KEYS and k not in DEVICE_FALLBACK_KEYS and not same(k)]


def field_choices() -> dict[str, list[str]]:
    """The allowed values of every config key that takes one of a fixed set (validation and ``--help``)."""
    from ..data import DATASETS
    from ..models import MODELS
    from ..models.mlp import NORMS as MLP_NORMS
    from ..topology import DST_METHODS

    return {
        "dataset": list(DATASETS), "model": MODELS.names(), "dst": ["dense", *DST_METHODS], "optimizer": list(OPTIMIZERS),
        "distribution": [d for d in DISTRIBUTIONS if d != "custom"], "init": ["dense", "sparse"],
        "growth_grad": ["original", "corrected"], "structure": list(STRUCTURES), "precondition_layers": ["auto", "normalized", "all"],
        "prune_score": ["auto", *PRUNE_SCORES], "scale_source": ["auto", *SCALE_SOURCES], "shortcut": ["A", "B"],
        "mlp_norm": list(MLP_NORMS), "compile_mode": ["default", "reduce-overhead", "max-autotune"],
    }


def field_docs() -> dict[str, str]:
    """Each config key's docstring (the string literal under its field), for ``--help``."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
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
    for source in (base or {}, load_yaml(file) if file else {}, overrides or {}):
        for key, value in source.items():
            key = key.replace("-", "_")
            values[key] = coerce(key, value)
    return TrainConfig(**values)
