"""Sweep files: a grid of config keys x seeds, expanded into named runs (pure functions).

A sweep file (YAML)::

    name: cifar100_table2
    base_config: ../cifar100_resnet20.yaml   # relative to the sweep file
    fixed: {dst: rigl}                        # applied to every run
    grid:                                     # cartesian product
      sparsity: [0.9, 0.95, 0.97]
      epochs: [100, 200, 300, 500]
    variants:                                 # optional: crossed with the grid
      - {optimizer: sgd}
      - {optimizer: sparseopt}
      - {optimizer: sparseopt, prune_score: magnitude, seeds: [0]}   # a variant may have its own seeds
    seeds: [0, 1, 2]
    slurm: {gpus_per_node: 1, timeout_min: 720}   # submitit parameters (optional)
    nproc_per_run: 1                              # torchrun processes per run (optional)

Each run is named by :func:`~sparseopt.train.trainer.run_name` (method fields,
budget and seed), plus ``-key<value>`` for any other swept key, so names are
stable and readable; they must be unique.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..plugins import load_plugins
from ..runs import RunFolder
from ..train.config import (
    FIELDS,
    TrainConfig,
    coerce,
    current_keys,
    load_yaml,
    make_config,
    unknown_key_message,
)
from ..train.naming import NAMED_KEYS, run_name
from ..train.spec import RunSpec

SWEEP_KEYS = {"name", "base_config", "fixed", "grid", "variants", "seeds", "slurm", "nproc_per_run", "out"}


@dataclass
class SweepSpec:
    name: str
    base_config: Path | None
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    variants: list[dict[str, Any]]
    seeds: list[int]
    slurm: dict[str, Any]
    nproc_per_run: int
    out: str | None


@dataclass
class PlannedRun:
    name: str
    config: TrainConfig


def load_sweep(path: str | Path) -> SweepSpec:
    load_plugins()  # a sweep may name a plugin's method or model (docs/plugins.md)
    path = Path(path)
    data = load_yaml(path)
    unknown = set(data) - SWEEP_KEYS
    if unknown:
        raise ValueError(f"sweep file {path}: unknown keys {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    base = data.get("base_config")
    base_path = None
    if base:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise ValueError(f"sweep file {path}: base_config {base_path} not found")
    where = f"sweep file {path}"
    grid = current_keys(data.get("grid") or {}, where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep file {path}: grid key {key!r} needs a non-empty list, got {values!r}")
    variants = data.get("variants") or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ValueError(f"sweep file {path}: variants must be a list of mappings")
    variants = [current_keys(v, where) for v in variants]
    fixed = current_keys(data.get("fixed") or {}, where)
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"sweep file {path}: seeds must be a non-empty list")
    for v in variants:
        if "seeds" in v and (not isinstance(v["seeds"], list) or not v["seeds"]):
            raise ValueError(f"sweep file {path}: a variant's seeds must be a non-empty list, got {v['seeds']!r}")
    for key in [*grid, *(k for v in variants for k in v if k != "seeds"), *fixed]:
        if key not in FIELDS:
            raise ValueError(f"sweep file {path}: {unknown_key_message(key)}")
    return SweepSpec(
        name=data.get("name", path.stem), base_config=base_path, fixed=fixed, grid=grid,
        variants=variants, seeds=[int(s) for s in seeds], slurm=data.get("slurm") or {},
        nproc_per_run=int(data.get("nproc_per_run", 1)), out=data.get("out"),
    )


def expand(spec: SweepSpec, out: str | Path, overrides: dict[str, Any] | None = None) -> list[PlannedRun]:
    """Every run of the sweep, in a stable order, with its resolved config (``out`` = its run folder)."""
    out = Path(out)
    keys = list(spec.grid)
    runs: list[PlannedRun] = []
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        for variant in spec.variants:
            variant = dict(variant)
            for seed in [int(s) for s in variant.pop("seeds", spec.seeds)]:
                swept = {**dict(zip(keys, values)), **variant}
                cfg = make_config(spec.base_config, {**spec.fixed, **swept, **(overrides or {}), "seed": seed,
                                                     "compare_optimizers": False})
                extra = [f"{k}{name_value(coerce(k, v))}" for k, v in swept.items() if k not in NAMED_KEYS]
                name = "-".join([run_name(cfg), *extra]).replace("/", "_")
                cfg.out = str(out / name)
                RunSpec.from_config(cfg.validate())  # each component checks its options before any run starts
                runs.append(PlannedRun(name, cfg))
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sweep {spec.name}: runs with identical names {duplicates}; every swept key must change the name")
    return runs


def name_value(value: Any) -> str:
    """A swept value as it is written into a run name (mappings as ``a=1,b=2``)."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


def run_state(run_dir: str | Path) -> str:
    """``finished`` (completed), ``failed`` (diverged), ``resumable`` (a checkpoint exists) or ``new``."""
    run = RunFolder(run_dir)
    try:
        status = (run.results() or {}).get("status")
    except ValueError:
        status = None
    if status == "completed":
        return "finished"
    if status == "diverged":
        return "failed"
    return "resumable" if run.has_checkpoint() else "new"
