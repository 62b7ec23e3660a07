"""``sparseopt report``: run folders -> the paper's tables and figures.

Finds every run folder (a folder with ``config.yaml``) under the given paths,
including sweep folders, groups completed runs by their full resolved config
minus the seed and runtime-only keys (so runs that differ in lr, batch size,
subset, delta_t, SparseOpt options, ... are never averaged as if they were
seeds), and writes mean +- std over seeds (sample standard deviation,
``ddof = 1``; 0 for a single seed) as markdown and CSV tables shaped like the
paper's Tables 1-3. Each method's label names the keys in which its group
differs from the others; the paper's published numbers are shown beside ours
only where the setting is the paper's. Duplicate seeds within a group are
flagged. Figures:

* ``accuracy_vs_budget.png``: final test accuracy against the epoch budget (Figs. 11-14);
* ``curves.png``: train / test accuracy over epochs (Figs. 3-4, 15-16);
* ``itop_vs_sparsity.png``: final ITOP rate against sparsity (Fig. 5);
* ``neurons.png`` (runs with neuron monitoring): dead neurons, fan-in inequality,
  the range of ``c_i``, weight norm vs fan-in, churn of grown connections and the
  loss around topology updates, methods side by side.

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

from ..figures import epoch_axis, pyplot, save_figure, write_csv, write_text
from ..files import write_json
from ..optim.presets import OPTIMIZER_PRESETS
from ..runs import CONFIG_FILE, RunFolder
from ..topology import DST_METHODS
from ..train.config import NON_METHOD_KEYS, with_defaults
from ..train.naming import NAMED_KEYS

# The axes of the paper's tables; runs are grouped by every method key (below), not by these alone.
GROUP_KEYS = tuple(k for k in NAMED_KEYS if k != "seed")  # the keys of a run's name (sparseopt.train.naming)
# Keys that do not change what is computed (or only how fast): runs differing only in these are seeds of one group.
RUNTIME_KEYS = NON_METHOD_KEYS
# Keys whose values the paper's table rows already show.
LABELLED_KEYS = frozenset({"dataset", "model", "dst", "sparsity", "epochs", "optimizer"})

# Top-1 % reported by the paper (SPEC section 7), RigL. Key: (dataset, model, dst, sparsity, optimizer, ham) -> {epochs: acc}.
PAPER: dict[tuple, dict[int, float]] = {
    ("imagenet", "resnet50", "rigl", 0.9, "sparseopt_paper", False): {90: 74.41, 180: 75.06, 270: 75.26},
    ("imagenet", "resnet50", "rigl", 0.9, "sgd", False): {90: 73.88, 180: 74.99, 270: 75.26},
    ("imagenet", "resnet50", "rigl", 0.95, "sparseopt_paper", False): {90: 72.93, 180: 73.62, 270: 73.95},
    ("imagenet", "resnet50", "rigl", 0.95, "sgd", False): {90: 72.33, 180: 73.36, 270: 73.62},
    ("imagenet", "resnet50", "rigl", 0.97, "sparseopt_paper", False): {90: 71.15, 180: 72.65, 270: 72.66},
    ("imagenet", "resnet50", "rigl", 0.97, "sgd", False): {90: 69.94, 180: 72.00, 270: 72.35},
    ("cifar100", "resnet20", "rigl", 0.9, "sparseopt_paper", False): {100: 61.34, 200: 63.12, 300: 64.30, 500: 65.22},
    ("cifar100", "resnet20", "rigl", 0.9, "sgd", False): {100: 60.66, 200: 62.93, 300: 63.77, 500: 64.66},
    ("cifar100", "resnet20", "rigl", 0.95, "sparseopt_paper", False): {100: 56.80, 200: 59.91, 300: 60.67, 500: 61.74},
    ("cifar100", "resnet20", "rigl", 0.95, "sgd", False): {100: 55.80, 200: 59.22, 300: 60.00, 500: 61.45},
    ("cifar100", "resnet20", "rigl", 0.97, "sparseopt_paper", False): {100: 53.95, 200: 57.01, 300: 57.62, 500: 58.35},
    ("cifar100", "resnet20", "rigl", 0.97, "sgd", False): {100: 52.53, 200: 54.87, 300: 56.50, 500: 57.32},
    ("cifar100", "resnet20", "rigl", 0.95, "sparseopt_paper", True): {100: 57.31, 200: 60.41, 300: 60.91, 500: 62.20},
    ("cifar100", "resnet20", "rigl", 0.95, "sgd", True): {100: 56.72, 200: 58.76, 300: 60.38, 500: 61.66},
}


@dataclass
class RunRecord:
    path: Path
    config: dict[str, Any]
    status: str  # completed / incomplete / diverged / ...
    results: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)  # the metric lines of topology updates

    @property
    def key(self) -> tuple:
        """The full method config (every key but the seed and runtime-only ones), hashable."""
        return tuple(sorted((k, _hashable(v)) for k, v in self.config.items() if k not in RUNTIME_KEYS))


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return tuple(value) if isinstance(value, list) else value


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run or sweep folder: {p}")
        if (p / CONFIG_FILE).is_file():
            found.append(p)
        found += sorted(c.parent for c in p.rglob(CONFIG_FILE) if c.parent != p)
    return sorted(dict.fromkeys(found))


def load_run(path: Path) -> RunRecord:
    # A key the run's version did not have counts at what it meant then: runs of every version group together.
    run = RunFolder(path)
    config = with_defaults(run.config())
    results = run.results()
    # Group by what ran, not by what the config says: an "auto" key means whatever the version that trained the
    # run made of it (recorded in results.json / env.json), and two versions may have made different things.
    resolved = (results or {}).get("resolved") or run.env().get("resolved") or {}
    config = {k: resolved.get(k, v) if v == "auto" else v for k, v in config.items()}
    metrics = run.metrics()
    status = results.get("status", "unknown") if results else "incomplete"
    return RunRecord(path, config, status, results, metrics, run.metrics(event="update"))


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def method_label(optimizer: str, ham: bool, max_grad_norm, growth_gradient: str, extras: dict[str, Any] | None = None) -> str:
    preset = OPTIMIZER_PRESETS.get(optimizer)
    label = preset.label if preset is not None else str(optimizer)
    parts = [preset.note] if preset is not None and preset.note else []
    if ham:
        parts.append("w/ HAM")
    if max_grad_norm is not None:
        parts.append(f"renorm {max_grad_norm:g}")
    if growth_gradient != "original":
        parts.append(f"{growth_gradient} growth")
    parts += [f"{k}={v}" for k, v in (extras or {}).items()]
    return f"{label} ({', '.join(parts)})" if parts else label


def _mean_of(runs: list[RunRecord], key: str) -> float | None:
    values = [r.results["final"][key] for r in runs if key in r.results.get("final", {})]
    return mean_std(values)[0] if values else None


def differing_keys(keys: list[tuple]) -> dict[tuple, dict[str, Any]]:
    """Per group key: the method keys (beyond the table's axes) whose values differ between groups.

    A group lists those of its values that differ from the config defaults; when
    that leaves two groups with the same label, every differing key is listed.
    """
    from ..train.config import TrainConfig

    defaults = TrainConfig().to_dict()
    configs = {key: dict(key) for key in keys}
    varying = sorted({k for c in configs.values() for k in c
                      if k not in LABELLED_KEYS and k not in ("ham", "max_grad_norm", "growth_gradient")
                      and len({_hashable(other.get(k)) for other in configs.values()}) > 1})
    short = {key: {k: c.get(k) for k in varying if _hashable(c.get(k)) != _hashable(defaults.get(k))} for key, c in configs.items()}
    labels = [tuple(sorted(v.items())) + tuple((k, dict(key)[k]) for k in sorted(LABELLED_KEYS) if k in dict(key))
              for key, v in short.items()]
    if len(set(map(str, labels))) < len(labels):
        return {key: {k: c.get(k) for k in varying} for key, c in configs.items()}
    return short


# Neuron statistics of the last epoch and update averages shown in the report (see sparseopt.monitor).
NEURON_COLUMNS = ("neurons/dead", "fan_in/cv", "fan_in/q05", "scale/min", "scale/max", "weight_norm/fan_in_slope",
                  "bn_sigma/fan_in_slope")
UPDATE_COLUMNS = ("grown_pruned", "loss_jump", "loss_window_after")


def neuron_summary(runs: list[RunRecord]) -> dict[str, float]:
    """Mean over seeds of the last epoch's neuron statistics and of the per-update records."""
    out: dict[str, float] = {}
    for key in NEURON_COLUMNS:
        values = [r.metrics[-1][key] for r in runs if r.metrics and r.metrics[-1].get(key) is not None]
        if values:
            out[key] = mean_std(values)[0]
    per_run: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        for key in UPDATE_COLUMNS:
            values = [_update_value(u, key) for u in r.updates]
            values = [v for v in values if v is not None]
            if values:
                per_run[key].append(sum(values) / len(values))
    for key, values in per_run.items():
        out[f"update/{key}"] = mean_std(values)[0]
    return out


def _rise(record: dict[str, Any], after: str, before: str) -> float | None:
    """``record[after] - record[before]``, or None when either is missing."""
    a, b = record.get(after), record.get(before)
    return None if a is None or b is None else a - b


def _update_value(record: dict[str, Any], key: str) -> float | None:
    if key == "loss_jump":
        return _rise(record, "loss_after", "loss_before")
    if key == "loss_window_after":  # the rise of the mean loss over the window after the update
        return _rise(record, "loss_window_after", "loss_window_before")
    return record.get(key)


def method_groups(records: list[RunRecord]) -> list[tuple[tuple, list[RunRecord], str, dict[str, Any]]]:
    """Completed runs grouped by their method keys, in a stable order: (key, runs, label, keys the label names).

    The one grouping of the report: tables, figures and the neuron table all read it, so a
    method has the same label everywhere.
    """
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status == "completed":
            groups[r.key].append(r)
    extras = differing_keys(list(groups))
    out = []
    for key, runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        f = dict(key)
        label = method_label(f.get("optimizer"), f.get("ham"), f.get("max_grad_norm"), f.get("growth_gradient", "original"), extras[key])
        out.append((key, runs, label, extras[key]))
    return out


def aggregate(records: list[RunRecord]) -> list[dict[str, Any]]:
    rows = []
    for key, runs, label, extras in method_groups(records):
        config = dict(key)
        fields = {k: config.get(k) for k in GROUP_KEYS}
        acc_mean, acc_std = mean_std([r.results["final"]["test_acc"] for r in runs])
        itops = [r.results["final"]["itop"] for r in runs if "itop" in r.results.get("final", {})]
        seeds = sorted(r.config.get("seed") for r in runs)
        paper_setting = fields["max_grad_norm"] is None and fields["growth_gradient"] == "original" and not extras
        paper = PAPER.get((fields["dataset"], fields["model"], fields["dst"], fields["sparsity"], fields["optimizer"],
                           bool(fields["ham"])), {}) if paper_setting else {}
        rows.append({
            **fields,
            "method": label,
            "differs": extras,
            "n_seeds": len(runs),
            "seeds": seeds,
            "duplicate_seeds": sorted({s for s in seeds if seeds.count(s) > 1}),
            "test_acc_mean": acc_mean,
            "test_acc_std": acc_std,
            "best_test_acc_mean": mean_std([r.results["best_test_acc"] for r in runs])[0],
            "train_loss_mean": _mean_of(runs, "train_loss"),
            "train_acc_mean": _mean_of(runs, "train_acc"),
            "itop_mean": mean_std(itops)[0] if itops else None,
            "paper_test_acc": paper.get(fields["epochs"]),
            "neurons": neuron_summary(runs),
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


def labelled_groups(records: list[RunRecord]) -> list[tuple[str, list[RunRecord]]]:
    """The groups of :func:`method_groups` (labels as in the tables), each with its runs that have metrics."""
    out = []
    for key, runs, label, _ in method_groups(records):
        f = dict(key)
        with_metrics = [r for r in runs if r.metrics]
        if with_metrics:
            out.append((f"{f.get('dst')}: {label} {100 * f.get('sparsity', 0):g}% e{f.get('epochs')}", with_metrics))
    return out


# Epoch-line metrics derived from two others (plotted, not stored).
DERIVED = {"update/loss_jump": lambda m: _rise(m, "update/loss_after", "update/loss_before")}


def _mean_curve(runs: list[RunRecord], metric: str) -> tuple[list[int], list[float]]:
    value = DERIVED.get(metric, lambda m: m.get(metric))
    epochs = min(len(r.metrics) for r in runs)
    xs, ys = [], []
    for e in range(epochs):
        values = [v for v in (value(r.metrics[e]) for r in runs) if v is not None]
        if values:
            xs.append(e + 1)
            ys.append(sum(values) / len(values))
    return xs, ys


def plot_curves(records: list[RunRecord], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, runs) in enumerate(labelled_groups(records)):
        for ax, metric in zip(axes, ("train_acc", "test_acc")):
            ax.plot(*_mean_curve(runs, metric), color=f"C{i % 10}", label=label)
    for ax, name in zip(axes, ("train accuracy (%)", "test accuracy (%)")):
        ax.set(xlabel="epoch", ylabel=name, title=f"{name} (mean over seeds)")
        epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    save_figure(fig, path)


NEURON_PANELS = (
    ("test_acc", "test accuracy (%)"),
    ("train_loss", "training loss"),
    ("neurons/dead", "dead neurons (n_i = 0)"),
    ("fan_in/cv", "fan-in inequality: mean over layers of std(n)/mean(n)"),
    ("fan_in/q05", "5% quantile of n_i / n_avg"),
    ("scale/max", "largest c_i (dashed: smallest)"),
    ("weight_norm/fan_in_slope", "slope vs log n_i: log ||w_i|| (dashed: log BN sigma_i; paper assumes 0.5)"),
    ("update/grown_pruned", "share of grown connections removed at the next update"),
    ("update/loss_jump", "loss jump at an update (same batch, new - old mask)"),
)


def plot_neurons(records: list[RunRecord], path: Path) -> bool:
    """Neuron statistics over epochs, one line per group (mean over seeds); False when no run has them."""
    groups = [(label, runs) for label, runs in labelled_groups(records) if any("fan_in/cv" in r.metrics[-1] for r in runs)]
    if not groups:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    for i, (label, runs) in enumerate(groups):
        color = f"C{i % 10}"
        for ax, (metric, title) in zip(axes.flat, NEURON_PANELS):
            xs, ys = _mean_curve(runs, metric)
            ax.plot(xs, ys, color=color, marker=".", label=label)
            companion = {"scale/max": "scale/min", "weight_norm/fan_in_slope": "bn_sigma/fan_in_slope"}.get(metric)
            if companion is not None:
                ax.plot(*_mean_curve(runs, companion), color=color, linestyle="--")
            ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        epoch_axis(ax)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6)
    save_figure(fig, path)
    return True


def neuron_table(rows: list[dict[str, Any]]) -> str:
    """Last-epoch neuron statistics and per-update averages, one row per group (mean over seeds)."""
    sel = [r for r in rows if r["neurons"]]
    if not sel:
        return ""
    columns = [*NEURON_COLUMNS, *(f"update/{k}" for k in UPDATE_COLUMNS)]
    out = ["### Neurons and topology updates (last epoch; update columns: mean over all updates), mean over seeds\n",
           "| setting | sparsity | method | epochs | " + " | ".join(columns) + " |",
           "|---|---|---|---:|" + "---:|" * len(columns)]
    for r in sorted(sel, key=lambda r: (r["dataset"], r["model"], r["dst"], r["sparsity"], r["epochs"], r["method"])):
        cells = [f"{r['neurons'][c]:.3f}" if c in r["neurons"] else "" for c in columns]
        setting = f"{r['dataset']} / {r['model']} / {r['dst']}"
        out.append(f"| {setting} | {100 * r['sparsity']:g}% | {r['method']} | {r['epochs']} | " + " | ".join(cells) + " |")
    out.append("\n`update/loss_jump`: loss of the update step's batch with the new mask minus with the old; "
               "`update/loss_window_after`: mean loss of the steps after an update minus the steps before.\n")
    return "\n".join(out)


def plot_itop(rows, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    # Every method that changes its topology (registered ones too): a static mask's ITOP is its density.
    sel = [r for r in rows if r["itop_mean"] is not None and getattr(DST_METHODS.get(r["dst"]), "dynamic", True)
           and r["dst"] != "dense"]
    longest = max((r["epochs"] for r in sel), default=None)
    sel = [r for r in sel if r["epochs"] == longest]  # one budget: ITOP grows with training length
    for i, method in enumerate(sorted({(r["dst"], r["method"]) for r in sel})):
        pts = sorted((r["sparsity"], r["itop_mean"]) for r in sel if (r["dst"], r["method"]) == method)
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", color=f"C{i}", label=f"{method[0]}: {method[1]}")
    ax.set(xlabel="sparsity (%)", ylabel="ITOP rate (%)", title=f"Mask exploration (ITOP) vs sparsity, {longest} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


# Metric families a curve keeps (per-layer keys such as density/<layer> are dropped).
CURVE_PREFIXES = ("update", "scale", "fan_in", "weight_norm", "bn_sigma")


def _compact(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record without its per-layer keys (``density/<layer>``, ...): what a curve needs."""
    return {k: v for k, v in record.items() if k.count("/") == 0 or k.split("/")[0] in CURVE_PREFIXES
            or k in ("neurons/dead", "neurons/dead_frac")}


def write_curves(records: list[RunRecord], path: str | Path) -> Path:
    """One JSON line per run: its method config, seed, status, per-epoch metrics and per-update records (compact).

    A path ending in ``.gz`` is written gzip-compressed (about a tenth of the size: for committed results).
    """
    groups = {id(r): label for label, runs in labelled_groups(records) for r in runs}
    lines = []
    for r in records:
        lines.append(json.dumps({
            "run": r.path.name, "group": groups.get(id(r)), "seed": r.config.get("seed"), "status": r.status,
            "config": {k: v for k, v in r.config.items() if k not in RUNTIME_KEYS},
            "final": (r.results or {}).get("final"), "seconds": (r.results or {}).get("seconds"),
            "epochs": [_compact(m) for m in r.metrics],
            "updates": [_compact(u) for u in r.updates],
        }, default=str))
    return write_text(path, "\n".join(lines) + "\n")  # gzip-compressed when the name ends in .gz


def report(paths: list[str | Path], out: str | Path, curves: str | Path | None = None) -> dict[str, Any]:
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
        lines.append(neuron_table(rows))
    duplicates = [r for r in rows if r["duplicate_seeds"]]
    if duplicates:
        lines.append("## Groups with duplicate seeds (the same run counted twice?)")
        lines += [f"- {100 * r['sparsity']:g}% {r['method']} e{r['epochs']}: seeds {r['duplicate_seeds']} appear more than once"
                  for r in duplicates]
        lines.append("")
    lines.append("## Runs not completed")
    lines += [f"- {r['path']}: {r['status']} ({r['epochs_done']}/{r['epochs']} epochs)" for r in not_completed] or ["- none"]
    lines.append("")
    lines.append("## Runs a sweep expected but that are missing")
    lines += [f"- {m}" for m in missing] or ["- none"]
    lines.append("")
    lines.append("Figures: accuracy_vs_budget.png, curves.png, itop_vs_sparsity.png, neurons.png (runs with neuron monitoring). "
                 "Std is the sample standard deviation over seeds.")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    write_csv(out / "summary.csv", [
        {k: v for k, v in r.items() if k not in ("seeds", "neurons", "differs", "duplicate_seeds")}
        | {"seeds": " ".join(map(str, r["seeds"])), "differs": json.dumps(r["differs"], default=str)} | r["neurons"]
        for r in rows])
    write_csv(out / "runs.csv", [{"path": str(r.path), "status": r.status, **{k: r.config.get(k) for k in GROUP_KEYS},
                                  "seed": r.config.get("seed"),
                                  "test_acc": (r.results or {}).get("final", {}).get("test_acc")} for r in records])
    summary = {"groups": rows, "not_completed": not_completed, "missing": missing}
    write_json(out / "report.json", summary)
    if rows:
        plot_budget(rows, out / "accuracy_vs_budget.png")
        plot_curves(records, out / "curves.png")
        plot_itop(rows, out / "itop_vs_sparsity.png")
        plot_neurons(records, out / "neurons.png")
    if curves is not None:
        write_curves(records, curves)
    return summary
