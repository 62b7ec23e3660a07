"""The optimizer presets of the command line, defined once: ``sgd``, ``sparseopt``, ``sparseopt_paper``.

A preset is what ``--optimizer NAME`` means: whether SparseOpt preconditions,
and what each ``auto`` setting of the run resolves to. The CLI's choices and
help, the run's recorded ``resolved`` settings, the updaters' ``prune_score="auto"``,
the report's labels and the sweeps all read this table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..registry import Registry


@dataclass(frozen=True)
class OptimizerPreset:
    name: str
    precondition: bool
    precondition_layers: str
    prune_score: str
    scale_source: str
    label: str  # the report's row label ...
    help: str
    note: str = ""  # ... and what it adds in brackets

    def resolved(self) -> dict[str, object]:
        """The settings ``auto`` stands for under this preset (recorded with every run)."""
        d = asdict(self)
        return {k: d[k] for k in ("precondition", "precondition_layers", "prune_score", "scale_source")}


OPTIMIZER_PRESETS: Registry[OptimizerPreset] = Registry("optimizer")
# The masked DST baseline: c_i = 1, so |w| / c_i is |w| (magnitude pruning either way). Its layer and scale
# settings do nothing; they are fixed so that every baseline run groups with those recorded before they existed.
OPTIMIZER_PRESETS.register("sgd", OptimizerPreset(
    "sgd", precondition=False, precondition_layers="normalized", prune_score="magnitude", scale_source="fan_in",
    label="Baseline", help="masked DST baseline"))
# SparseOpt as this library recommends it: the paper's magnitude pruning lets the preconditioner starve
# low-fan-in neurons until they die, pruning by |w| / c_i does not; c_i read from BatchNorm's running variance
# led or tied the baseline in every comparison, the fan-in c_i did not (docs/results.md).
OPTIMIZER_PRESETS.register("sparseopt", OptimizerPreset(
    "sparseopt", precondition=True, precondition_layers="normalized", prune_score="scaled", scale_source="bn_stats",
    label="Ours", help="preconditioned by BatchNorm statistics, with preconditioner-aware pruning (recommended)"))
OPTIMIZER_PRESETS.register("sparseopt_paper", OptimizerPreset(
    "sparseopt_paper", precondition=True, precondition_layers="all", prune_score="magnitude", scale_source="fan_in",
    label="Ours", note="paper-exact", help="as the paper describes it"))


def preset_for(precondition: bool, layers, scale_source: str) -> OptimizerPreset:
    """The preset that SparseOpt settings are, for a SparseOpt built without naming one.

    Not preconditioning: the baseline; the paper's settings (every layer, fan-in scales):
    ``sparseopt_paper``; anything else: the recommended ``sparseopt``.
    """
    if not precondition:
        return OPTIMIZER_PRESETS["sgd"]
    paper = OPTIMIZER_PRESETS["sparseopt_paper"]
    if (layers, scale_source) == (paper.precondition_layers, paper.scale_source):
        return paper
    return OPTIMIZER_PRESETS["sparseopt"]
