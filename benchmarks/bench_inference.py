"""Dense against sparse CPU inference over the deployment matrix of issue 17 (docs/deployment.md).

    OMP_NUM_THREADS=2 python benchmarks/bench_inference.py --json docs/bench/inference.json
    python benchmarks/bench_inference.py --models resnet20 --sparsities 0.98 --batches 1 --threads 1   # one cell

Each cell is one ``sparseopt.deploy.bench.bench_inference`` call: a synthetic model (random weights,
trained-like BatchNorm statistics, ERK masks, unstructured or constant fan-in), the dense side eval-mode
with BatchNorm folded in its faster layout, the sparse side from ``sparse_inference`` (kernels chosen per
layer by timing), both timed in alternating rounds in one process; medians, reported as ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparseopt.deploy.bench import bench_inference  # noqa: E402
from sparseopt.deploy.run import example_batch, synthetic_model  # noqa: E402
from sparseopt.train.io import write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet50"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--structures", nargs="+", default=["unstructured", "constant_fan_in"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for CIFAR ResNets, 224 for ResNet-50")
    p.add_argument("--rounds", type=int, default=9, help="timed forward passes per side (fewer for large cells)")
    p.add_argument("--json", help="write all cells to this file")
    args = p.parse_args()
    rows = []
    print("| model | sparsity | structure | batch | threads | dense ms | sparse ms | speedup | layers sparse | max abs diff |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for model_name in args.models:
        for sparsity in args.sparsities:
            for structure in args.structures:
                model, masks, shape = synthetic_model(model_name, sparsity, structure=structure, image_size=args.image_size)
                for batch in args.batches:
                    big = model_name == "resnet50" and batch > 8  # about 2 s a forward pass: fewer rounds
                    x = example_batch(shape, batch)
                    for threads in args.threads:
                        r = bench_inference(model, masks, x, threads=threads, rounds=3 if big else args.rounds,
                                            repeats=2 if big else 5)
                        sparse_layers = sum(v for k, v in r["kernel_counts"].items() if k != "dense")
                        row = {"model": model_name, "sparsity": sparsity, "structure": structure, "batch": batch, **r}
                        rows.append(row)
                        print(f"| {model_name} | {sparsity:g} | {structure} | {batch} | {r['threads']} | {r['dense_ms']:.2f} | "
                              f"{r['sparse_ms']:.2f} | {r['speedup']:.2f}x | {sparse_layers}/{len(r['layers'])} | "
                              f"{r['max_abs_diff']:.1e} |", flush=True)
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
