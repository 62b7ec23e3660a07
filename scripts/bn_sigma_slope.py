"""BatchNorm's sigma against fan-in in finished runs: does the paper's assumption sigma_i ~ sqrt(n_i) hold?

    python scripts/bn_sigma_slope.py RUN_OR_SWEEP_FOLDER... [--json FILE]

For each run folder's final checkpoint: the pooled log-log slope of sigma_i = sqrt(running_var_i) of the
BatchNorm each masked layer feeds against the neuron's fan-in n_i (``bn_sigma/fan_in_slope`` of
``sparseopt.monitor.neuron_stats``; 0.5 is the paper's assumption, true at initialisation), next to the
same slope of the weight norm. Runs trained with the monitor on log the sigma slope per epoch already;
this reads it from checkpoints of any run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparseopt.analysis.report import find_run_dirs  # noqa: E402
from sparseopt.data import DATASETS  # noqa: E402
from sparseopt.files import load_checkpoint  # noqa: E402
from sparseopt.masks.maskset import MASK_BUFFER, MaskSet  # noqa: E402
from sparseopt.monitor import neuron_stats  # noqa: E402
from sparseopt.optim.sparseopt import NormalizedLayerFinder  # noqa: E402
from sparseopt.train.build import make_model  # noqa: E402
from sparseopt.train.config import make_config  # noqa: E402


def run_slopes(run: Path) -> dict[str, float]:
    state = load_checkpoint(run / "checkpoint.pt")
    cfg = make_config(overrides={k: v for k, v in state["config"].items() if k not in ("out",)})
    model = make_model(cfg)
    suffix = f".{MASK_BUFFER}"
    masks = MaskSet(model, {k[: -len(suffix)]: v for k, v in state["model"].items() if k.endswith(suffix)})
    model.load_state_dict(state["model"])
    finder = NormalizedLayerFinder(model, masks)
    model.eval()  # the forward pass only finds which BatchNorm each layer feeds; eval keeps running stats
    with torch.no_grad():
        model(torch.zeros(2, *DATASETS[cfg.dataset].in_shape))
    stats = neuron_stats(masks, norms=finder.norms)
    keys = ("bn_sigma/fan_in_slope", "weight_norm/fan_in_slope", "neurons/dead")
    return {"run": run.name, "epoch": state["epoch"], **{k: stats.get(k) for k in keys}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = [run_slopes(run) for run in find_run_dirs(args.paths) if (run / "checkpoint.pt").is_file()]
    print(f"{'run':70s} {'epoch':>5s} {'sigma slope':>11s} {'norm slope':>10s} {'dead':>5s}")
    for r in rows:
        print(f"{r['run']:70s} {r['epoch']:5d} {r['bn_sigma/fan_in_slope']:11.3f} {r['weight_norm/fan_in_slope']:10.3f} "
              f"{r['neurons/dead']:5d}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
