"""Masks and layer-density distributions."""

from .distributions import (
    DISTRIBUTIONS,
    active_counts,
    check_sparsity,
    erk_densities,
    layer_densities,
    uniform_densities,
)
from .maskset import MASK_BUFFER, MaskedLayer, MaskSet, select_layers, sparse_init_, sparsify
from .neurons import fan_in, neuron_shape, neuron_sparsity
from .structure import STRUCTURES, Structure

__all__ = [
    "DISTRIBUTIONS", "MASK_BUFFER", "STRUCTURES", "Structure", "MaskSet", "MaskedLayer", "active_counts", "check_sparsity", "erk_densities",
    "fan_in", "layer_densities", "neuron_shape", "neuron_sparsity", "select_layers", "sparse_init_", "sparsify",
    "uniform_densities",
]
