"""Sparse training on the compiled kernels: forward, input gradient and weight gradient cost the active weights only."""

from .controller import KERNEL_MODES, LayerDecision, SparseTraining, sparse_training

__all__ = ["KERNEL_MODES", "LayerDecision", "SparseTraining", "sparse_training"]
