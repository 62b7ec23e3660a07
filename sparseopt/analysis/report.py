"""``sparseopt report``: run folders -> the paper's tables and figures.

Finds every run folder (a folder with ``config.yaml``) under the given paths,
including sweep folders, groups completed runs by
``(dataset, model, dst, optimizer, ham, renorm, growth_grad, sparsity, epochs)``,
and writes mean +- std over seeds (sample standard deviation, ``ddof = 1``; 0 for
a single seed) as markdown and CSV tables shaped like the paper's Tables 1-3,
with the paper's published numbers beside ours where the setting matches, plus:

* ``accuracy_vs_budget.png``: final test accuracy against the epoch budget (Figs. 11-14);
* ``curves.png``: train / test accuracy over epochs (Figs. 3-4, 15-16);
* ``itop_vs_sparsity.png``: final ITOP rate against sparsity (Fig. 5).

Runs without a ``results.json`` (incomplete), with a status other than
``completed`` (diverged, failed), and runs a sweep expected but that are absent
are listed in the report, never silently dropped.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..train.io import read_metrics, write_json
from .figures import pyplot, save_figure, write_csv, write_text

GROUP_KEYS = ("dataset", "model", "dst", "optimizer", "ham", "renorm", "growth_grad", "sparsity", "epochs")

# Top-1 % reported by the paper (SPEC section 7), RigL. Key: (dataset, model, dst, sparsity, optimizer, ham) -> {epochs: acc}.
PAPER: dict[tuple, dict[int, float]] = {
    ("imagenet", "resnet50", "rigl", 0.9, "sparseopt", False): {90: 74.41, 180: 75.06, 270: 75.26},
    ("imagenet", "resnet50", "rigl", 0.9, "sgd", False): {90: 73.88, 180: 74.99, 270: 75.26},
    ("imagenet", "resnet50", "rigl", 0.95, "sparseopt", False): {90: 72.93, 180: 73.62, 270: 73.95},
    ("imagenet", "resnet50", "rigl", 0.95, "sgd", False): {90: 72.33, 180: 73.36, 270: 73.62},
    ("imagenet", "resnet50", "rigl", 0.97, "sparseopt", False): {90: 71.15, 180: 72.65, 270: 72.66},
    ("imagenet", "resnet50", "rigl", 0.97, "sgd", False): {90: 69.94, 180: 72.00, 270: 72.35},
    ("cifar100", "resnet20", "rigl", 0.9, "sparseopt", False): {100: 61.34, 200: 63.12, 300: 64.30, 500: 65.22},
    ("cifar100", "resnet20", "rigl", 0.9, "sgd", False): {100: 60.66, 200: 62.93, 300: 63.77, 500: 64.66},
    ("cifar100", "resnet20", "rigl", 0.95, "sparseopt", False): {100: 56.80, 200: 59.91, 300: 60.67, 500: 61.74},
    ("cifar100", "resnet20", "rigl", 0.95, "sgd", False): {100: 55.80, 200: 59.22, 300: 60.00, 500: 61.45},
    ("cifar100", "resnet20", "rigl", 0.97, "sparseopt", False): {100: 53.95, 200: 57.01, 300: 57.62, 500: 58.35},
    ("cifar100", "resnet20", "rigl", 0.97, "sgd", False): {100: 52.53, 200: 54.87, 300: 56.50, 500: 57.32},
    ("cifar100", "resnet20", "rigl", 0.95, "sparseopt", True): {100: 57.31, 200: 60.41, 300: 60.91, 500: 62.20},
    ("cifar100", "resnet20", "rigl", 0.95, "sgd", True): {100: 56.72, 200: 58.76, 300: 60.38, 500: 61.66},
}


@dataclass
class RunRecord:
    path: Path
    config: dict[str, Any]
    status: str  # completed / incomplete / diverged / ...
    results: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return tuple(self.config.get(k) for k in GROUP_KEYS)


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run or sweep folder: {p}")
        if (p / "config.yaml").is_file():
            found.append(p)
        found += sorted(c.parent for c in p.rglob("config.yaml") if c.parent != p)
    return sorted(dict.fromkeys(found))


def load_run(path: Path) -> RunRecord:
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    results_path = path / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    metrics = read_metrics(path)
    status = results.get("status", "unknown") if results else "incomplete"
    return RunRecord(path, config, status, results, metrics)


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def method_label(optimizer: str, ham: bool, renorm, growth_grad: str) -> str:
    label = "Ours" if optimizer == "sparseopt" else "Baseline"
    extras = []
    if ham:
        extras.append("w/ HAM")
    if renorm is not None:
        extras.append(f"renorm {renorm:g}")
    if growth_grad != "original":
        extras.append(f"{growth_grad} growth")
    return f"{label} ({', '.join(extras)})" if extras else label


def _mean_of(runs: list[RunRecord], key: str) -> float | None:
    values = [r.results["final"][key] for r in runs if key in r.results.get("final", {})]
    return mean_std(values)[0] if values else None


def aggregate(records: list[RunRecord]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status == "completed":
            groups[r.key].append(r)
    rows = []
    for key, runs in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        fields = dict(zip(GROUP_KEYS, key))
        acc_mean, acc_std = mean_std([r.results["final"]["test_acc"] for r in runs])
        itops = [r.results["final"]["itop"] for r in runs if "itop" in r.results.get("final", {})]
        paper = PAPER.get((fields["dataset"], fields["model"], fields["dst"], fields["sparsity"], fields["optimizer"],
                           bool(fields["ham"])), {}) if fields["renorm"] is None and fields["growth_grad"] == "original" else {}
        rows.append({
            **fields,
            "method": method_label(fields["optimizer"], fields["ham"], fields["renorm"], fields["growth_grad"]),
            "n_seeds": len(runs),
            "seeds": sorted(r.config.get("seed") for r in runs),
            "test_acc_mean": acc_mean,
            "test_acc_std": acc_std,
            "best_test_acc_mean": mean_std([r.results["best_test_acc"] for r in runs])[0],
            "train_loss_mean": _mean_of(runs, "train_loss"),
            "train_acc_mean": _mean_of(runs, "train_acc"),
            "itop_mean": mean_std(itops)[0] if itops else None,
            "paper_test_acc": paper.get(fields["epochs"]),
        })
    return rows


def markdown_tables(rows: list[dict[str, Any]]) -> str:
    """Per (dataset, model, dst): test accuracy (mean +- std) and final training loss, rows sparsity x method."""
    return "\n".join(_table(rows, what) for what in ("test", "train_loss", "itop"))


def _table(rows: list[dict[str, Any]], what: str) -> str:
    out = []
    for setting in dict.fromkeys((r["dataset"], r["model"], r["dst"]) for r in rows):
        sel = [r for r in rows if (r["dataset"], r["model"], r["dst"]) == setting]
        budgets = sorted({r["epochs"] for r in sel})
        title = {"test": "top-1 test accuracy (%), mean +- std over seeds (n)",
                 "train_loss": "final training loss, mean over seeds (convergence)",
                 "itop": "final ITOP rate (%), mean over seeds (mask exploration)"}[what]
        out.append(f"### {setting[0]} / {setting[1]} / {setting[2]}: {title}\n")
        out.append("| sparsity | method | " + " | ".join(f"{e} epochs" for e in budgets) + " |")
        out.append("|---|---|" + "---:|" * len(budgets))
        for sparsity in sorted({r["sparsity"] for r in sel}):
            for method in sorted({r["method"] for r in sel if r["sparsity"] == sparsity}, key=lambda m: (not m.startswith("Ours"), m)):
                cells = []
                for e in budgets:
                    hit = [r for r in sel if r["sparsity"] == sparsity and r["method"] == method and r["epochs"] == e]
                    if not hit:
                        cells.append("")
                        continue
                    r = hit[0]
                    if what != "test":
                        value = r["train_loss_mean"] if what == "train_loss" else r["itop_mean"]
                        cells.append("" if value is None else f"{value:.4f}" if what == "train_loss" else f"{100 * value:.1f}")
                        continue
                    cell = f"{r['test_acc_mean']:.2f} +- {r['test_acc_std']:.2f} ({r['n_seeds']})"
                    if r["paper_test_acc"] is not None:
                        cell += f" [paper {r['paper_test_acc']:.2f}]"
                    cells.append(cell)
                out.append(f"| {100 * sparsity:g}% | {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def expected_runs(paths: list[str | Path]) -> list[str]:
    """Run folders a sweep planned (``sweep.json`` written by ``sparseopt sweep``)."""
    names = []
    for p in map(Path, paths):
        manifest = p / "sweep.json"
        if manifest.is_file():
            names += [str(p / name) for name in json.loads(manifest.read_text())["runs"]]
    return names


def plot_budget(rows, path: Path) -> None:
    plt = pyplot()
    settings = list(dict.fromkeys((r["dataset"], r["model"], r["dst"], r["sparsity"]) for r in rows))
    fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(4.5 * max(1, len(settings)), 3.8), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        sel = [r for r in rows if (r["dataset"], r["model"], r["dst"], r["sparsity"]) == setting]
        for i, method in enumerate(sorted({r["method"] for r in sel})):
            pts = sorted((r["epochs"], r["test_acc_mean"], r["test_acc_std"]) for r in sel if r["method"] == method)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        color=f"C{i}", label=method)
            paper = sorted((r["epochs"], r["paper_test_acc"]) for r in sel if r["method"] == method and r["paper_test_acc"])
            if paper:
                ax.plot([p[0] for p in paper], [p[1] for p in paper], "x--", color=f"C{i}", label=f"{method}, paper")
        ax.set(xlabel="training budget (epochs, independent runs)", ylabel="test accuracy (%)",
               title=f"{setting[0]} {setting[1]} {setting[2]} {100 * setting[3]:g}%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_curves(records: list[RunRecord], path: Path) -> None:
    plt = pyplot()
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status == "completed" and r.metrics:
            groups[r.key].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (key, runs) in enumerate(sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0]))):
        f = dict(zip(GROUP_KEYS, key))
        label = f"{method_label(f['optimizer'], f['ham'], f['renorm'], f['growth_grad'])} {100 * f['sparsity']:g}% e{f['epochs']}"
        epochs = min(len(r.metrics) for r in runs)
        for ax, metric in zip(axes, ("train_acc", "test_acc")):
            ys = [sum(r.metrics[e][metric] for r in runs) / len(runs) for e in range(epochs)]
            ax.plot(range(1, epochs + 1), ys, color=f"C{i % 10}", label=label)
    for ax, name in zip(axes, ("train accuracy (%)", "test accuracy (%)")):
        ax.set(xlabel="epoch", ylabel=name, title=f"{name} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def plot_itop(rows, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    sel = [r for r in rows if r["itop_mean"] is not None and r["dst"] in ("rigl", "set")]
    longest = max((r["epochs"] for r in sel), default=None)
    sel = [r for r in sel if r["epochs"] == longest]  # one budget: ITOP grows with training length
    for i, method in enumerate(sorted({(r["dst"], r["method"]) for r in sel})):
        pts = sorted((r["sparsity"], r["itop_mean"]) for r in sel if (r["dst"], r["method"]) == method)
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", color=f"C{i}", label=f"{method[0]}: {method[1]}")
    ax.set(xlabel="sparsity (%)", ylabel="ITOP rate (%)", title=f"Mask exploration (ITOP) vs sparsity, {longest} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def report(paths: list[str | Path], out: str | Path) -> dict[str, Any]:
    out = Path(out)
    records = [load_run(p) for p in find_run_dirs(paths)]
    if not records:
        raise ValueError(f"no run folders (with config.yaml) under {[str(p) for p in paths]}")
    rows = aggregate(records)
    present = {str(r.path) for r in records}
    missing = [name for name in expected_runs(paths) if name not in present]
    not_completed = [{"path": str(r.path), "status": r.status,
                      "epochs_done": len(r.metrics), "epochs": r.config.get("epochs")}
                     for r in records if r.status != "completed"]
    lines = ["# sparseopt report", "", f"{len(records)} run folders, {sum(r.status == 'completed' for r in records)} completed.", ""]
    if rows:
        lines.append(markdown_tables(rows))
    lines.append("## Runs not completed")
    lines += [f"- {r['path']}: {r['status']} ({r['epochs_done']}/{r['epochs']} epochs)" for r in not_completed] or ["- none"]
    lines.append("")
    lines.append("## Runs a sweep expected but that are missing")
    lines += [f"- {m}" for m in missing] or ["- none"]
    lines.append("")
    lines.append("Figures: accuracy_vs_budget.png, curves.png, itop_vs_sparsity.png. Std is the sample standard deviation over seeds.")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    write_csv(out / "summary.csv", [{k: v for k, v in r.items() if k != "seeds"} | {"seeds": " ".join(map(str, r["seeds"]))} for r in rows])
    write_csv(out / "runs.csv", [{"path": str(r.path), "status": r.status, **{k: r.config.get(k) for k in GROUP_KEYS},
                                  "seed": r.config.get("seed"),
                                  "test_acc": (r.results or {}).get("final", {}).get("test_acc")} for r in records])
    summary = {"groups": rows, "not_completed": not_completed, "missing": missing}
    write_json(out / "report.json", summary)
    if rows:
        plot_budget(rows, out / "accuracy_vs_budget.png")
        plot_curves(records, out / "curves.png")
        plot_itop(rows, out / "itop_vs_sparsity.png")
    return summary
