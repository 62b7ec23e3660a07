"""``sparseopt export`` and ``sparseopt bench-infer``: a trained sparse network as a small file and fast CPU inference."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_export(argv: list[str]) -> int:
    from ..deploy.export import FILE_FORMATS, export_sparse
    from ..deploy.run import load_run

    p = argparse.ArgumentParser(prog="sparseopt export", allow_abbrev=False,
                                description="Write a run's final model as a file of its active weights only.")
    p.add_argument("run", help="a training run folder (config.yaml + checkpoint.pt)")
    p.add_argument("--out", help="the file to write (default: RUN/model.sparse.pt or .safetensors)")
    p.add_argument("--format", default="pt", choices=list(FILE_FORMATS),
                   help="a torch.save container or a safetensors file, the same contents (default: pt)")
    args = p.parse_args(argv)
    model, masks, meta = load_run(args.run)
    out = Path(args.out) if args.out else Path(args.run) / f"model.sparse.{args.format}"
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the file to write")
    summary = export_sparse(model, masks, out, **meta, format=args.format)
    print(f"wrote {out}: {summary['bytes'] / 1e6:.3f} MB, {summary['ratio']:.4f}x the dense state_dict "
          f"({summary['dense_bytes'] / 1e6:.3f} MB); sparsity {masks.sparsity():.4f}, {masks.structure}")
    print(f"load it with: sparseopt.load_sparse({str(out)!r})")
    return 0


def cmd_bench_infer(argv: list[str]) -> int:
    from ..deploy.bench import bench_inference
    from ..deploy.run import example_batch, load_run, synthetic_model
    from ..files import write_json
    from ..masks.distributions import DISTRIBUTIONS
    from ..masks.structure import STRUCTURES
    from ..memory import describe, reuse_freed_memory

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
    p.add_argument("--reuse-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory for the next call (sparseopt.memory.reuse_freed_memory(), what a serving "
                        "process should call); --no-reuse-memory: the C library's defaults")
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
    reused = args.reuse_memory and reuse_freed_memory()  # before either side runs: both get it
    result = bench_inference(model, masks, x, threads=args.threads, rounds=args.rounds, repeats=args.repeats)
    result["what"], result["reuse_memory"] = label, reused
    backend = result["backend"]
    print(f"{label}, batch {args.batch_size}, {result['threads']} threads, input {tuple(shape)}, {describe(reused)}; "
          f"compiled kernels: {backend['path']} ({backend['reason']})")
    print(f"{'layer':28s} {'density':>7s} {'kernel':>9s}  ms of each kernel timed")
    for name, layer in result["layers"].items():
        ms = ", ".join(f"{k} {v:.3f}" for k, v in layer["ms"].items())
        print(f"{name:28s} {layer['density']:7.3f} {layer['kernel']:>9s}  {ms}")
    for name, why in result["kept_dense_reasons"].items():
        print(f"{name:28s} kept dense: {why}")
    print(f"dense {result['dense_ms']:.2f} ms ({result['dense_layout']}, BN folded) | sparse {result['sparse_ms']:.2f} ms | "
          f"speedup {result['speedup']:.2f}x | max |diff| {result['max_abs_diff']:.2e}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_kernels(argv: list[str]) -> int:
    from ..native import build

    p = argparse.ArgumentParser(prog="sparseopt kernels", allow_abbrev=False,
                                description="Which compiled kernel path is active and why; builds the kernels "
                                            "on first use. SPARSEOPT_NATIVE=0 switches them off, SPARSEOPT_SIMD="
                                            "avx2|portable caps the SIMD path, SPARSEOPT_CACHE moves the cache.")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.add_argument("--rebuild", action="store_true", help="delete this machine's cached build first")
    args = p.parse_args(argv)
    if args.rebuild:
        build.clear_cache()
    backend = build.load(warn=False)[0]
    if args.json:
        print(json.dumps(backend.as_dict(), indent=1))
        return 0
    cpu = backend.cpu
    print(f"path:     {backend.path}" + ("" if backend.available else " (torch's kernels: csr, condensed, dense)"))
    print(f"why:      {backend.reason}")
    print(f"cpu:      {cpu.get('model')} ({cpu.get('machine')}); SIMD flags: {' '.join(cpu.get('simd', [])) or 'none'}")
    if backend.compiler:
        print(f"compiler: {backend.compiler} ({backend.compiler_version})")
        print(f"flags:    {' '.join(backend.flags)}")
        print(f"cache:    {backend.cache_dir}")
    if backend.build_seconds is not None:
        print(f"build:    {backend.build_seconds:.2f} s " + ("(built now)" if backend.built_now else "(cached)"))
    if backend.available and backend.best_path != backend.path:
        print(f"best:     {backend.best_path} (capped by SPARSEOPT_SIMD)")
    return 0
