"""Gradient skew of sparse layers under normalisation (paper Fig. 2, appendix D and E.3).

Setup (appendix E.3): ``Linear(784 -> 64)`` with a random mask at sparsity ``s``
-> optional BatchNorm / LayerNorm -> ReLU -> ``Linear(64 -> 10)`` on MNIST
normalised with mean 0.1307 / std 0.3081. A dense and a sparse model share one
initialisation; first-layer gradients are taken on ``batches`` mini-batches of
``batch_size`` at initialisation (no training). The ratio is
``mean |g_sparse| / mean |g_dense|`` over the active entries; theory (BN):
``1 / sqrt(1 - s)``.

The per-neuron view uses a mask whose neuron sparsities ``s_i`` spread over
``[s_lo, s_hi]`` and reports, for each normalization, the slope of each
neuron's log ratio against ``log(1 - s_i)``: raw, after the paper's per-neuron
``c_i = sqrt(n_i / n_avg)``, and after the scale SparseOpt applies behind that
normalization (:mod:`sparseopt.optim.norms`: per neuron behind BatchNorm, per
group behind GroupNorm, none behind LayerNorm / RMSNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..masks.maskset import random_mask
from ..models.mlp import MLP, NORMS, make_norm
from ..optim.norms import norm_group_size, removes_skew
from ..optim.preconditioner import neuron_scales

NORM_CHOICES = NORMS
SHARED_NORMS = ("layernorm", "rmsnorm")  # one statistic over all neurons of a sample


def mnist_inputs(images: torch.Tensor, mean=0.1307, std=0.3081) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C*H*W) normalised per channel (default MNIST's mean / std)."""
    shape = (1, -1, 1, 1)
    mean = torch.tensor(mean, dtype=torch.float32).reshape(shape)
    std = torch.tensor(std, dtype=torch.float32).reshape(shape)
    return ((images.float() / 255.0 - mean) / std).reshape(len(images), -1)


def dataset_inputs(dataset: str, data_dir, image_size: int = 28, limit: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened, normalised training inputs and labels of any dataset the trainer reads.

    Folders are read at ``image_size`` without augmentation (a fixed sample of ``limit`` images) and
    normalised with their own statistics (``imagefolder``) or ImageNet's; the others with their own.
    """
    from ..data import DATASETS, FOLDER_DATASETS, load_tensors
    from ..data.augment import pixel_statistics
    from ..data.imagefolder import ImageFolder

    info = DATASETS[dataset]
    if dataset in FOLDER_DATASETS:
        folder = ImageFolder(data_dir, "train", train=False, image_size=image_size, resize=image_size, name=dataset,
                             augment="none")
        images, labels = folder.sample(limit)
        mean, std = pixel_statistics(images, limit)[:2] if dataset == "imagefolder" else (info.mean, info.std)
        return mnist_inputs(images, mean, std), labels
    images, labels = load_tensors(dataset, data_dir, train=True)
    return mnist_inputs(images, info.mean, info.std), labels


@dataclass
class SkewResult:
    ratio: float  # mean |g_sparse| / mean |g_dense| over active entries
    neuron_ratio: torch.Tensor  # per neuron, same definition
    neuron_sparsity: torch.Tensor  # s_i of the mask
    scales: torch.Tensor  # the paper's per-neuron c_i for the mask
    sparseopt_scales: torch.Tensor  # the c SparseOpt applies behind this normalization (ones: not preconditioned)
    neuron_factor: torch.Tensor  # normalisation-scale ratio sigma_dense / sigma_sparse seen by each neuron


def gradient_ratio(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    norm: str = "batchnorm",
    batches: int = 100,
    batch_size: int = 64,
    seed: int = 0,
    hidden: int = 64,
) -> SkewResult:
    """First-layer gradient ratio of a masked MLP against its dense twin (shared init)."""
    torch.manual_seed(seed)
    classes = max(10, int(labels.max()) + 1)
    dense = MLP(inputs.shape[1], hidden, classes, norm=norm)
    sparse = MLP(inputs.shape[1], hidden, classes, norm=norm)
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        sparse[1].weight.mul_(mask)
    active = mask.float()
    g = torch.Generator().manual_seed(seed + 1)
    num = torch.zeros(hidden, dtype=torch.float64)
    den = torch.zeros(hidden, dtype=torch.float64)
    factor = torch.zeros(hidden, dtype=torch.float64)
    for _ in range(batches):
        idx = torch.randint(0, len(inputs), (batch_size,), generator=g)
        x, y = inputs[idx], labels[idx]
        with torch.no_grad():
            factor += normalisation_factor(dense[1](x), sparse[1](x), norm)
        for model, acc in ((dense, den), (sparse, num)):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            acc += (model[1].weight.grad.abs() * active).sum(1).double()
    fan = active.sum(1).double()
    keep = fan > 0
    neuron_ratio = torch.full((hidden,), float("nan"), dtype=torch.float64)
    neuron_ratio[keep] = (num[keep] / fan[keep]) / (den[keep] / fan[keep])
    return SkewResult(
        ratio=(num.sum() / den.sum()).item(),
        neuron_ratio=neuron_ratio,
        neuron_sparsity=1.0 - fan / mask.shape[1],
        scales=neuron_scales(mask).double(),
        sparseopt_scales=sparseopt_scales(mask, norm).double(),
        neuron_factor=factor / batches,
    )


def sparseopt_scales(mask: torch.Tensor, norm: str) -> torch.Tensor:
    """The ``c`` SparseOpt (``layers="normalized"``) applies to a Linear layer of ``mask`` followed by ``norm``."""
    layer, module = nn.Linear(mask.shape[1], mask.shape[0]), make_norm(norm, mask.shape[0])
    if module is None:
        return torch.ones(mask.shape[0])
    group = norm_group_size(module, layer, torch.empty(1, mask.shape[0]))
    if not removes_skew(group, mask.shape[0]):
        return torch.ones(mask.shape[0])
    return neuron_scales(mask, group)


def normalisation_factor(z_dense: torch.Tensor, z_sparse: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-neuron factor by which the norm layer amplifies the sparse layer's gradient (vs dense).

    BatchNorm divides neuron ``i`` by its own batch std: factor ``sigma_i(dense) / sigma_i(sparse)``,
    one per neuron. LayerNorm divides every neuron of a sample by the same layer std: the factor
    ``sigma(dense) / sigma(sparse)`` (averaged over samples) is shared by all neurons (appendix D).
    RMSNorm the same with the root mean square; GroupNorm per group of neurons. Without normalisation the factor is 1.
    """
    width = z_dense.shape[1]
    if norm == "batchnorm":
        return (z_dense.std(0, unbiased=False) / z_sparse.std(0, unbiased=False).clamp_min(1e-12)).double()
    if norm in SHARED_NORMS:
        spread = (lambda z: z.pow(2).mean(1).sqrt()) if norm == "rmsnorm" else (lambda z: z.std(1, unbiased=False))
        shared = (spread(z_dense) / spread(z_sparse).clamp_min(1e-12)).mean()
        return shared.double().expand(width).clone()
    if norm == "groupnorm":
        groups = make_norm(norm, width).num_groups
        dense, sparse = (z.reshape(len(z), groups, -1).std(2, unbiased=False) for z in (z_dense, z_sparse))
        return (dense / sparse.clamp_min(1e-12)).mean(0).repeat_interleave(width // groups).double()
    return torch.ones(width, dtype=torch.float64)


def uniform_random_mask(shape, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Random mask with exactly ``round((1 - s) * numel)`` active weights anywhere in the layer."""
    numel = shape[0] * shape[1]
    return random_mask(torch.Size(shape), round((1 - sparsity) * numel), generator, "cpu")


def row_uniform_mask(shape, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Every neuron with exactly the same fan-in (uniform neuron sparsity)."""
    n = round((1 - sparsity) * shape[1])
    return torch.stack([random_mask(torch.Size([shape[1]]), n, generator, "cpu") for _ in range(shape[0])])


def spread_mask(shape, s_lo: float, s_hi: float, generator: torch.Generator) -> torch.Tensor:
    """Neuron ``i`` with sparsity ``s_i`` spread evenly over ``[s_lo, s_hi]`` (non-uniform, as ERK/RigL masks become)."""
    s = torch.linspace(s_lo, s_hi, shape[0])
    return torch.stack([random_mask(torch.Size([shape[1]]), max(1, round((1 - si.item()) * shape[1])), generator, "cpu") for si in s])


def trend(x: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope of ``log y`` on ``log(1 - x)`` (BN theory: -0.5; no skew: 0)."""
    lx, ly = torch.log(1 - x), torch.log(y)
    ok = torch.isfinite(lx) & torch.isfinite(ly)
    lx, ly = lx[ok], ly[ok]
    return (((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()).item()


DEFAULT_SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def run_skew(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    out,
    *,
    norms=("batchnorm", "none"),
    sparsities=DEFAULT_SPARSITIES,
    batches: int = 100,
    batch_size: int = 64,
    inits: int = 5,
    seed: int = 0,
    spread=(0.5, 0.97),
    progress=None,
) -> dict:
    """The whole ``sparseopt skew`` analysis; writes CSV, JSON and PNG files into ``out``.

    ``progress``: optional callable ``(done, total)`` called after each gradient measurement.
    """
    from pathlib import Path

    from ..figures import pyplot, save_figure, write_csv
    from ..files import write_json

    out = Path(out)
    rows, summary = [], {}
    total, done = len(norms) * (len(sparsities) + 1) * inits, 0
    for norm in norms:
        for s in sparsities:
            ratios, neuron_cv, factors, factor_cv = [], [], [], []
            for k in range(inits):
                gen = torch.Generator().manual_seed(seed + k)
                # LayerNorm's theory is for uniform neuron sparsity: give every neuron the same fan-in.
                mask = (row_uniform_mask if norm in SHARED_NORMS else uniform_random_mask)((64, inputs.shape[1]), s, gen)
                r = gradient_ratio(inputs, labels, mask, norm, batches, batch_size, seed + k)
                done += 1
                if progress is not None:
                    progress(done, total)
                ratios.append(r.ratio)
                neuron_cv.append((r.neuron_ratio.std() / r.neuron_ratio.mean()).item())
                factors.append(r.neuron_factor.mean().item())
                factor_cv.append((r.neuron_factor.std() / r.neuron_factor.mean()).item())
            t = torch.tensor(ratios)
            rows.append({"norm": norm, "sparsity": s, "ratio_mean": t.mean().item(),
                         "ratio_std": t.std().item() if inits > 1 else 0.0,
                         "theory_bn": (1 - s) ** -0.5, "neuron_ratio_cv": sum(neuron_cv) / inits,
                         "norm_factor_mean": sum(factors) / inits, "norm_factor_cv": sum(factor_cv) / inits, "inits": inits})
    # Per-neuron view, for each normalization: neuron sparsities spread over [s_lo, s_hi]; the slope of each
    # neuron's gradient ratio raw, after the paper's per-neuron c_i, and after what SparseOpt applies there.
    neuron_rows = []
    slopes = {norm: {"before": [], "paper_c": [], "sparseopt": []} for norm in norms}
    for norm in norms:
        for k in range(inits):
            mask = spread_mask((64, inputs.shape[1]), spread[0], spread[1], torch.Generator().manual_seed(seed + k))
            r = gradient_ratio(inputs, labels, mask, norm, batches, batch_size, seed + k)
            done += 1
            if progress is not None:
                progress(done, total)
            paper, ours = r.neuron_ratio * r.scales, r.neuron_ratio * r.sparseopt_scales
            for key, ratio in (("before", r.neuron_ratio), ("paper_c", paper), ("sparseopt", ours)):
                slopes[norm][key].append(trend(r.neuron_sparsity, ratio))
            for i in range(len(r.neuron_ratio)):
                neuron_rows.append({"norm": norm, "init": k, "neuron": i, "neuron_sparsity": r.neuron_sparsity[i].item(),
                                    "ratio": r.neuron_ratio[i].item(), "scale_c": r.scales[i].item(),
                                    "ratio_after_paper_c": paper[i].item(), "sparseopt_c": r.sparseopt_scales[i].item(),
                                    "ratio_after_sparseopt": ours[i].item()})
    summary = {
        "setup": {"batches": batches, "batch_size": batch_size, "inits": inits, "seed": seed, "spread": list(spread),
                  "examples": len(labels)},
        "ratios": rows,
        # Per norm: raw, after the paper's per-neuron c_i, after SparseOpt's c (theory: BatchNorm -0.5 raw, 0 after).
        "per_neuron_slope": {norm: {k: sum(v) / len(v) for k, v in d.items()} for norm, d in slopes.items()},
        "per_neuron_slope_theory": {"batchnorm": {"before": -0.5, "paper_c": 0.0, "sparseopt": 0.0}},
    }
    write_csv(out / "skew.csv", rows)
    write_csv(out / "per_neuron.csv", neuron_rows)
    write_json(out / "skew.json", summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, norm in enumerate(norms):
        sel = [r for r in rows if r["norm"] == norm]
        xs = [r["theory_bn"] for r in sel]
        axes[0].errorbar(xs, [r["ratio_mean"] for r in sel], yerr=[r["ratio_std"] for r in sel], marker="o",
                         capsize=3, color=f"C{i}", label="without normalisation" if norm == "none" else
                         f"with {norm}" + (" (uniform fan-in)" if norm in SHARED_NORMS else ""))
    lim = max(r["theory_bn"] for r in rows)
    axes[0].plot([1, lim], [1, lim], "k--", lw=1, label="theory 1/sqrt(1-s)")
    axes[0].set(xlabel="1 / sqrt(1 - s)", ylabel="mean |g_sparse| / mean |g_dense|",
                title="First-layer gradient ratio at initialisation")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    for i, norm in enumerate(norms):
        sel = [r for r in neuron_rows if r["norm"] == norm]
        s_i = [r["neuron_sparsity"] for r in sel]
        d = summary["per_neuron_slope"][norm]
        axes[1].scatter(s_i, [r["ratio"] for r in sel], s=6, alpha=0.35, color=f"C{i}", marker="o",
                        label=f"{norm}, raw (slope {d['before']:.2f})")
        axes[1].scatter(s_i, [r["ratio_after_sparseopt"] for r in sel], s=6, alpha=0.35, color=f"C{i}", marker="x",
                        label=f"{norm}, after SparseOpt (slope {d['sparseopt']:.2f})")
    grid = torch.linspace(spread[0], spread[1], 50)
    axes[1].plot(grid, (1 - grid) ** -0.5, "k--", lw=1, label="1/sqrt(1 - s_i)")
    axes[1].set(xlabel="neuron sparsity s_i", ylabel="per-neuron gradient ratio", yscale="log",
                title="Per neuron, before and after SparseOpt's c")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    save_figure(fig, out / "skew.png")
    return summary
