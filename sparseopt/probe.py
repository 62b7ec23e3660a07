"""Check a run's component options by building the components once on a probe model.

A rule about a component's options lives in that component's constructor (``alpha`` in the
topology updater's, ``scale_ema`` in SparseOpt's, the N:M rule in ``sparsify``). To refuse a bad
option before a run starts, before data loads, files are written or a framework's loop begins, the
training command (:class:`sparseopt.train.spec.RunSpec`) and the framework integrations build every
component once on a two-layer model and throw it away: the component says what is wrong, in its own
words, and no rule is written twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .masks.maskset import MaskSet
from .masks.structure import Structure

PROBE_STEPS = 1000  # the training length the probe's topology updater is built for


def probe_model(structure: Structure | None = None) -> nn.Sequential:
    """Two layers whose widths every structure accepts (inputs a multiple of an N:M pattern's M), one BatchNorm."""
    width = 16 * (structure.m if structure is not None and structure.kind == "nm" else 1)
    return nn.Sequential(nn.Linear(width, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, width))


def check_by_building(
    structure: Structure | None,
    masks: Callable[[nn.Module], MaskSet] | None,
    optimizer: Callable[[nn.Module, MaskSet | None], torch.optim.Optimizer],
    topology: Callable[[MaskSet, torch.optim.Optimizer, int], object] | None,
) -> None:
    """Build the masks, the optimizer and the topology updater once on a probe model (None: that part is absent)."""
    model = probe_model(structure)
    built = masks(model) if masks is not None else None
    try:
        opt = optimizer(model, built)
        if topology is not None:
            model(torch.zeros(2, model[0].in_features))  # SparseOpt finds the normalised layers on a forward pass
            topology(built, opt, PROBE_STEPS)
    finally:
        if built is not None:
            built.remove()
