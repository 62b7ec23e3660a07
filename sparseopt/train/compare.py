"""Train the same config with the masked-SGD baseline and with SparseOpt, and compare them.

Writes ``<out>/sgd/``, ``<out>/sparseopt/`` (complete run folders) and
``<out>/comparison.{md,json,png}``.
"""

from __future__ import annotations

import dataclasses
import shlex
import signal
from pathlib import Path
from typing import Any

from ..figures import epoch_axis, pyplot, save_figure, write_text
from ..files import write_json
from ..runs import RunFolder, read_metrics
from .config import TrainConfig, config_differences
from .naming import run_name
from .stopping import Interrupted
from .trainer import Trainer

VARIANTS = ("sgd", "sparseopt")


def comparison_table(histories: dict[str, list[dict[str, Any]]]) -> str:
    names = list(histories)
    lines = ["| epoch | " + " | ".join(f"{n} test acc (%)" for n in names) + " | difference |",
             "|---:|" + "---:|" * len(names) + "---:|"]
    epochs = max(len(h) for h in histories.values())
    for e in range(epochs):
        accs = [h[e]["test_acc"] if e < len(h) else float("nan") for h in histories.values()]
        lines.append(f"| {e + 1} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {accs[-1] - accs[0]:+.2f} |")
    return "\n".join(lines)


def plot_comparison(histories: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, hist) in enumerate(histories.items()):
        epochs = [m["epoch"] for m in hist]
        color = f"C{i}"
        axes[0].plot(epochs, [m["test_acc"] for m in hist], marker="o", color=color, label=f"{name} (test)")
        axes[0].plot(epochs, [m["train_acc"] for m in hist], linestyle="--", color=color, label=f"{name} (train)")
        axes[1].plot(epochs, [m["train_loss"] for m in hist], marker="o", color=color, label=name)
    axes[0].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="training loss", yscale="log")
    for ax in axes:
        epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def verdict_line(results: dict[str, dict[str, Any]], cfg: TrainConfig) -> str:
    """The final difference in words, with the caveat a single seed deserves."""
    diff = results["sparseopt"]["final"]["test_acc"] - results["sgd"]["final"]["test_acc"]
    scope = f"one seed ({cfg.seed})"
    if cfg.train_subset:
        scope += f" on a {cfg.train_subset}-example subset"
    elif cfg.dataset == "bundled_mnist":
        scope += " on the bundled 8,000-image MNIST subset"
    return (f"Verdict: SparseOpt {'+' if diff >= 0 else '-'}{abs(diff):.2f} points of final test accuracy against the "
            f"baseline. This is {scope}: differences of this size are within seed-to-seed noise; compare several "
            "seeds (sparseopt sweep, sparseopt report) before drawing a conclusion.")


def compare(cfg: TrainConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Train both variants (or, with ``--resume``, finish what is missing) and write the comparison.

    The pair is one job: a stop in either half prints the one command that resumes the whole
    comparison (this command with ``--resume``); on resume a finished half is kept as it is.
    """
    out = Path(cfg.out if cfg.out else Path("runs") / f"compare-{run_name(cfg)}")
    command = list(argv) if argv else ["sparseopt", "train"]
    resume_command = shlex.join(command if "--resume" in command else [*command, "--resume"])
    histories, results = {}, {}
    for variant in VARIANTS:
        folder = out / variant
        sub = dataclasses.replace(cfg, optimizer=variant, out=str(folder), compare_optimizers=False,
                                  resume=cfg.resume and RunFolder(folder).has_checkpoint())
        done = finished_run(folder, sub) if cfg.resume else None
        if done is not None:
            print(f"== {variant}: finished earlier, kept -> {folder}", flush=True)
            results[variant] = done
        else:
            print(f"== {variant}: {'masked SGD baseline' if variant == 'sgd' else 'SparseOpt'} -> {folder}", flush=True)
            results[variant] = Trainer(sub, argv=command, resume_command=resume_command).run()
        histories[variant] = read_metrics(folder)
    try:
        return write_comparison(cfg, out, histories, results)
    except KeyboardInterrupt:  # both runs are complete: only the comparison files are missing
        print(f"\nstopped while writing the comparison; both runs are complete. Write it with: {resume_command}",
              flush=True)
        raise Interrupted("stopped while writing the comparison", signal.SIGINT) from None


def finished_run(folder: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The results of a completed run in ``folder`` trained with ``cfg``'s method; None when there is none."""
    run = RunFolder(folder)
    try:
        results = run.results()
    except (OSError, ValueError):
        return None
    if results is None or results.get("status") != "completed":
        return None
    saved = run.config()
    diffs = config_differences(saved, cfg.to_dict(), results.get("resolved"))
    if diffs:
        raise ValueError(f"{folder} holds a finished run of another configuration; differing keys: " + "; ".join(map(str, diffs)))
    return results


def write_comparison(cfg: TrainConfig, out: Path, histories, results) -> dict[str, Any]:
    title = f"{cfg.dataset} {cfg.model}, {cfg.dst} at {100 * cfg.sparsity:g}% sparsity, seed {cfg.seed}"
    table = comparison_table(histories)
    plot = plot_comparison(histories, out / "comparison.png", title)
    verdict = verdict_line(results, cfg)
    write_text(out / "comparison.md", f"# {title}\n\n{table}\n\n{verdict}\n")
    summary = {v: {"final_test_acc": r["final"]["test_acc"], "best_test_acc": r["best_test_acc"]} for v, r in results.items()}
    write_json(out / "comparison.json", {"title": title, "runs": {v: str(out / v) for v in VARIANTS}, "summary": summary,
                                         "verdict": verdict})
    print(f"\n{title}\n{table}\n\n{verdict}")
    print(f"\nwrote {out / 'comparison.md'} and {plot}")
    return summary
