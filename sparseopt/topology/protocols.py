"""What a topology update needs from the optimizer it works with, as typing Protocols.

Any optimizer works for growth and pruning by magnitude. Skipping the update step
(``skip_update=True``, reference RigL) needs :class:`SkipsSteps`; the ``scaled``
prune score and RigL's ``corrected`` growth need :class:`ProvidesScales`.
:class:`sparseopt.SparseOpt` is both.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SkipsSteps(Protocol):
    def skip_next_step(self) -> None:
        """Make the next ``step()`` a no-op (the gradient was computed for the old mask)."""


@runtime_checkable
class ProvidesScales(Protocol):
    precondition: bool  # whether the scales differ from 1

    def layer_scales(self) -> list[torch.Tensor]:
        """Per masked layer, the per-neuron scale ``c`` applied to the gradient (ones if not preconditioned)."""
