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


class ReplicaDivergenceError(RuntimeError):
    pass


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def parameter_checksums(model: torch.nn.Module) -> torch.Tensor:
    """One int64 per parameter: the wrapped sum of its bit patterns (any change of any bit changes it, bar collisions).

    Computed where the parameters live, so a check costs one small all-gather, not a copy of the model.
    """
    sums = [p.detach().contiguous().view(_BITS[p.element_size()]).to(torch.int64).sum() for p in model.parameters()]
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def check_replicas_consistent(masks, model: torch.nn.Module, env: DistEnv, step: int) -> None:
    """Compare the masks and the weights of every rank; raise on any difference.

    Masks can stay equal while weights drift (a per-rank quantity, such as unsynchronised BatchNorm
    statistics, entering the update), so both are compared.
    """
    if not env.enabled:
        return
    digests: list[str | None] = [None] * env.world_size
    dist.all_gather_object(digests, masks.checksum())
    if len(set(digests)) != 1:
        raise ReplicaDivergenceError(
            f"masks differ across ranks after the topology update at step {step}: checksums {digests}. "
            "Masks must be identical by construction (same seed, gradients averaged by DDP); "
            "check that every rank runs the same config and code version"
        )
    mine = parameter_checksums(model)
    gathered = [torch.empty_like(mine) for _ in range(env.world_size)]
    dist.all_gather(gathered, mine)
    differ = (torch.stack(gathered) != gathered[0]).any(0).nonzero().reshape(-1).tolist()
    if differ:
        names = [name for name, _ in model.named_parameters()]
        raise ReplicaDivergenceError(
            f"weights differ across ranks at step {step} although the masks are equal: {len(differ)} parameter(s), "
            f"first {names[differ[0]]!r}. DDP replicas must stay bitwise equal; something per-rank enters the "
            "update (an optimizer that reads unsynchronised BatchNorm statistics, or a rank-dependent seed)"
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
