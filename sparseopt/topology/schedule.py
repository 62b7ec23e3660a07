"""Schedules of dynamic sparse training (pure functions)."""

from __future__ import annotations

import math


def drop_fraction(t: int, alpha: float, t_end: int) -> float:
    """Cosine-decayed drop fraction of RigL: ``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))``.

    ``f(0) = alpha``, ``f(t_end / 2) = alpha / 2``, ``f(t) = 0`` for ``t >= t_end``.
    """
    if t >= t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / t_end))


def is_update_step(t: int, delta_t: int, t_end: int) -> bool:
    """Whether iteration ``t`` (0-based count of completed steps) updates the topology.

    Every ``delta_t`` steps, never at ``t = 0`` (the masks were just drawn) and
    never at or after ``t_end``.
    """
    return 0 < t < t_end and t % delta_t == 0
