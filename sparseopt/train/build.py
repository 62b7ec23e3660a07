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

from ..masks.maskset import MaskSet
from ..runs import ModelSpec
from ..topology import TopologyUpdater
from ..training_kernels import SparseTraining, sparse_training
from .config import TrainConfig
from .spec import RunSpec


@dataclass
class RunObjects:
    model: nn.Module
    masks: MaskSet | None
    optimizer: torch.optim.Optimizer
    topology: TopologyUpdater | None
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


def build_run(cfg: TrainConfig | RunSpec, model: nn.Module, total_steps: int, peak_lr: float) -> RunObjects:
    """Masks, optimizer chain and topology updater around an already placed ``model``, from the run's spec."""
    spec = cfg if isinstance(cfg, RunSpec) else RunSpec.from_config(cfg, check=False)
    if spec.dense:
        return RunObjects(model, None, spec.optimizer.build(model, None, peak_lr), None)
    masks = spec.masks.build(model, spec.config.seed)
    optimizer = spec.optimizer.build(model, masks, peak_lr)
    topology = spec.topology.build(masks, optimizer, total_steps)
    kernels = spec.config.kernels
    sparse = sparse_training(masks, kernels, topology) if kernels != "masked" else None
    return RunObjects(model, masks, optimizer, topology, sparse)
