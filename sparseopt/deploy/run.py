"""A training run folder's final model, rebuilt from its files alone (for export and benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import CLASS_NAMES, DATASETS
from ..files import load_checkpoint
from ..masks.maskset import MaskSet
from ..masks.structure import Structure
from ..models import build_model
from ..train.build import model_spec
from ..train.config import TrainConfig, load_yaml, make_config


def load_run(run_dir: str | Path) -> tuple[nn.Module, MaskSet, dict[str, Any]]:
    """``(model, masks, export keywords)`` of a run folder: config.yaml + checkpoint.pt, eval mode, on the CPU."""
    run_dir = Path(run_dir)
    config_path, checkpoint_path = run_dir / "config.yaml", run_dir / "checkpoint.pt"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no config.yaml")
    cfg: TrainConfig = make_config(None, load_yaml(config_path))
    state = load_checkpoint(checkpoint_path)
    if state.get("format") != "sparseopt-checkpoint-v1":
        raise ValueError(f"{checkpoint_path} is not a sparseopt training checkpoint")
    if state.get("masks") is None:
        raise ValueError(f"{run_dir} is a dense run (dst=dense): it has no masks to export")
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    num_classes = state.get("num_classes") or results.get("num_classes")
    spec = model_spec(cfg, num_classes)
    model = spec.build()
    saved = state["masks"]
    masks = MaskSet(model, dict(zip(saved["names"], saved["masks"])), Structure.from_dict(saved.get("structure")))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{checkpoint_path} does not fit the model of {config_path}: {str(e).splitlines()[0]}") from None
    model.eval()
    info = DATASETS[cfg.dataset]
    class_names = state.get("class_names") or results.get("class_names") or CLASS_NAMES.get(cfg.dataset)
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

    Returns ``(model, masks, input_shape)``; ResNet-50 at 224 px and 1000 classes unless told, other models at
    their dataset's size and 10 classes.
    """
    import sparseopt

    num_classes = num_classes or (1000 if name == "resnet50" else 10)
    size = image_size or (224 if name == "resnet50" else 28 if name == "mlp" else 32)
    shape = (1, size, size) if name == "mlp" else (3, size, size)
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
