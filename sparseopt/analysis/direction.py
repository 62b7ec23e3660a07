"""Update-direction jumps at mask updates (paper section 3.3, measured).

During a short DST run we record, for every masked layer and step, two
directions: ``gradient``, what the base optimizer is handed (the masked
gradient after SparseOpt's correction; the raw masked gradient for the
baseline), and ``update``, the weight change the step makes (momentum
included). The cosine similarity between consecutive directions is split into *ordinary* steps and steps
*across* a topology update (the previous recorded direction was taken with the
old mask). The paper argues that BN's neuron-dependent factors make the
direction jump when the masks change; SparseOpt should make the jump smaller.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..figures import pyplot, save_figure, write_csv
from ..files import write_json
from ..train.build import build_run, make_model
from ..train.config import TrainConfig
from ..train.data import make_loaders
from ..train.distributed import DistEnv
from ..train.spec import RunSpec

METHODS = ("sgd", "sparseopt")


def record_directions(cfg: TrainConfig) -> list[dict]:
    """Train ``cfg`` on the CPU and return one row per (step, layer) with the cosine to the previous direction."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    spec = RunSpec.from_config(cfg)
    data = make_loaders(spec.data, device, DistEnv())
    train_loader = data.train
    total = cfg.epochs * len(train_loader)
    model = make_model(cfg, data.num_classes).to(device)
    run = build_run(spec, model, total, spec.schedule.peak_lr)
    sched = spec.schedule.scheduler(run.optimizer, len(train_loader))
    masks, topology = run.masks, run.topology
    previous: dict[tuple[str, int], torch.Tensor] = {}
    before: list[torch.Tensor] = []
    rows: list[dict] = []
    state = {"step": 0, "updates_at_last": 0, "across": False}

    def record(kind: str, index: int, direction: torch.Tensor) -> None:
        key = (kind, index)
        if key in previous:
            cos = nn.functional.cosine_similarity(direction, previous[key], dim=0).item()
            rows.append({"method": cfg.optimizer, "kind": kind, "step": state["step"], "layer": masks.layers[index].name,
                         "cosine": cos, "across_mask_update": state["across"]})
        previous[key] = direction

    def pre(optimizer, args, kwargs):
        state["across"] = topology.num_updates != state["updates_at_last"]
        state["updates_at_last"] = topology.num_updates
        before[:] = [layer.weight.detach().clone() for layer in masks]
        for i, layer in enumerate(masks):
            record("gradient", i, layer.weight.grad.detach().reshape(-1).clone())

    def post(optimizer, args, kwargs):
        for i, layer in enumerate(masks):
            record("update", i, (layer.weight.detach() - before[i]).reshape(-1))

    base = run.optimizer.innermost()  # the torch optimizer: its pre-step hook sees the corrected gradient
    base.register_step_pre_hook(pre)
    base.register_step_post_hook(post)
    for epoch in range(cfg.epochs):
        train_loader.set_epoch(epoch)
        for x, y in train_loader:
            run.optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            topology.step()
            run.optimizer.step()
            sched.step()
            state["step"] += 1
    return rows


def summarise(rows: list[dict]) -> dict:
    """Mean cosine on ordinary steps and across mask updates, per method and kind (and per layer)."""

    def mean(values):
        return sum(values) / len(values) if values else None

    out: dict = {}
    for method in sorted({r["method"] for r in rows}):
        out[method] = {}
        for kind in ("update", "gradient"):
            sel = [r for r in rows if r["method"] == method and r["kind"] == kind]
            ordinary = [r["cosine"] for r in sel if not r["across_mask_update"]]
            across = [r["cosine"] for r in sel if r["across_mask_update"]]
            per_layer = {
                layer: {"ordinary": mean([r["cosine"] for r in sel if r["layer"] == layer and not r["across_mask_update"]]),
                        "across": mean([r["cosine"] for r in sel if r["layer"] == layer and r["across_mask_update"]])}
                for layer in dict.fromkeys(r["layer"] for r in sel)
            }
            out[method][kind] = {
                "ordinary_mean_cosine": mean(ordinary),
                "across_update_mean_cosine": mean(across),
                "jump": mean(ordinary) - mean(across) if ordinary and across else None,
                "ordinary_pairs": len(ordinary),
                "across_pairs": len(across),
                "per_layer": per_layer,
            }
    return out


def run_direction(cfg: TrainConfig, out: str | Path) -> dict:
    """Run the baseline and SparseOpt with the same seed; write CSV, JSON and a plot into ``out``."""
    out = Path(out)
    if cfg.dst not in ("set", "rigl"):
        raise ValueError(f"the direction analysis needs a dynamic method (--dst set or rigl), got {cfg.dst!r}")
    rows = []
    for method in METHODS:
        rows += record_directions(dataclasses.replace(cfg, optimizer=method))
    summary = summarise(rows)
    summary["setup"] = {k: getattr(cfg, k) for k in ("dataset", "model", "dst", "sparsity", "delta_t", "epochs",
                                                      "batch_size", "lr", "seed", "train_subset")}
    write_csv(out / "direction.csv", rows)
    write_json(out / "direction.json", summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    for i, method in enumerate(METHODS):
        sel = [r for r in rows if r["method"] == method and r["kind"] == "update"]
        steps = sorted({r["step"] for r in sel})
        mean = {s: [] for s in steps}
        for r in sel:
            mean[r["step"]].append(r["cosine"])
        axes[0].plot(steps, [sum(mean[s]) / len(mean[s]) for s in steps], lw=0.8, color=f"C{i}",
                     label="masked SGD baseline" if method == "sgd" else "SparseOpt")
        jumps = sorted({r["step"] for r in sel if r["across_mask_update"]})
        axes[0].scatter(jumps, [sum(mean[s]) / len(mean[s]) for s in jumps], color=f"C{i}", marker="v", s=25, zorder=3)
    axes[0].set(xlabel="step", ylabel="cosine(update_t, update_t-1), mean over layers",
                title="Consecutive weight updates (triangles: across a mask update)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    labels = ["ordinary", "across update"]
    width = 0.38
    for i, method in enumerate(METHODS):
        vals = [summary[method]["update"]["ordinary_mean_cosine"] or 0.0,
                summary[method]["update"]["across_update_mean_cosine"] or 0.0]
        axes[1].bar([j + (i - 0.5) * width for j in range(2)], vals, width, color=f"C{i}",
                    label="baseline" if method == "sgd" else "SparseOpt")
    axes[1].set_xticks(range(2), labels)
    axes[1].set(ylabel="mean cosine of consecutive updates", title="Summary")
    axes[1].legend()
    axes[1].grid(alpha=0.3, axis="y")
    save_figure(fig, out / "direction.png")
    return summary
