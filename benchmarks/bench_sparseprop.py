"""Per-layer forward + backward: masked dense (torch), SparseProp and sparseopt's kernels, side by side.

SparseProp (IST-DASLab/sparseprop, Nikdan et al. ICML 2023) is never a dependency of sparseopt: run
this in a separate environment that has it,

    python -m venv /tmp/spv && /tmp/spv/bin/pip install torch==2.13.0 numpy pybind11 setuptools wheel
    /tmp/spv/bin/pip install --no-build-isolation sparseprop==0.1.14
    PYTHONPATH=. /tmp/spv/bin/python benchmarks/bench_sparseprop.py --threads 1 --json FILE

ResNet-20's convolution shapes at CIFAR size, batch 128, uniform sparsity (SparseProp's setting).
Each side runs one forward and one backward (input and weight gradient) of the layer; rounds
alternate between the sides; the median is reported. SparseProp is timed in both of its
vectorisation modes and the faster is kept (its own ``sparsify_conv2d_auto`` does the same).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

from sparseopt.native import build
from sparseopt.native.grad import TrainingWeight
from sparseopt.timing import time_alternating
from sparseopt.training_kernels.functions import SparseConv2dFunction

SHAPES = [  # (in, out, size, kernel, stride, padding): ResNet-20's convolutions
    (16, 16, 32, 3, 1, 1), (16, 32, 32, 3, 2, 1), (32, 32, 16, 3, 1, 1), (32, 64, 16, 3, 2, 1), (64, 64, 8, 3, 1, 1)]


def measure(shape, sparsity: float, batch: int, rounds: int, g: torch.Generator) -> dict:
    """One layer: forward + backward of each side, alternating rounds, medians in ms."""
    from sparseprop.modules.conv2d import SparseConv2d  # the separate environment's package

    c, o, size, k, s, pad = shape
    weight = torch.randn(o, c, k, k, generator=g)
    mask = torch.rand(o, c, k, k, generator=g) >= sparsity
    weight = weight * mask
    x = torch.randn(batch, c, size, size, generator=g)
    dy = torch.randn_like(F.conv2d(x, weight, None, s, pad))
    tw = TrainingWeight(mask)

    def masked():
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        F.conv2d(xi, wi, None, s, pad).backward(dy)

    def sparseopt_side():
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        SparseConv2dFunction.apply(xi, wi, None, tw, ((k, k), (s, s), (pad, pad)), False).backward(dy)

    def sparseprop_side(module):
        return lambda: module(x.clone().requires_grad_()).backward(dy)

    sides = {"masked": masked, "sparseopt": sparseopt_side}
    for mode in (False, True):
        module = SparseConv2d(weight.clone(), bias=None, padding=pad, stride=s, vectorizing_over_on=mode)
        sides[f"sparseprop_{'over_on' if mode else 'over_batch'}"] = sparseprop_side(module)
    ms = {name: round(seconds * 1e3, 3) for name, seconds in time_alternating(sides, rounds).items()}
    best = min(v for n, v in ms.items() if n.startswith("sparseprop"))
    return {"shape": f"{c}->{o} {size}x{size} k{k} s{s}", "sparsity": sparsity, **ms, "sparseprop_best": best,
            "sparseprop_speedup": round(ms["masked"] / best, 2), "sparseopt_speedup": round(ms["masked"] / ms["sparseopt"], 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.95])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    g = torch.Generator().manual_seed(0)
    for sparsity in args.sparsity:
        for shape in SHAPES:
            rows.append(measure(shape, sparsity, args.batch_size, args.rounds, g))
            print(json.dumps(rows[-1]), flush=True)
    result = {"threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds,
              "cpu": build.cpu_info()["model"], "backend": build.backend().path, "torch": torch.__version__,
              "python": platform.python_version(), "sparseprop": "0.1.14", "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
