"""``sparseopt skew | direction | toy-ham | report``: the paper's analyses as commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..train.progress import Progress


def _print_written(out: Path, names: list[str]) -> None:
    print("wrote " + ", ".join(str(out / n) for n in names))


def ensure_writable(folder: Path) -> Path:
    """Create ``folder`` and prove a file can be written there, before minutes of computing (OSError otherwise)."""
    from ..train.run_folder import check_out_path

    check_out_path(folder).mkdir(parents=True, exist_ok=True)
    probe = folder / ".sparseopt-write-test"
    probe.write_bytes(b"")
    probe.unlink()
    return folder


def cmd_skew(argv: list[str]) -> int:
    from ..analysis.skew import DEFAULT_SPARSITIES, NORM_CHOICES, dataset_inputs, run_skew
    from ..data import DATASETS

    p = argparse.ArgumentParser(allow_abbrev=False, prog="sparseopt skew", description="BN gradient skew of a sparse layer (paper Fig. 2, appendix D/E.3).")
    p.add_argument("--dataset", choices=list(DATASETS), default="bundled_mnist",
                   help="any dataset sparseopt train reads (each normalised with its own statistics; a folder with "
                        "those of its images)")
    p.add_argument("--data-dir", help="folder holding the dataset (not needed for bundled_mnist)")
    p.add_argument("--image-size", type=int, default=28, help="folder datasets: images are resized to this (default 28)")
    p.add_argument("--norm", nargs="+", choices=NORM_CHOICES, default=["batchnorm", "none"])
    p.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--inits", type=int, default=5, help="random initialisations averaged per point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/skew")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    args = p.parse_args(argv)
    for s in args.sparsities:
        if not 0 <= s < 1:
            p.error(f"--sparsities must be in [0, 1), got {s}")
    out = ensure_writable(Path(args.out))
    if args.dataset == "mnist" and not args.data_dir:  # the old default: MNIST without files means the bundled subset
        args.dataset = "bundled_mnist"
    if args.dataset != "bundled_mnist" and not args.data_dir:
        p.error(f"--dataset {args.dataset} needs --data-dir (only an MNIST subset is bundled)")
    inputs, labels = dataset_inputs(args.dataset, args.data_dir, args.image_size)  # the size matters for folders only
    print(f"skew: {args.dataset}, {len(labels)} training images of {inputs.shape[1]} inputs", flush=True)
    with Progress(1, "skew", enabled=not args.quiet, lines=True) as bar:
        def progress(done, total):
            bar.set_total(total)
            bar.update(done)

        summary = run_skew(inputs, labels, out, norms=args.norm, sparsities=args.sparsities,
                           batches=args.batches, batch_size=args.batch_size, inits=args.inits, seed=args.seed,
                           progress=progress)
    print(f"{'norm':>10} {'sparsity':>8} {'ratio':>14} {'1/sqrt(1-s)':>11} {'norm factor':>11}")
    for r in summary["ratios"]:
        print(f"{r['norm']:>10} {r['sparsity']:8.2f} {r['ratio_mean']:7.3f} +- {r['ratio_std']:.3f} {r['theory_bn']:11.3f} "
              f"{r['norm_factor_mean']:11.3f}")
    print("per-neuron slope of log ratio vs log(1 - s_i) (BatchNorm theory: -0.5 raw, 0 after; no skew: 0)")
    print(f"{'norm':>10} {'raw':>7} {'paper c_i':>9} {'SparseOpt':>9}")
    for norm, d in summary["per_neuron_slope"].items():
        print(f"{norm:>10} {d['before']:7.3f} {d['paper_c']:9.3f} {d['sparseopt']:9.3f}")
    _print_written(out, ["skew.csv", "per_neuron.csv", "skew.json", "skew.png"])
    return 0


def cmd_direction(argv: list[str]) -> int:
    from ..analysis.direction import run_direction
    from .train_args import add_config_flags, parse_train_args

    p = argparse.ArgumentParser(allow_abbrev=False, prog="sparseopt direction",
                                description="Cosine of consecutive update directions, ordinary vs across mask updates, "
                                            "baseline vs SparseOpt (paper section 3.3). Takes the train config keys.")
    add_config_flags(p)
    argv = list(argv)
    if "--out" not in argv:
        argv += ["--out", "runs/direction"]
    if "--epochs" not in argv and "--config" not in argv:
        argv += ["--epochs", "3"]
    cfg = parse_train_args(p, argv).validate()
    out = ensure_writable(Path(cfg.out))
    summary = run_direction(cfg, out)
    for method in ("sgd", "sparseopt"):
        s = summary[method]["update"]
        print(f"{method:>10}: mean cosine of consecutive updates {s['ordinary_mean_cosine']:.4f} on ordinary steps, "
              f"{s['across_update_mean_cosine']:.4f} across {s['across_pairs']} layer-mask updates (jump {s['jump']:.4f})")
    _print_written(out, ["direction.csv", "direction.json", "direction.png"])
    return 0


def cmd_toy_ham(argv: list[str]) -> int:
    from ..analysis.toy_ham import run_toy_ham

    p = argparse.ArgumentParser(allow_abbrev=False, prog="sparseopt toy-ham", description="HAM vs gradient descent on the one-neuron BN model (appendix A).")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/toy-ham")
    args = p.parse_args(argv)
    if args.lr <= 0 or args.steps < 1 or args.alpha <= 0:
        p.error("--lr and --alpha must be > 0 and --steps >= 1")
    out = ensure_writable(Path(args.out))
    summary = run_toy_ham(out, lr=args.lr, steps=args.steps, alpha=args.alpha, seed=args.seed)
    for model in ("one_neuron", "two_neurons"):
        for label, s in summary[model].items():
            print(f"{model:>11} {label:>14}: final a {[round(a, 4) for a in s['final_a']]}, loss {s['final_loss']:.3g}, "
                  f"invariant drift {100 * s['invariant_drift']:.3f}%, sign flipped {s['sign_flipped']}")
    _print_written(out, ["toy_ham.csv", "toy_ham.json", "toy_ham_one_neuron.png", "toy_ham_two_neurons.png"])
    return 0


def cmd_report(argv: list[str]) -> int:
    from ..analysis.report import report

    p = argparse.ArgumentParser(allow_abbrev=False, prog="sparseopt report", description="Tables and figures from run or sweep folders.")
    p.add_argument("runs", nargs="+", help="run folders or folders containing them (sweeps)")
    p.add_argument("--out", required=True)
    p.add_argument("--curves", help="also write every run's per-epoch and per-update metrics to this JSON-lines file")
    args = p.parse_args(argv)
    ensure_writable(Path(args.out))
    summary = report(args.runs, args.out, curves=args.curves)
    print((Path(args.out) / "report.md").read_text())
    print(json.dumps({"groups": len(summary["groups"]), "not_completed": len(summary["not_completed"]),
                      "missing": len(summary["missing"])}))
    return 0


def cmd_sweep(argv: list[str]) -> int:
    from ..sweep import load_sweep, run_sweep

    p = argparse.ArgumentParser(allow_abbrev=False, prog="sparseopt sweep", description="Expand a sweep file into runs and run them (idempotent).")
    p.add_argument("file", help="sweep YAML (see configs/sweeps/)")
    p.add_argument("--out", help="sweep folder (default: the file's 'out', else runs/sweeps/<name>)")
    p.add_argument("--launcher", choices=["local", "submitit"], default="local")
    p.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
    p.add_argument("--gpus", nargs="+", help="local: GPU ids to run on (sets CUDA_VISIBLE_DEVICES per run)")
    p.add_argument("--per-device", type=int, default=1, metavar="N",
                   help="runs at once on each GPU: local, on each GPU of --gpus; submitit, packed into each one-GPU job "
                        "(small models leave a GPU mostly idle; default 1)")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], help="submitit executor (default: slurm when available)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run, e.g. data_dir=~/data")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what would happen to each")
    p.add_argument("--retry-failed", action="store_true", help="restart diverged runs from scratch")
    p.add_argument("--no-wait", action="store_true", help="submitit: return after submitting")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel must be >= 1, got {args.parallel}")
    if args.per_device < 1:
        p.error(f"--per-device must be >= 1, got {args.per_device}")
    overrides = {}
    for item in args.set:
        if "=" not in item:
            p.error(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.replace("-", "_")] = value
    spec = load_sweep(args.file)
    out = Path(args.out or spec.out or Path("runs") / "sweeps" / spec.name)
    result = run_sweep(spec, out, overrides=overrides, launcher=args.launcher, parallel=args.parallel, gpus=args.gpus,
                       per_device=args.per_device,
                       cluster=args.cluster, dry_run=args.dry_run, retry_failed=args.retry_failed, wait=not args.no_wait)
    from ..sweep.runner import STOPPED_CODES

    codes, stopped_by = result["codes"], result.get("stopped_by")
    failed = [name for name, code in codes.items() if code not in (0, None) and not isinstance(code, str)
              and not (stopped_by and code in STOPPED_CODES)]
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {failed}")
        return 1
    # Stopped is not failed: 128 + the signal, as a shell reports a job it stopped (SLURM requeues on it).
    return 128 + stopped_by if stopped_by else 0
