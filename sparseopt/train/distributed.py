"""torchrun / DDP plumbing: process-group set-up, reductions, the mask consistency check.

``torchrun --nproc_per_node=N -m sparseopt train ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``sparseopt train`` is world size 1.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank)


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj, env: DistEnv):
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class MaskDivergenceError(RuntimeError):
    pass


def check_masks_consistent(masks, env: DistEnv, step: int) -> None:
    """Compare a checksum of all masks across ranks; raise on any difference."""
    if not env.enabled:
        return
    digests: list[str | None] = [None] * env.world_size
    dist.all_gather_object(digests, masks.checksum())
    if len(set(digests)) != 1:
        raise MaskDivergenceError(
            f"masks differ across ranks after the topology update at step {step}: checksums {digests}. "
            "Masks must be identical by construction (same seed, gradients averaged by DDP); "
            "check that every rank runs the same config and code version"
        )


def cleanup(env: DistEnv, meet: bool = True) -> None:
    """Leave the process group so that no rank tears it down while a peer still uses it.

    With ``meet`` (a run that ended normally on every rank) the ranks first meet
    at a barrier: rank 0 may still be writing its results. Objects that hold the
    group (the DDP wrapper and its reducer) must be released by the caller first:
    the garbage collection here then lets ``destroy_process_group`` join gloo's
    worker threads now, not during interpreter shutdown, where rank 1 aborted
    with "terminate called without an active exception".
    """
    if not (env.enabled and dist.is_initialized()):
        return
    if meet:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
