"""A run's name from its method keys: one table, read by the trainer, the sweeps and the report.

Each entry is a config key and how it is written into the name (``None``: not written for
this value). A sweep adds ``-key<value>`` for every swept key that is not in this table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config module does not import this one: the name table is read by the layers above
    from .config import TrainConfig


def _sparse(write: Callable[[TrainConfig], str | None]) -> Callable[[TrainConfig], str | None]:
    return lambda c: None if c.dst == "dense" else write(c)


NAME_PARTS: tuple[tuple[str, Callable[[TrainConfig], str | None]], ...] = (
    ("dataset", lambda c: c.dataset),
    ("model", lambda c: c.model),
    ("dst", lambda c: c.dst),
    ("optimizer", _sparse(lambda c: c.optimizer)),
    ("sparsity", _sparse(lambda c: f"s{c.sparsity:g}")),
    ("structure", _sparse(lambda c: "cfi" if c.structure == "constant_fan_in" else None)),
    ("nm", _sparse(lambda c: f"nm{c.nm.replace(':', '-')}" if c.nm else None)),
    ("neuron_ablation", _sparse(lambda c: None if c.neuron_ablation is None else f"ablate{c.neuron_ablation:g}")),
    ("ham", lambda c: "ham" if c.ham else None),
    # Written as in earlier versions (formerly the keys renorm and growth_grad), so their run folders keep their names.
    ("max_grad_norm", lambda c: None if c.max_grad_norm is None else f"renorm{c.max_grad_norm:g}"),
    ("growth_gradient", lambda c: None if c.growth_gradient == "original" else f"grow-{c.growth_gradient}"),
    ("epochs", lambda c: f"e{c.epochs}"),
    ("seed", lambda c: f"seed{c.seed}"),
)
NAMED_KEYS: tuple[str, ...] = tuple(key for key, _ in NAME_PARTS)


def method_keys(cfg: TrainConfig) -> dict[str, Any]:
    """The keys that name the run, with their values: recorded in ``results.json`` as its ``method``."""
    return {k: getattr(cfg, k) for k in NAMED_KEYS}


def run_name(cfg: TrainConfig) -> str:
    """Stable, readable name of a run from its method keys (the folder under runs/)."""
    return "-".join(part for _, write in NAME_PARTS if (part := write(cfg)) is not None)
