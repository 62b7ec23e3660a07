"""Per-neuron gradient skew behind each normalization, and what SparseOpt's c does to it (docs/results.md, section 4).

    python scripts/norm_skew_table.py [--data-dir ../shared/data] [--inits 5] [--batches 50]

A Linear(784 -> 64) with neuron sparsities spread over [0.5, 0.97] feeds one normalization (BatchNorm,
LayerNorm, RMSNorm, GroupNorm with 2 or 8 neurons a group), then ReLU and Linear(64 -> 10), on MNIST at
initialisation; the dense twin shares the initialisation. For each neuron the ratio of mean |g| (sparse /
dense); the slope of log ratio against log(1 - s_i): raw, after the paper's per-neuron c_i, after the c
SparseOpt applies (sparseopt.optim.norms). Neurons in spread order ("ordered": neighbours have similar
fan-in, as within a GroupNorm group of a layer whose neurons are sorted) and shuffled (as in a real mask).
"""

import argparse

import torch
from torch import nn

from sparseopt.analysis.skew import mnist_inputs, spread_mask, trend
from sparseopt.data import load_bundled_mnist, load_mnist
from sparseopt.optim.norms import norm_group_size, removes_skew
from sparseopt.optim.preconditioner import neuron_scales

NORMS = {
    "batchnorm": lambda w: nn.BatchNorm1d(w),
    "layernorm": lambda w: nn.LayerNorm(w),
    "rmsnorm": lambda w: nn.RMSNorm(w),
    "groupnorm (2 a group)": lambda w: nn.GroupNorm(w // 2, w),
    "groupnorm (8 a group)": lambda w: nn.GroupNorm(w // 8, w),
}


def ratios(inputs, labels, mask, make_norm, seed, batches, batch_size=64):
    torch.manual_seed(seed)
    hidden = mask.shape[0]
    dense = nn.Sequential(nn.Linear(inputs.shape[1], hidden), make_norm(hidden), nn.ReLU(), nn.Linear(hidden, 10))
    sparse = nn.Sequential(nn.Linear(inputs.shape[1], hidden), make_norm(hidden), nn.ReLU(), nn.Linear(hidden, 10))
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        sparse[0].weight.mul_(mask)
    g = torch.Generator().manual_seed(seed + 1)
    num, den = torch.zeros(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64)
    for _ in range(batches):
        idx = torch.randint(0, len(inputs), (batch_size,), generator=g)
        for model, acc in ((dense, den), (sparse, num)):
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs[idx]), labels[idx]).backward()
            acc += (model[0].weight.grad.abs() * mask).sum(1).double()
    return num / den, sparse


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir")
    p.add_argument("--inits", type=int, default=5)
    p.add_argument("--batches", type=int, default=50)
    args = p.parse_args()
    images, labels = load_mnist(args.data_dir, "mnist", True) if args.data_dir else load_bundled_mnist(True)
    inputs = mnist_inputs(images)
    print(f"{'normalization':>22} {'order':>8} {'raw':>7} {'paper c_i':>9} {'SparseOpt':>9}")
    for name, make_norm in NORMS.items():
        for order in ("ordered", "shuffled"):
            rows = {"raw": [], "paper": [], "ours": []}
            for k in range(args.inits):
                gen = torch.Generator().manual_seed(k)
                mask = spread_mask((64, inputs.shape[1]), 0.5, 0.97, gen).float()
                if order == "shuffled":
                    mask = mask[torch.randperm(64, generator=gen)]
                ratio, model = ratios(inputs, labels, mask, make_norm, k, args.batches)
                s = 1 - mask.sum(1).double() / mask.shape[1]
                group = norm_group_size(model[1], model[0], torch.empty(1, 64))
                ours = neuron_scales(mask, group) if removes_skew(group, 64) else torch.ones(64)
                rows["raw"].append(trend(s, ratio))
                rows["paper"].append(trend(s, ratio * neuron_scales(mask).double()))
                rows["ours"].append(trend(s, ratio * ours.double()))
            mean = {k: sum(v) / len(v) for k, v in rows.items()}
            print(f"{name:>22} {order:>8} {mean['raw']:7.3f} {mean['paper']:9.3f} {mean['ours']:9.3f}", flush=True)


if __name__ == "__main__":
    main()
