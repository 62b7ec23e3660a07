"""A run's checkpoint: everything to continue it bit-exactly, and the checks before it is trusted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..messages import plural
from ..runs import CHECKPOINT_FORMAT, RunFolder
from .build import RunObjects
from .config import TrainConfig, config_differences
from .spec import resolve_method


def training_state(cfg: TrainConfig, run: RunObjects, scheduler, *, epoch: int, step: int, num_classes: int,
                   class_names: list[str] | None, seconds: float) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "step": step,
        "config": cfg.to_dict(),
        # What this version made of the config's "auto" settings: a resume under another version must not
        # switch method halfway while config.yaml still says the same thing.
        "resolved": resolve_method(cfg),
        "num_classes": num_classes,
        "class_names": class_names,
        "model": run.model.state_dict(),
        "masks": run.masks.state_dict() if run.masks is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "topology": run.topology.state_dict() if run.topology is not None else None,
        "sparse_training": run.sparse.state_dict() if run.sparse is not None else None,
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "seconds": seconds,
    }


def restore(path: Path, cfg: TrainConfig, run: RunObjects, scheduler, device: torch.device) -> dict[str, Any]:
    """Load ``path`` into the run's objects after checking it is this run's; returns the checkpoint."""
    state = RunFolder(Path(path).parent).checkpoint(map_location=device)
    diffs = config_differences(state["config"], cfg.to_dict(), state.get("resolved"))
    saved_epochs = int(state["config"].get("epochs", cfg.epochs))
    if [d.key for d in diffs] == ["epochs"] and cfg.epochs > saved_epochs:
        raise ValueError(
            f"{path.parent} is a {saved_epochs}-epoch run: its learning rate follows a cosine to lr_min over "
            f"{plural(saved_epochs, 'epoch')} and its topology updates stop at {cfg.t_end_fraction:g} of them, so training it "
            f"to {cfg.epochs} epochs would be neither that run nor a {cfg.epochs}-epoch one (which anneals and updates "
            f"over all {cfg.epochs}). Train the longer run as its own: the same command with --epochs {cfg.epochs} and "
            "another --out (or --overwrite)")
    if diffs:
        raise ValueError(f"checkpoint {path} is from another configuration; differing keys: " + "; ".join(map(str, diffs)))
    saved_method, method = state.get("resolved"), resolve_method(cfg)
    # Keys a checkpoint does not record were not 'auto' in its version: they cannot have changed.
    changed = [f"{k}={saved_method[k]!r} (now {method[k]!r})" for k in method
               if saved_method is not None and saved_method.get(k, method[k]) != method[k]]
    if changed:
        raise ValueError(
            f"checkpoint {path} was trained with {', '.join(changed)}: this version resolves the config's 'auto' "
            "settings differently; set them explicitly (e.g. --prune-score, --precondition-layers, --scale-source) to "
            "continue the run as it was trained"
        )
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit this model: {e}") from None
    if run.masks is not None:
        run.masks.load_state_dict(state["masks"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.topology is not None:
        run.topology.load_state_dict(state["topology"])
    if run.sparse is not None and state.get("sparse_training"):
        run.sparse.load_state_dict(state["sparse_training"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    return state
