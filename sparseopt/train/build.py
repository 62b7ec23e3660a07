"""From a config to the objects of a run: model, masks, optimizer chain, topology updater.

The optimizer chain is ``SparseOpt(HAM(SGD))`` (HAM optional): SparseOpt
corrects the gradient, HAM's base step runs (SGD with momentum), then HAM's
hyperbolic step, then SparseOpt re-applies the masks. ``optimizer=sgd`` builds
the same chain with ``precondition=False``, so baseline and SparseOpt differ in
that one switch (the recommended SparseOpt also prunes by ``|w| / c_i``, which is
plain magnitude pruning for the baseline, whose ``c_i`` are 1). Dense runs have no masks: ``SGD`` or ``HAM(SGD)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..data import DATASETS, FOLDER_DATASETS
from ..masks.maskset import MaskSet, sparsify
from ..models import build_model
from ..optim import HAM, SparseOpt
from ..topology import DST_METHODS, Static
from .config import TrainConfig


@dataclass
class RunObjects:
    model: nn.Module
    masks: MaskSet | None
    optimizer: torch.optim.Optimizer
    topology: Static | None


@dataclass(frozen=True)
class ModelSpec:
    """What :func:`sparseopt.models.build_model` needs to rebuild a run's model (recorded in sparse exports)."""

    name: str
    num_classes: int
    in_shape: tuple[int, ...]
    kwargs: dict

    def build(self) -> nn.Module:
        return build_model(self.name, self.num_classes, in_shape=self.in_shape, **self.kwargs)


def model_spec(cfg: TrainConfig, num_classes: int | None = None) -> ModelSpec:
    """The config's model with ``num_classes`` outputs (default: the dataset's own count)."""
    info = DATASETS[cfg.dataset]
    num_classes = num_classes if num_classes is not None else info.num_classes
    in_shape = info.in_shape
    if cfg.dataset in FOLDER_DATASETS:
        size = cfg.image_size or in_shape[1]
        in_shape = (in_shape[0], size, size)
    kwargs = {}
    if cfg.model == "mlp":
        kwargs = {"hidden": list(cfg.mlp_hidden), "norm": cfg.mlp_norm}
    elif cfg.model != "resnet50":
        kwargs = {"shortcut": cfg.shortcut}
    return ModelSpec(cfg.model, num_classes, tuple(in_shape), kwargs)


def make_model(cfg: TrainConfig, num_classes: int | None = None) -> nn.Module:
    """The config's model with ``num_classes`` outputs (default: the dataset's own count)."""
    return model_spec(cfg, num_classes).build()


# SparseOpt as the paper describes it, and as this library recommends: the paper's magnitude pruning lets the
# preconditioner starve low-fan-in neurons until they die; pruning by |w| / c_i does not; c_i read from
# BatchNorm's running variance led or tied the baseline in every comparison, the fan-in c_i did not (docs/results.md).
PAPER_SPARSEOPT = {"precondition_layers": "all", "prune_score": "magnitude", "scale_source": "fan_in"}
RECOMMENDED_SPARSEOPT = {"precondition_layers": "normalized", "prune_score": "scaled", "scale_source": "bn_stats"}


def resolve_method(cfg: TrainConfig) -> dict[str, object]:
    """The optimizer-dependent settings of a run with every ``auto`` resolved."""
    preset = PAPER_SPARSEOPT if cfg.optimizer == "sparseopt_paper" else RECOMMENDED_SPARSEOPT
    # For the baseline c_i = 1, so |w| / c_i is |w|: "auto" gives it plain magnitude pruning either way.
    prune = cfg.prune_score if cfg.prune_score != "auto" else ("magnitude" if cfg.optimizer == "sgd" else preset["prune_score"])
    layers = cfg.precondition_layers if cfg.precondition_layers != "auto" else preset["precondition_layers"]
    # The baseline applies no scale; "fan_in" keeps its runs grouped with those recorded before "auto" existed.
    source = cfg.scale_source if cfg.scale_source != "auto" else ("fan_in" if cfg.optimizer == "sgd" else preset["scale_source"])
    return {"precondition": cfg.optimizer != "sgd", "precondition_layers": layers, "prune_score": prune,
            "scale_source": source}


def effective_delta_t(cfg: TrainConfig) -> int:
    """``delta_t`` rescaled to the run's batch when the config names a reference batch (ImageNet recipe)."""
    if cfg.delta_t_batch is None:
        return cfg.delta_t
    return max(1, round(cfg.delta_t * cfg.delta_t_batch / cfg.batch_size))


def build_run(cfg: TrainConfig, model: nn.Module, total_steps: int, peak_lr: float) -> RunObjects:
    """Masks, optimizer chain and topology updater around an already placed ``model``."""
    decay, no_decay = [], []
    for p in model.parameters():
        # Weight decay on conv/linear weights only, not on biases and norm parameters.
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        [g for g in groups if g["params"]], lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
    )
    if cfg.ham:
        optimizer = HAM(optimizer, alpha=cfg.ham_alpha, beta=cfg.ham_beta)
    if cfg.dst == "dense":
        return RunObjects(model, None, optimizer, None)

    masks = sparsify(
        model, cfg.sparsity, cfg.distribution, power_scale=cfg.power_scale, dense_first=cfg.dense_first,
        dense_last=cfg.dense_last, init=cfg.init, generator=torch.Generator().manual_seed(cfg.seed),
        structure=cfg.structure, nm=cfg.nm,
    )
    method = resolve_method(cfg)
    optimizer = SparseOpt(
        optimizer, masks, precondition=method["precondition"], layers=method["precondition_layers"],
        max_grad_norm=cfg.renorm, scale_weight_decay=cfg.scale_weight_decay, scale_source=method["scale_source"],
        scale_ema=cfg.scale_ema, undamped_growth=cfg.undamped_growth,
    )
    updater = DST_METHODS[cfg.dst]
    if not updater.dynamic:
        topology: Static = updater(masks, optimizer)
    else:
        kwargs = dict(
            delta_t=effective_delta_t(cfg), alpha=cfg.alpha, t_end=max(1, int(cfg.t_end_fraction * total_steps)),
            total_steps=total_steps, keep_regrown=cfg.keep_regrown, reset_optimizer_state=cfg.reset_optimizer_state,
            skip_update=cfg.skip_update, prune_score=method["prune_score"],
        )
        accepted = inspect.signature(updater).parameters
        if cfg.neuron_ablation is not None:
            kwargs["neuron_ablation"] = cfg.neuron_ablation
        for key, value in (("seed", cfg.seed), ("growth_gradient", cfg.growth_grad)):
            if key in accepted:
                kwargs[key] = value
        topology = updater(masks, optimizer, **kwargs)
    return RunObjects(model, masks, optimizer, topology)
