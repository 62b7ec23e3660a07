"""Side-by-side timing: the one rule every benchmark and per-layer choice in sparseopt measures by."""

from __future__ import annotations

import time


def median(samples: list[float]) -> float:
    """The upper median (``sorted(samples)[n // 2]``): a measured value, never an average of two."""
    return sorted(samples)[len(samples) // 2]


def time_alternating(calls: dict, rounds: int = 7, min_seconds: float = 0.0, warmup_seconds: float = 0.0) -> dict:
    """Median seconds of each of several ``calls``, timed in alternating rounds after warm-up rounds.

    Alternating spreads a change of machine load (another process, a clock change) over all of them,
    so their ratios hold even where the absolute times drift. At least ``rounds`` rounds, and more
    (up to 50 times as many) until each call has run ``min_seconds`` in all: millisecond-sized models
    need hundreds of rounds for a stable median. Warm-up: one round, and more until ``warmup_seconds``
    have passed (the first tens of forward passes of a model run measurably slower here: caches,
    allocator and thread pool settling).
    """
    start = time.perf_counter()
    while True:
        for fn in calls.values():
            fn()
        if time.perf_counter() - start >= warmup_seconds:
            break
    times = {name: [] for name in calls}
    while True:
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        done = len(next(iter(times.values())))
        if done >= rounds and (done >= 50 * rounds or min(sum(t) for t in times.values()) >= min_seconds):
            break
    return {name: median(t) for name, t in times.items()}
