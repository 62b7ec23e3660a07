"""A 2-process DDP (CPU, gloo) run of Lightning with SparseTraining; each rank writes its masks and weights."""

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_models import MNISTNet, mnist_loader, trainer  # noqa: E402

from sparseopt.integrations.lightning import SparseTraining  # noqa: E402


def main(out: str, dst: str) -> None:
    sparse = SparseTraining(sparsity=0.9, dst=dst, delta_t=4)
    module = MNISTNet()
    fit = trainer(out, [sparse], devices=2, strategy="ddp", max_epochs=1)
    fit.fit(module, mnist_loader(512, 32))
    torch.save({"masks": [m.clone() for m in sparse.masks.masks], "updates": sparse.topology.num_updates,
                "world": fit.world_size, "model": {k: v.detach().clone() for k, v in module.named_parameters()}},
               Path(out) / f"rank{fit.global_rank}.pt")
    # Lightning leaves the process group to interpreter exit, where gloo's worker threads can abort the process
    # ("terminate called without an active exception", seen in CI): meet, drop the DDP wrapper, then leave.
    torch.distributed.barrier()
    del fit
    gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
