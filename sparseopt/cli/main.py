"""``sparseopt`` command line: ``sparseopt <command> [options]``.

    sparseopt demo                        # the default job twice, SGD vs SparseOpt (offline, ~1 minute on a CPU)
    sparseopt train                       # one run of the default job; flags and --config change it
    sparseopt train --config configs/cifar100_resnet20.yaml --sparsity 0.95 --data-dir ~/data
    sparseopt skew --data-dir ../shared/data          # gradient skew (paper Fig. 2)
    sparseopt report runs/ --out reports/all          # tables and figures from run folders
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

from ..plugins import load_plugins
from ..train.trainer import Interrupted, NonFiniteLoss

# Errors a user can fix (bad value, missing data, existing folder, an output location that cannot be written):
# one line and exit code 2. DatasetError is a ValueError; FileNotFoundError, PermissionError, a full disk are OSErrors.
USER_ERRORS = (ValueError, OSError)


def cmd_train(argv: list[str]) -> int:
    """One run (the pair with --compare-optimizers): the default job changed by the flags, or --config's."""
    from ..train.compare import compare
    from ..train.trainer import train

    cfg = _parse("train", "Train one run (or a baseline/SparseOpt pair with --compare-optimizers).", argv)
    (compare if cfg.compare_optimizers else train)(cfg, argv=["sparseopt", "train", *argv])
    return 0


def cmd_demo(argv: list[str]) -> int:
    """The default job twice, masked SGD and SparseOpt with the same seed, and their comparison (runs/default)."""
    from ..train.compare import compare

    cfg = _parse("demo", "Train the default job twice, masked SGD and SparseOpt, and compare them (runs/default).",
                 argv)
    if "--no-compare-optimizers" in argv:
        raise ValueError("sparseopt demo is the comparison; `sparseopt train` trains one run")
    cfg = dataclasses.replace(cfg, compare_optimizers=True, out=cfg.out or DEMO_OUT)
    compare(cfg, argv=["sparseopt", "demo", *argv])
    return 0


DEMO_OUT = "runs/default"


def _parse(command: str, description: str, argv: list[str]):
    from .train_args import add_config_flags, parse_train_args

    parser = argparse.ArgumentParser(prog=f"sparseopt {command}", description=description, allow_abbrev=False)
    add_config_flags(parser)
    return parse_train_args(parser, argv).validate()


def _lazy(module: str, name: str):
    """The command ``name`` of ``sparseopt.cli.<module>``, imported only when it runs (a fast ``--help``)."""
    def run(argv: list[str]) -> int:
        return getattr(importlib.import_module(f".{module}", __package__), name)(argv)

    return run


COMMANDS = {
    "demo": (cmd_demo, "the default job twice, masked SGD vs SparseOpt, with a table and a plot (runs/default)"),
    "train": (cmd_train, "train one run with a DST method and optimizer (the pair with --compare-optimizers)"),
    "skew": (_lazy("analyses", "cmd_skew"), "BN gradient skew vs sparsity, per neuron, before/after SparseOpt (Fig. 2)"),
    "direction": (_lazy("analyses", "cmd_direction"), "update-direction jumps at mask updates, baseline vs SparseOpt"),
    "toy-ham": (_lazy("analyses", "cmd_toy_ham"), "HAM vs GD on the one-neuron BatchNorm model (appendix A)"),
    "report": (_lazy("analyses", "cmd_report"), "tables and figures from run or sweep folders"),
    "sweep": (_lazy("analyses", "cmd_sweep"), "run a grid of runs locally or on SLURM (submitit); idempotent"),
    "export": (_lazy("deploy", "cmd_export"), "write a run's model as a file of its active weights only"),
    "bench-infer": (_lazy("deploy", "cmd_bench_infer"), "dense vs sparse CPU inference, side by side"),
    "bench-train": (_lazy("bench", "cmd_bench_train"), "masked dense vs sparse-kernel training steps, side by side"),
    "kernels": (_lazy("deploy", "cmd_kernels"), "which compiled kernel path is active and why (builds it if needed)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"sparseopt {__version__}")
        return 0
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
        # Before any config is read: what plugins register is then a choice of every flag and sweep file.
        load_plugins()
        return COMMANDS[name][0](rest)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # already reported with the resume command; 128 + signal, as a shell reports it
        return 128 + e.signum
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or error}: {error.filename}"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
