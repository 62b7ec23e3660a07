"""Sweeps: grids of runs, run locally or on SLURM through submitit."""

from .grid import PlannedRun, SweepSpec, expand, load_sweep, run_state
from .runner import plan, run_sweep

__all__ = ["PlannedRun", "SweepSpec", "expand", "load_sweep", "plan", "run_state", "run_sweep"]
