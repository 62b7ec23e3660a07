"""Evaluation over the whole test set, reduced over ranks."""

from __future__ import annotations

import torch
from torch import nn

from .distributed import DistEnv, all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, autocast) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole test set (reduced over ranks)."""
    was_training = model.training
    model.eval()
    sums = None
    for x, y in loader:
        with autocast():
            out = model(x)
        out = out.float()
        top5 = out.topk(min(5, out.shape[1]), dim=1).indices
        if sums is None:
            sums = torch.zeros(4, dtype=torch.float64, device=out.device)
        sums[0] += nn.functional.cross_entropy(out, y, reduction="sum")
        sums[1] += (top5[:, 0] == y).sum()
        sums[2] += (top5 == y[:, None]).any(dim=1).sum()
        sums[3] += len(y)
    sums = all_reduce_sum(sums, env)
    model.train(was_training)
    n = sums[3].item()
    return {"test_loss": sums[0].item() / n, "test_acc": 100 * sums[1].item() / n, "test_top5": 100 * sums[2].item() / n}
