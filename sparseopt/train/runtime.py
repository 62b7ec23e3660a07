"""Where and how a run executes: its device, the process-wide backend flags, optional loggers.

``torch.backends`` flags are process-wide: a run sets them only for its own
duration (:func:`backend_flags`) and gives a library user back the settings it found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..memory import reuse_freed_memory
from .config import TrainConfig
from .distributed import DistEnv, init_distributed
from .naming import run_name

GPU_SPEED_OPTIONS = ("bf16", "channels_last", "compile")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use --device cpu or auto")
    return device


def place(cfg: TrainConfig) -> tuple[torch.device, DistEnv]:
    """This process's device and its place among the ranks (torchrun's environment; one rank without it)."""
    device = resolve_device(cfg.device)
    env = init_distributed(device.type)
    if env.enabled and cfg.batch_size % env.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the world size {env.world_size}")
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
    return device, env


def place_model(model: nn.Module, cfg: TrainConfig, env: DistEnv, device: torch.device) -> nn.Module:
    """The model on its device, with SyncBatchNorm across ranks and channels-last memory when asked."""
    if cfg.sync_bn and env.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def without_gpu_options(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, list[str]]:
    """The config a non-CUDA device runs (GPU speed options off, as recorded) and a note per option it drops."""
    if device.type == "cuda":
        return cfg, []
    notes = [f"--{flag.replace('_', '-')} is a GPU speed option: ignored on {device.type}"
             for flag in GPU_SPEED_OPTIONS if getattr(cfg, flag)]
    if cfg.sync_bn:
        notes.append("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel): ignored, BN statistics stay per rank")
    return dataclasses.replace(cfg, bf16=False, channels_last=False, compile=False, sync_bn=False), notes


@contextmanager
def backend_flags(device: torch.device, cfg: TrainConfig, distributed: bool = False) -> Iterator[None]:
    """cuDNN autotuning and TF32 matmuls for a CUDA run, restored to what they were when it ends; for a
    single-process CPU run, freed memory kept for reuse (process-wide and kept: :mod:`sparseopt.memory`;
    measured single-process only, so CPU DDP runs, which test rather than train, keep the C library's)."""
    if device.type != "cuda":
        if device.type == "cpu" and cfg.reuse_memory and not distributed:
            reuse_freed_memory()
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32)
    cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = cfg.cudnn_benchmark, True, True
    try:
        yield
    finally:
        cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = saved


def check_optional_loggers(cfg: TrainConfig) -> None:
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--wandb needs the wandb package: pip install wandb") from None


def open_loggers(cfg: TrainConfig, out: Path) -> list[Callable[[dict[str, Any]], Any]]:
    """Writers that receive each epoch's metrics (TensorBoard, Weights & Biases), as the config asks."""
    writers = []
    scalars = lambda m: {k: v for k, v in m.items() if isinstance(v, (int, float)) and k not in ("epoch",)}  # noqa: E731
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tensorboard"))
        writers.append(lambda m: [tb.add_scalar(k, v, m["epoch"]) for k, v in scalars(m).items()] and tb.flush())
    if cfg.wandb:
        import wandb

        run = wandb.init(project="sparseopt", name=run_name(cfg), config=cfg.to_dict(), dir=str(out), resume="allow")
        writers.append(lambda m: run.log(scalars(m), step=m["epoch"]))
    return writers


def wrap_for_training(model: nn.Module, masks, env: DistEnv, device: torch.device, cfg: TrainConfig) -> nn.Module:
    """DDP across ranks (masks are identical by construction: not broadcast), then torch.compile if asked."""
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if masks is not None:
            DDP._set_params_and_buffers_to_ignore_for_model(model, [layer.buffer_path for layer in masks])
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    # Masks are buffers updated in place, so topology updates do not force a recompilation.
    return torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
