"""From a config to the objects of a run: model, masks, optimizer chain, topology updater.

The optimizer chain is ``SparseOpt(HAM(SGD))`` (HAM optional): SparseOpt
corrects the gradient, HAM's base step runs (SGD with momentum), then HAM's
hyperbolic step, then SparseOpt re-applies the masks. ``optimizer=sgd`` builds
the same chain with ``precondition=False``, so baseline and SparseOpt differ in
that one switch (the recommended SparseOpt also prunes by ``|w| / c_i``, which is
plain magnitude pruning for the baseline, whose ``c_i`` are 1). Dense runs have no masks: ``SGD`` or ``HAM(SGD)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..masks.maskset import MaskSet, sparsify
from ..optim import HAM, SparseOpt
from ..optim.clip import ClipGradNorm
from ..optim.presets import OPTIMIZER_PRESETS
from ..registry import takes_keyword
from ..runs import ModelSpec
from ..topology import DST_METHODS, Static
from ..training_kernels import SparseTraining, sparse_training
from .config import TrainConfig


@dataclass
class RunObjects:
    model: nn.Module
    masks: MaskSet | None
    optimizer: torch.optim.Optimizer
    topology: Static | None
    sparse: SparseTraining | None = None  # the sparse training kernels (kernels=sparse or auto)


def model_spec(cfg: TrainConfig, num_classes: int | None = None) -> ModelSpec:
    """The config's model with ``num_classes`` outputs (default: the dataset's own count): :meth:`ModelSpec.from_config`."""
    return ModelSpec.from_config(cfg.to_dict(), num_classes)


def make_model(cfg: TrainConfig, num_classes: int | None = None) -> nn.Module:
    """The config's model with ``num_classes`` outputs (default: the dataset's own count).

    One forward pass of a zero image (evaluation mode, no gradient: nothing in the model changes)
    checks that the model takes the dataset's input before anything of a run is written: a model that
    does not is one line, not a traceback from inside its first training step.
    """
    spec = model_spec(cfg, num_classes)
    model = spec.build()
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *spec.in_shape))
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {cfg.model!r} does not take the {cfg.dataset} input of shape {tuple(spec.in_shape)}: "
                         f"{first} (a model built for another input size: set it with --model-kwargs, or choose "
                         "another --dataset / --image-size)") from None
    finally:
        model.train(training)
    return model


def resolve_method(cfg: TrainConfig) -> dict[str, object]:
    """The optimizer-dependent settings of a run with every ``auto`` resolved by its preset."""
    preset = OPTIMIZER_PRESETS[cfg.optimizer].resolved()
    return {k: preset[k] if getattr(cfg, k, "auto") == "auto" else getattr(cfg, k) for k in preset}


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
        if cfg.max_grad_norm is not None:
            optimizer = ClipGradNorm(optimizer, cfg.max_grad_norm)
        return RunObjects(model, None, optimizer, None)

    masks = sparsify(
        model, cfg.sparsity, cfg.distribution, power_scale=cfg.power_scale, dense_first=cfg.dense_first,
        dense_last=cfg.dense_last, init=cfg.init, generator=torch.Generator().manual_seed(cfg.seed),
        structure=cfg.structure, nm=cfg.nm,
    )
    method = resolve_method(cfg)
    optimizer = SparseOpt(
        optimizer, masks, precondition=method["precondition"], layers=method["precondition_layers"],
        max_grad_norm=cfg.max_grad_norm, scale_weight_decay=cfg.scale_weight_decay, scale_source=method["scale_source"],
        scale_kwargs=cfg.scale_kwargs, scale_ema=cfg.scale_ema, undamped_growth=cfg.undamped_growth,
    )
    updater = DST_METHODS[cfg.dst]
    kwargs = {**topology_options(cfg, updater, total_steps, method["prune_score"]), **cfg.dst_kwargs}
    try:
        topology = updater(masks, optimizer, **kwargs)
    except (TypeError, ValueError) as e:  # a plugin's own conversion (float("abc")) names neither option nor method
        given = ", ".join(f"{k}={v!r}" for k, v in cfg.dst_kwargs.items())
        raise ValueError(f"dst {cfg.dst!r} ({updater.__name__}){f' with --dst-kwargs {given}' if given else ''}: "
                         f"{e}") from None
    sparse = sparse_training(masks, cfg.kernels, topology) if cfg.kernels != "masked" else None
    return RunObjects(model, masks, optimizer, topology, sparse)


def topology_options(cfg: TrainConfig, updater: type, total_steps: int, prune_score: str) -> dict[str, object]:
    """The config keys an updater class takes, by its signature (a static updater takes none of them)."""
    options = dict(
        delta_t=effective_delta_t(cfg), alpha=cfg.alpha, t_end=max(1, int(cfg.t_end_fraction * total_steps)),
        total_steps=total_steps, keep_regrown=cfg.keep_regrown, reset_optimizer_state=cfg.reset_optimizer_state,
        skip_update=cfg.skip_update, prune_score=prune_score, seed=cfg.seed,
        growth_gradient=cfg.growth_gradient, neuron_ablation=cfg.neuron_ablation,
    )
    return {k: v for k, v in options.items() if takes_keyword(updater, k)}

