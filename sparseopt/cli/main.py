"""``sparseopt`` command line: ``sparseopt <command> [options]``.

    sparseopt train                       # the embedded default job (offline, ~1 minute on a CPU)
    sparseopt train --config configs/cifar100_resnet20.yaml --sparsity 0.95 --data-dir ~/data
    sparseopt skew --data-dir ../shared/data          # gradient skew (paper Fig. 2)
    sparseopt report runs/ --out reports/all          # tables and figures from run folders
"""

from __future__ import annotations

import argparse
import sys

from ..train.trainer import NonFiniteLoss

# Errors a user can fix (bad value, missing data, existing folder): message and exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)  # DatasetError is a ValueError


def cmd_train(argv: list[str]) -> int:
    from ..train.compare import compare
    from ..train.trainer import train
    from .train_args import add_config_flags, parse_train_args

    parser = argparse.ArgumentParser(prog="sparseopt train", description="Train one run (or a baseline/SparseOpt pair).")
    add_config_flags(parser)
    cfg = parse_train_args(parser, argv).validate()
    if cfg.compare_optimizers:
        compare(cfg)
    else:
        train(cfg)
    return 0


def _analysis(name):
    def run(argv: list[str]) -> int:
        from . import analyses

        return getattr(analyses, name)(argv)

    return run


COMMANDS = {
    "train": (cmd_train, "train a model with a DST method and optimizer"),
    "skew": (_analysis("cmd_skew"), "BN gradient skew vs sparsity, per neuron, before/after SparseOpt (Fig. 2)"),
    "direction": (_analysis("cmd_direction"), "update-direction jumps at mask updates, baseline vs SparseOpt"),
    "toy-ham": (_analysis("cmd_toy_ham"), "HAM vs GD on the one-neuron BatchNorm model (appendix A)"),
    "report": (_analysis("cmd_report"), "tables and figures from run or sweep folders"),
    "sweep": (_analysis("cmd_sweep"), "run a grid of runs locally or on SLURM (submitit); idempotent"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:12s} {help_}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {list(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][0](rest)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
