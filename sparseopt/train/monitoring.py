"""What a run logs about its neurons and its topology updates (``--monitor``, on by default)."""

from __future__ import annotations

from typing import Any

import torch

from ..monitor import UpdateProbe, loss_on_batch, neuron_stats
from .build import RunObjects


class RunMonitor:
    """Neuron statistics per epoch, and the loss around every topology update, for ``metrics.jsonl``.

    The normalization each masked layer feeds comes from the optimizer (SparseOpt finds them
    on the first forward pass): one search per run.
    """

    def __init__(self, run: RunObjects, criterion, autocast, delta_t: int, enabled: bool):
        self.run, self.criterion, self.autocast = run, criterion, autocast
        self.enabled = enabled and run.masks is not None
        dynamic = self.enabled and run.topology is not None and run.topology.dynamic
        self.probe = UpdateProbe(window=max(1, min(10, delta_t // 2))) if dynamic else None

    def _stats(self) -> dict[str, Any]:
        run = self.run
        return neuron_stats(run.masks, run.optimizer.layer_scales(), run.optimizer.normalizations())

    def after_backward(self, loss: torch.Tensor, updated: bool, x: torch.Tensor, y: torch.Tensor, epoch: int,
                       step: int) -> None:
        """Record the step's loss; after a topology update, open its record with the loss on the same batch."""
        if self.probe is None:
            return
        self.probe.record(loss)
        if updated:
            info = {"event": "update", "epoch": epoch, "step": step, **(self.run.topology.last_update or {})}
            info.pop("t", None)
            info.update({k: v for k, v in self._stats().items() if not k.startswith("neurons/dead/")})
            self.probe.begin(info, loss_on_batch(self.run.model, self.criterion, x, y, self.autocast))

    def epoch_records(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(this epoch's update records, the epoch's neuron statistics and update summary)."""
        if not self.enabled:
            return [], {}
        stats = self._stats()
        if self.probe is None:
            return [], stats
        updates = self.probe.flush()
        for key in ("grown_pruned", "loss_before", "loss_after", "loss_window_before", "loss_window_after"):
            values = [u[key] for u in updates if u.get(key) is not None]
            if values:
                stats[f"update/{key}"] = sum(values) / len(values)
        return updates, stats
