"""Optimizers and preconditioners: SparseOpt, HAM, and the wrapper base."""

from .ham import HAM, ham_update_
from .preconditioner import gradient_multiplier, neuron_scales
from .presets import OPTIMIZER_PRESETS, OptimizerPreset
from .scales import SCALE_SOURCES, ScaleInput, ScaleSource
from .sparseopt import SparseOpt
from .wrapper import OptimizerWrapper

__all__ = ["HAM", "OPTIMIZER_PRESETS", "OptimizerPreset", "OptimizerWrapper", "SCALE_SOURCES", "ScaleInput", "ScaleSource",
           "SparseOpt", "gradient_multiplier", "ham_update_", "neuron_scales"]
