"""Dense against sparse CPU inference over the deployment matrix of issue 17 (docs/deployment.md).

    OMP_NUM_THREADS=2 python benchmarks/bench_inference.py --json docs/bench/inference.json
    python benchmarks/bench_inference.py --models resnet20 --sparsities 0.98 --batches 1 --threads 1   # one cell

Each cell is one ``sparseopt.deploy.bench.bench_inference`` call: a synthetic model (random weights,
trained-like BatchNorm statistics, ERK or uniform masks, unstructured or constant fan-in), the dense side
eval-mode with BatchNorm folded in its faster layout, the sparse side from ``sparse_inference`` (kernels
chosen per layer by timing, the compiled direct kernel among them where it builds), both timed in
alternating rounds in one process; medians, reported as ratios. The JSON records the compiled backend
(path, compiler, CPU model and SIMD flags) once, and every cell's per-layer timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparseopt.deploy.bench import bench_inference  # noqa: E402
from sparseopt.deploy.run import example_batch, synthetic_model  # noqa: E402
from sparseopt.files import write_json  # noqa: E402
from sparseopt.native import build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet50"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--structures", nargs="+", default=["unstructured", "constant_fan_in"])
    p.add_argument("--distributions", nargs="+", default=["erk"], help="erk and/or uniform")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for CIFAR ResNets, 224 for ResNet-50")
    p.add_argument("--rounds", type=int, default=9, help="timed forward passes per side")
    p.add_argument("--rounds-big", type=int, default=3, help="timed forward passes per side of ResNet-50 cells "
                                                              "at batch > 8 (about a second each)")
    p.add_argument("--json", help="write all cells to this file (gzip-compressed when it ends in .gz)")
    args = p.parse_args()
    rows = []
    backend = build.backend()
    print(f"backend: {backend.path} ({backend.reason}); CPU {backend.cpu.get('model')}, "
          f"SIMD {' '.join(backend.cpu.get('simd', []))}")
    print("| model | sparsity | distribution | structure | batch | threads | dense ms | sparse ms | speedup | "
          "layers sparse | max abs diff |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    cells = [(m, s, d, st) for m in args.models for s in args.sparsities for d in args.distributions
             for st in args.structures]
    for model_name, sparsity, distribution, structure in cells:
        model, masks, shape = synthetic_model(model_name, sparsity, distribution, structure=structure,
                                              image_size=args.image_size)
        for batch in args.batches:
            big = model_name == "resnet50" and batch > 8  # about a second a forward pass: fewer rounds
            x = example_batch(shape, batch)
            for threads in args.threads:
                r = bench_inference(model, masks, x, threads=threads, rounds=args.rounds_big if big else args.rounds,
                                    repeats=2 if big else 5)
                sparse_layers = sum(v for k, v in r["kernel_counts"].items() if k != "dense")
                row = {"model": model_name, "sparsity": sparsity, "distribution": distribution,
                       "structure": structure, "batch": batch, **r}
                row.pop("backend")  # once, at the top of the file
                rows.append(row)
                print(f"| {model_name} | {sparsity:g} | {distribution} | {structure} | {batch} | {r['threads']} | "
                      f"{r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['speedup']:.2f}x | "
                      f"{sparse_layers}/{len(r['layers'])} | {r['max_abs_diff']:.1e} |", flush=True)
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "backend": backend.as_dict(), "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
