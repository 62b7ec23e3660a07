"""A training run folder's final model, rebuilt from its files alone (for export and benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import CLASS_NAMES, DATASETS
from ..masks.maskset import MaskSet
from ..masks.structure import Structure
from ..models import build_model, model_defaults
from ..runs import ModelSpec, RunFolder


def load_run(run_dir: str | Path) -> tuple[nn.Module, MaskSet, dict[str, Any]]:
    """``(model, masks, export keywords)`` of a run folder: config.yaml + checkpoint.pt, eval mode, on the CPU."""
    run = RunFolder(run_dir)
    run_dir, config_path, checkpoint_path = run.path, run.config_path, run.checkpoint_path
    config = run.config()
    state = run.checkpoint()
    if state.get("masks") is None:
        raise ValueError(f"{run_dir} is a dense run (dst=dense): it has no masks to export")
    results = run.results() or {}
    num_classes = state.get("num_classes") or results.get("num_classes")
    spec = ModelSpec.from_config(config, num_classes)
    model = spec.build()
    saved = state["masks"]
    masks = MaskSet(model, dict(zip(saved["names"], saved["masks"])), Structure.from_dict(saved.get("structure")))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{checkpoint_path} does not fit the model of {config_path}: {str(e).splitlines()[0]}") from None
    model.eval()
    info = DATASETS[config["dataset"]]
    class_names = state.get("class_names") or results.get("class_names") or CLASS_NAMES.get(config["dataset"])
    export = {
        "model_name": spec.name, "model_kwargs": spec.kwargs, "num_classes": spec.num_classes,
        "class_names": class_names if class_names and len(class_names) == spec.num_classes else None,
        "input_shape": spec.in_shape, "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "source": str(run_dir.resolve()),
    }
    return model, masks, export


def example_batch(input_shape: tuple[int, ...], batch_size: int, seed: int = 0) -> torch.Tensor:
    """A reproducible batch of standard-normal inputs of ``(batch_size, *input_shape)``."""
    return torch.randn((batch_size, *input_shape), generator=torch.Generator().manual_seed(seed))


def synthetic_model(
    name: str,
    sparsity: float,
    distribution: str = "erk",
    structure: str = "unstructured",
    nm: str | None = None,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, MaskSet, tuple[int, ...]]:
    """A registered model with random weights, trained-like BatchNorm statistics and masks: for benchmarks.

    Returns ``(model, masks, input_shape)``: the input and class count of the model's own dataset
    (:func:`sparseopt.models.model_defaults`) unless told.
    """
    import sparseopt

    defaults = model_defaults(name)
    num_classes = num_classes or defaults.num_classes
    channels, height, _ = defaults.in_shape
    size = image_size or height
    shape = (channels, size, size)
    torch.manual_seed(seed)
    model = build_model(name, num_classes, in_shape=shape)
    masks = sparseopt.sparsify(model, sparsity, distribution, structure=structure, nm=nm,
                               generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():  # as after training: BatchNorm statistics that folding really has to carry
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval(), masks, shape
