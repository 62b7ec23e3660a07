"""``sparseopt export`` and ``sparseopt bench-infer``: a trained sparse network as a small file and fast CPU inference."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(argv: list[str]) -> int:
    from ..deploy.export import export_sparse
    from ..deploy.run import load_run

    p = argparse.ArgumentParser(prog="sparseopt export", allow_abbrev=False,
                                description="Write a run's final model as a file of its active weights only.")
    p.add_argument("run", help="a training run folder (config.yaml + checkpoint.pt)")
    p.add_argument("--out", help="the file to write (default: RUN/model.sparse.pt)")
    args = p.parse_args(argv)
    model, masks, meta = load_run(args.run)
    out = Path(args.out) if args.out else Path(args.run) / "model.sparse.pt"
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the file to write")
    summary = export_sparse(model, masks, out, **meta)
    print(f"wrote {out}: {summary['bytes'] / 1e6:.3f} MB, {summary['ratio']:.4f}x the dense state_dict "
          f"({summary['dense_bytes'] / 1e6:.3f} MB); sparsity {masks.sparsity():.4f}, {masks.structure}")
    print(f"load it with: sparseopt.load_sparse({str(out)!r})")
    return 0


def cmd_bench_infer(argv: list[str]) -> int:
    from ..deploy.bench import bench_inference
    from ..deploy.run import example_batch, load_run, synthetic_model
    from ..masks.distributions import DISTRIBUTIONS
    from ..masks.structure import STRUCTURES
    from ..train.io import write_json

    p = argparse.ArgumentParser(prog="sparseopt bench-infer", allow_abbrev=False,
                                description="Dense against sparse CPU inference, side by side in one run.")
    p.add_argument("--run", help="measure a trained run folder instead of a synthetic model")
    p.add_argument("--model", default="resnet20", help="registered model (synthetic: random weights)")
    p.add_argument("--num-classes", type=int, default=None, help="default: 10 (1000 for resnet50)")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--distribution", default="erk", choices=[d for d in DISTRIBUTIONS if d != "custom"])
    p.add_argument("--structure", default="unstructured", choices=list(STRUCTURES))
    p.add_argument("--nm", default=None, help="N:M of --structure nm (e.g. 2:4)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=15, help="timed forward passes of each side")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each kernel when choosing per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    if min(args.batch_size, args.rounds, args.repeats, args.threads or 1) < 1:
        p.error("--batch-size, --rounds, --repeats and --threads must be >= 1")
    if args.run:
        model, masks, meta = load_run(args.run)
        shape, label = tuple(meta["input_shape"]), f"run {args.run}"
        if args.image_size:
            shape = (shape[0], args.image_size, args.image_size)
    else:
        model, masks, shape = synthetic_model(args.model, args.sparsity, args.distribution, args.structure, args.nm,
                                              num_classes=args.num_classes, image_size=args.image_size, seed=args.seed)
        label = f"{args.model} {args.structure if args.structure != 'nm' else args.nm} {args.distribution} " \
                f"sparsity {args.sparsity:g}"
    x = example_batch(shape, args.batch_size, args.seed)
    result = bench_inference(model, masks, x, threads=args.threads, rounds=args.rounds, repeats=args.repeats)
    result["what"] = label
    print(f"{label}, batch {args.batch_size}, {result['threads']} threads, input {tuple(shape)}")
    print(f"{'layer':28s} {'density':>7s} {'kernel':>9s}  ms (dense / csr / condensed)")
    for name, layer in result["layers"].items():
        ms = " / ".join(f"{layer['ms'].get(k, float('nan')):.3f}" for k in ("dense", "csr", "condensed") if k in layer["ms"])
        print(f"{name:28s} {layer['density']:7.3f} {layer['kernel']:>9s}  {ms}")
    print(f"dense {result['dense_ms']:.2f} ms ({result['dense_layout']}, BN folded) | sparse {result['sparse_ms']:.2f} ms | "
          f"speedup {result['speedup']:.2f}x | max |diff| {result['max_abs_diff']:.2e}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
