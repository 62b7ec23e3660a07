"""Optimizers and preconditioners: SparseOpt, HAM, and the wrapper base."""

from .ham import HAM, ham_update_
from .preconditioner import gradient_multiplier, neuron_scales
from .sparseopt import SparseOpt
from .wrapper import OptimizerWrapper

__all__ = ["HAM", "OptimizerWrapper", "SparseOpt", "gradient_multiplier", "ham_update_", "neuron_scales"]
