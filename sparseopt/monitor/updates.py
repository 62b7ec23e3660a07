"""The training loss around topology updates.

Two measures per update:

* ``loss_before`` / ``loss_after``: the loss of the update step's own batch with
  the old and with the new mask (same weights, BatchNorm in training mode, its
  running statistics left untouched): the immediate damage of pruning.
* ``loss_window_before`` / ``loss_window_after``: the mean training loss of the
  ``window`` steps up to the update and of the ``window`` steps after it: how
  fast training recovers.

Losses stay on the device until a record is flushed (once per epoch), so the
probe adds no host synchronisation to the training steps.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def loss_on_batch(model: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    """The training-mode loss of one batch, leaving every buffer (BN running statistics) as it was."""
    buffers = [b for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long]
    saved = [b.clone() for b in buffers]
    try:
        with autocast():
            out = model(x)
        return criterion(out.float(), y).detach()
    finally:
        for b, s in zip(buffers, saved):
            b.copy_(s)


class UpdateProbe:
    """Collects the loss records of topology updates; see the module docstring."""

    def __init__(self, window: int = 10):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        self.window = window
        self._recent: deque[torch.Tensor] = deque(maxlen=window)
        self._open: list[dict[str, Any]] = []

    def record(self, loss: torch.Tensor) -> None:
        """Call once per training step with that step's (pre-update) loss."""
        loss = loss.detach()
        for rec in self._open:
            if len(rec["_after"]) < self.window:
                rec["_after"].append(loss)
        self._recent.append(loss)

    def begin(self, info: dict[str, Any], loss_after: torch.Tensor | None = None) -> None:
        """Open the record of an update that happened at this step (after :meth:`record`)."""
        rec = dict(info)
        rec["_before"] = list(self._recent)
        rec["_after"] = []
        rec["_loss_after"] = None if loss_after is None else loss_after.detach()
        self._open.append(rec)

    def flush(self) -> list[dict[str, Any]]:
        """Close every open record (a window cut short by the flush says so) and return them as plain numbers."""
        out = []
        for rec in self._open:
            before, after, loss_after = rec.pop("_before"), rec.pop("_after"), rec.pop("_loss_after")
            rec.update({
                "loss_before": _mean(before[-1:]),
                "loss_after": _mean([loss_after] if loss_after is not None else []),
                "loss_window_before": _mean(before),
                "loss_window_after": _mean(after),
                "window_after_steps": len(after),
            })
            out.append(rec)
        self._open = []
        return out


def _mean(losses: list[torch.Tensor]) -> float | None:
    return float(torch.stack(losses).float().mean()) if losses else None
