"""Per-neuron gradient skew behind each normalization, and what SparseOpt's c does to it (docs/results.md, section 4).

    python scripts/norm_skew_table.py [--data-dir ../shared/data/mnist] [--inits 5] [--batches 50]

The paper's gradient experiment (``sparseopt.analysis.skew.gradient_ratio``): Linear(784 -> 64) with neuron
sparsities spread over [0.5, 0.97], one normalization (BatchNorm, LayerNorm, RMSNorm, GroupNorm with 2 or 8
neurons a group), ReLU, Linear(64 -> 10), on MNIST at initialisation; the dense twin shares the
initialisation. The slope of each neuron's log gradient ratio (sparse / dense) against log(1 - s_i): raw,
after the paper's per-neuron c_i, after the c SparseOpt applies (sparseopt.optim.norms). Neurons in spread
order ("ordered": neighbours have similar fan-in, so a GroupNorm group is nearly uniform) and shuffled (as
in a real mask).
"""

import argparse

import torch
from torch import nn

from sparseopt.analysis.skew import gradient_ratio, mnist_inputs, spread_mask, trend
from sparseopt.data import load_bundled_mnist, load_mnist

NORMS = {
    "batchnorm": "batchnorm",
    "layernorm": "layernorm",
    "rmsnorm": "rmsnorm",
    "groupnorm (2 a group)": lambda w: nn.GroupNorm(w // 2, w),
    "groupnorm (8 a group)": lambda w: nn.GroupNorm(w // 8, w),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir")
    p.add_argument("--inits", type=int, default=5)
    p.add_argument("--batches", type=int, default=50)
    args = p.parse_args()
    images, labels = load_mnist(args.data_dir, "mnist", True) if args.data_dir else load_bundled_mnist(True)
    inputs = mnist_inputs(images)
    print(f"{'normalization':>22} {'order':>8} {'raw':>7} {'paper c_i':>9} {'SparseOpt':>9}")
    for name, norm in NORMS.items():
        for order in ("ordered", "shuffled"):
            slopes = {"raw": [], "paper": [], "ours": []}
            for k in range(args.inits):
                gen = torch.Generator().manual_seed(k)
                mask = spread_mask((64, inputs.shape[1]), 0.5, 0.97, gen)
                if order == "shuffled":
                    mask = mask[torch.randperm(64, generator=gen)]
                r = gradient_ratio(inputs, labels, mask, norm, args.batches, 64, k)
                slopes["raw"].append(trend(r.neuron_sparsity, r.neuron_ratio))
                slopes["paper"].append(trend(r.neuron_sparsity, r.neuron_ratio * r.scales))
                slopes["ours"].append(trend(r.neuron_sparsity, r.neuron_ratio * r.sparseopt_scales))
            mean = {key: sum(v) / len(v) for key, v in slopes.items()}
            print(f"{name:>22} {order:>8} {mean['raw']:7.3f} {mean['paper']:9.3f} {mean['ours']:9.3f}", flush=True)


if __name__ == "__main__":
    main()
