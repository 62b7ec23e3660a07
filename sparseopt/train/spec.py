"""The run spec: what a run is made of, in typed sections, each checked by the component it configures.

The flat :class:`~sparseopt.train.config.TrainConfig` stays the file format (config.yaml, flags and
sweep files keep their keys, and every run folder of an earlier version still reads); :class:`RunSpec`
is what a run is built from:

* ``model``: a :class:`~sparseopt.runs.ModelSpec` (the registry's constructor and its options);
* ``masks``: a :class:`MaskSection`, or None for a dense run (``dst: dense`` in the file);
* ``topology``: a :class:`TopologySection` with the updater *class* (``Static``, ``SET``, ``RigL`` or a
  plugin's) and its options, or None for a dense run;
* ``optimizer``: an :class:`OptimizerSection` with the preset and the options of SGD, HAM and SparseOpt,
  every ``auto`` resolved by the preset;
* ``data`` (:class:`DataSection`, all the data pipeline reads) and ``schedule`` (:class:`ScheduleSection`:
  epochs, the learning-rate schedule, label smoothing).

A rule about a component's options is written once, in that component's constructor. The sections are
checked by building the components once on a probe model (:mod:`sparseopt.probe`), so
``alpha``, ``delta_t``, ``neuron_ablation``, ``scale_ema``, ``max_grad_norm``, the N:M rule, HAM's and a
plugin's own options are refused with the component's own words before anything runs or is written.
Data, schedule and runtime keys have no component that checks them: the flat config's own checks are theirs,
and the runtime keys (device, logging, folders) are read from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..masks.maskset import MaskSet, sparsify
from ..masks.structure import Structure
from ..models import check_model_kwargs
from ..optim import HAM, SparseOpt
from ..optim.clip import ClipGradNorm
from ..optim.presets import OPTIMIZER_PRESETS, OptimizerPreset
from ..probe import check_by_building
from ..registry import check_keywords, takes_keyword
from ..runs import ModelSpec
from ..topology import DST_METHODS, TopologyUpdater
from .config import TrainConfig
from .schedule import peak_lr, warmup_cosine_scheduler

# The updater options the config sets itself, and the flag that sets each: not allowed in dst_kwargs.
TOPOLOGY_FLAGS = {"delta_t": "--delta-t", "alpha": "--alpha", "t_end": "--t-end-fraction", "total_steps": "--epochs",
                  "keep_regrown": "--keep-regrown", "reset_optimizer_state": "--reset-optimizer-state",
                  "skip_update": "--skip-update", "prune_score": "--prune-score", "seed": "--seed",
                  "growth_gradient": "--growth-gradient", "neuron_ablation": "--neuron-ablation",
                  "masks": "built by sparseopt", "optimizer": "built by sparseopt"}


def resolve_method(cfg: TrainConfig) -> dict[str, object]:
    """The optimizer-dependent settings of a run with every ``auto`` resolved by its preset."""
    preset = OPTIMIZER_PRESETS[cfg.optimizer].resolved()
    return {k: preset[k] if getattr(cfg, k, "auto") == "auto" else getattr(cfg, k) for k in preset}


def effective_delta_t(cfg: TrainConfig) -> int:
    """``delta_t`` rescaled to the run's batch when the config names a reference batch (ImageNet recipe)."""
    if cfg.delta_t_batch is None:
        return cfg.delta_t
    return max(1, round(cfg.delta_t * cfg.delta_t_batch / cfg.batch_size))


def _keys(section: type, cfg: TrainConfig) -> dict[str, Any]:
    """The config values a section's fields name (a section's fields are config keys)."""
    return {f.name: getattr(cfg, f.name) for f in fields(section)}


@dataclass(frozen=True)
class DataSection:
    """What the data pipeline reads (:func:`sparseopt.train.data.make_loaders` reads nothing else)."""

    dataset: str
    data_dir: str | None
    download: bool
    train_subset: int | None
    test_subset: int | None
    num_classes: int | None
    image_size: int | None
    resize_size: int | None
    augment: str
    normalize: str
    workers: int | None
    batch_size: int
    eval_batch_size: int
    seed: int
    channels_last: bool


@dataclass(frozen=True)
class ScheduleSection:
    """How long and how fast: epochs, the learning-rate schedule (warmup, cosine) and the loss's smoothing."""

    epochs: int
    batch_size: int
    lr: float
    lr_batch_scaling: bool
    lr_min: float
    warmup_epochs: float
    label_smoothing: float

    @property
    def peak_lr(self) -> float:
        return peak_lr(self.lr, self.batch_size, self.lr_batch_scaling)

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return round(self.warmup_epochs * steps_per_epoch)

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        return warmup_cosine_scheduler(optimizer, self.epochs * steps_per_epoch, self.warmup_steps(steps_per_epoch),
                                       self.peak_lr, self.lr_min)


@dataclass(frozen=True)
class MaskSection:
    """Which weights are masked and how the masks are drawn (:func:`sparseopt.sparsify`'s options)."""

    sparsity: float
    distribution: str
    structure: Structure
    power_scale: float = 1.0
    dense_first: bool = False
    dense_last: bool = False
    init: str = "dense"

    def build(self, model: nn.Module, seed: int) -> MaskSet:
        return sparsify(model, self.sparsity, self.distribution, power_scale=self.power_scale,
                        dense_first=self.dense_first, dense_last=self.dense_last, init=self.init,
                        generator=torch.Generator().manual_seed(seed), structure=self.structure)


@dataclass(frozen=True)
class TopologySection:
    """The topology updater: its class (``Static``, whose ``dynamic`` is False, or a DST method) and its options."""

    name: str
    updater: type[TopologyUpdater]
    options: dict[str, Any]  # what the config sets (delta_t, alpha, ...), kept when the class takes it
    t_end_fraction: float
    extra: dict[str, Any] = field(default_factory=dict)  # dst_kwargs: the class's further options

    def build(self, masks: MaskSet, optimizer: torch.optim.Optimizer, total_steps: int) -> TopologyUpdater:
        timing = dict(t_end=max(1, int(self.t_end_fraction * total_steps)), total_steps=total_steps)
        taken = {k: v for k, v in {**self.options, **timing}.items() if takes_keyword(self.updater, k)}
        try:
            return self.updater(masks, optimizer, **taken, **self.extra)
        except (TypeError, ValueError) as e:  # a plugin's own conversion (float("abc")) names neither option nor method
            given = ", ".join(f"{k}={v!r}" for k, v in self.extra.items())
            raise ValueError(f"dst {self.name!r} ({self.updater.__name__})"
                             f"{f' with --dst-kwargs {given}' if given else ''}: {e}") from None


@dataclass(frozen=True)
class OptimizerSection:
    """The optimizer chain ``SparseOpt(HAM(SGD))`` (HAM optional; dense runs: ``SGD`` or ``HAM(SGD)``, clipped)."""

    preset: OptimizerPreset
    momentum: float
    nesterov: bool
    weight_decay: float
    ham: dict[str, float] | None  # HAM's alpha and beta, or None without HAM
    max_grad_norm: float | None
    sparseopt: dict[str, Any]  # SparseOpt's options, every "auto" resolved by the preset

    def base(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for p in model.parameters():
            # Weight decay on conv/linear weights only, not on biases and norm parameters.
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            [g for g in groups if g["params"]], lr=lr, momentum=self.momentum,
            nesterov=self.nesterov and self.momentum > 0)
        return HAM(optimizer, **self.ham) if self.ham is not None else optimizer

    def build(self, model: nn.Module, masks: MaskSet | None, lr: float) -> torch.optim.Optimizer:
        optimizer = self.base(model, lr)
        if masks is None:
            return optimizer if self.max_grad_norm is None else ClipGradNorm(optimizer, self.max_grad_norm)
        return SparseOpt(optimizer, masks, max_grad_norm=self.max_grad_norm, preset=self.preset.name, **self.sparseopt)


@dataclass(frozen=True)
class RunSpec:
    """A run, as the sections it is built from; ``config`` is the flat record it came from (names, files)."""

    config: TrainConfig
    data: DataSection
    model: ModelSpec
    masks: MaskSection | None
    topology: TopologySection | None
    optimizer: OptimizerSection
    schedule: ScheduleSection

    @property
    def dense(self) -> bool:
        return self.masks is None

    @classmethod
    def from_config(cls, cfg: TrainConfig, check: bool = True) -> RunSpec:
        """The sections of ``cfg``, checked by their components unless ``check`` is False (a config already run)."""
        method = resolve_method(cfg)
        optimizer = OptimizerSection(
            preset=OPTIMIZER_PRESETS[cfg.optimizer], momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay, ham={"alpha": cfg.ham_alpha, "beta": cfg.ham_beta} if cfg.ham else None,
            max_grad_norm=cfg.max_grad_norm,
            sparseopt=dict(precondition=method["precondition"], layers=method["precondition_layers"],
                           scale_weight_decay=cfg.scale_weight_decay, scale_source=method["scale_source"],
                           scale_kwargs=dict(cfg.scale_kwargs), scale_ema=cfg.scale_ema,
                           undamped_growth=cfg.undamped_growth))
        masks = topology = None
        if cfg.dst != "dense":
            masks = MaskSection(cfg.sparsity, cfg.distribution, Structure.parse(cfg.structure, cfg.nm), cfg.power_scale,
                                cfg.dense_first, cfg.dense_last, cfg.init)
            updater = DST_METHODS[cfg.dst]
            check_keywords(updater, cfg.dst_kwargs, f"dst {cfg.dst!r} ({updater.__name__})",
                           reserved={k: f"set by {flag}" for k, flag in TOPOLOGY_FLAGS.items()})
            options = dict(delta_t=effective_delta_t(cfg), alpha=cfg.alpha, keep_regrown=cfg.keep_regrown,
                           reset_optimizer_state=cfg.reset_optimizer_state, skip_update=cfg.skip_update,
                           prune_score=method["prune_score"], seed=cfg.seed, growth_gradient=cfg.growth_gradient,
                           neuron_ablation=cfg.neuron_ablation)
            topology = TopologySection(cfg.dst, updater, options, cfg.t_end_fraction, dict(cfg.dst_kwargs))
        spec = cls(cfg, DataSection(**_keys(DataSection, cfg)), ModelSpec.from_config(cfg.to_dict()), masks, topology,
                   optimizer, ScheduleSection(**_keys(ScheduleSection, cfg)))
        if check:
            spec.check()
        return spec

    def check(self) -> None:
        """Build every component once on a probe model: each refuses its own bad options, in its own words."""
        check_model_kwargs(self.model.name, self.config.model_kwargs)  # the user's own options, beside the flags'
        check_by_building(
            self.masks.structure if self.masks is not None else None,
            None if self.masks is None else lambda model: self.masks.build(model, seed=0),
            lambda model, masks: self.optimizer.build(model, masks, lr=0.1),
            None if self.topology is None else self.topology.build)
