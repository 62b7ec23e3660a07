"""What happens to neurons and to the loss under dynamic sparse training (the SparseOpt-vs-baseline study)."""

from .neurons import neuron_stats, norm_fan_in_slope
from .updates import UpdateProbe, loss_on_batch

__all__ = ["UpdateProbe", "loss_on_batch", "neuron_stats", "norm_fan_in_slope"]
