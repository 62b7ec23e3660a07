"""Topology updates of dynamic sparse training."""

from .optim_state import zero_state_
from .schedule import drop_fraction, is_update_step
from .scores import PRUNE_SCORES
from .selection import prune_and_grow
from .updaters import DST_METHODS, SET, DSTUpdater, RigL, Static, TopologyUpdater

__all__ = ["DST_METHODS", "PRUNE_SCORES", "SET", "DSTUpdater", "RigL", "Static", "TopologyUpdater", "drop_fraction", "is_update_step",
           "prune_and_grow", "zero_state_"]
