"""Show that a refactoring left training unchanged: the same jobs at two revisions, every number compared.

    python scripts/same_numbers.py 3511878 --data-dir ../shared/data --out same_numbers.json

Each revision's code is checked out into a temporary git worktree and imported from there (PYTHONPATH), so
both sides run in this interpreter's environment on this machine, one after the other, with the same thread
count. Three jobs (issue 28): the default job (the baseline/SparseOpt pair on the bundled MNIST subset), a
RigL ResNet-20 proxy on a CIFAR-10 subset, and a HAM run. Every metric line of every run folder is compared
value by value, timings left out; the script exits 1 at the first difference it reports.

Flags are the ones both revisions understand. The default job was the bare ``sparseopt train`` before
``sparseopt demo`` existed; ``--demo-command`` names the command a revision uses for it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMING = ("seconds", "_per_s", "time")  # wall-clock fields differ run to run
THREADS = os.environ.get("OMP_NUM_THREADS", "2")  # both sides run with the same count


def jobs(data_dir: str) -> dict[str, list[str]]:
    single = ["--no-compare-optimizers", "--quiet"]
    return {
        "default": ["{demo}"],
        "rigl_resnet20": ["train", "--dataset", "cifar10", "--data-dir", data_dir, "--model", "resnet20",
                          "--dst", "rigl", "--sparsity", "0.9", "--train-subset", "1024", "--test-subset", "512",
                          "--epochs", "2", "--batch-size", "128", "--delta-t", "4", "--seed", "0", *single],
        "ham": ["train", "--dst", "rigl", "--sparsity", "0.95", "--ham", "--epochs", "3", "--seed", "1", *single],
    }


def commit_of(revision: str) -> str:
    """The full commit hash of ``revision``."""
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", revision], capture_output=True, text=True,
                          check=True).stdout.strip()


def run_job(tree: Path, argv: list[str], out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": THREADS}
    code = ("import sys, sparseopt; from pathlib import Path\n"
            f"assert Path(sparseopt.__file__).is_relative_to({str(tree)!r}), sparseopt.__file__\n"
            "from sparseopt.cli.main import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, *argv, "--out", str(out)], env=env, cwd=out.parent,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed in {tree}:\n{proc.stderr[-2000:]}")


def metric_lines(folder: Path) -> dict[str, list[dict]]:
    """Every run folder under ``folder`` (by its metrics.jsonl) -> its lines without timings."""
    lines = {}
    for path in sorted(folder.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        lines[str(path.parent.relative_to(folder))] = [
            {k: v for k, v in row.items() if not any(t in k for t in TIMING)} for row in rows]
    return lines


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare(old: dict[str, list[dict]], new: dict[str, list[dict]]) -> list[str]:
    if sorted(old) != sorted(new):
        return [f"run folders differ: {sorted(old)} vs {sorted(new)}"]
    problems = []
    for run, rows in old.items():
        if len(rows) != len(new[run]):
            problems.append(f"{run}: {len(rows)} vs {len(new[run])} metric lines")
            continue
        for i, (a, b) in enumerate(zip(rows, new[run])):
            for key in sorted(set(a) | set(b)):
                if not same(a.get(key), b.get(key)):
                    problems.append(f"{run} line {i + 1} {key}: {a.get(key)!r} vs {b.get(key)!r}")
    return problems


def final_losses(lines: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for run, rows in lines.items():
        epochs = [r for r in rows if "train_loss" in r]
        if epochs:
            out[run] = {k: epochs[-1].get(k) for k in ("epoch", "train_loss", "test_loss", "test_acc")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="revision to compare against (e.g. 3511878)")
    parser.add_argument("after", nargs="?", default=None, help="revision or omitted: this working tree")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--demo-command", nargs=2, default=["train", "demo"], metavar=("BEFORE", "AFTER"),
                        help="the command that runs the default job at each revision (default: train demo)")
    parser.add_argument("--only", nargs="*", default=None, help="job names to run (default: all)")
    parser.add_argument("--out", default=None, help="write the comparison here as JSON")
    args = parser.parse_args()

    import torch

    from sparseopt.native.build import cpu_info

    report = {"before": commit_of(args.before),
              "after": commit_of(args.after) if args.after else f"working tree at {commit_of('HEAD')}",
              "machine": {"cpu": cpu_info(), "torch": torch.__version__, "python": sys.version.split()[0],
                          "omp_num_threads": THREADS}, "jobs": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="same_numbers_") as tmp:
        tmp = Path(tmp)
        trees = {}
        for side, revision in (("before", args.before), ("after", args.after)):
            if revision is None:
                trees[side] = REPO
                continue
            trees[side] = tmp / f"tree_{side}"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(trees[side]), revision],
                           check=True)
        try:
            for name, argv in jobs(args.data_dir).items():
                if args.only and name not in args.only:
                    continue
                found = {}
                for side, demo in zip(("before", "after"), args.demo_command):
                    out = tmp / side / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    run_job(trees[side], [demo if a == "{demo}" else a for a in argv], out)
                    found[side] = metric_lines(out)
                problems = compare(found["before"], found["after"])
                compared = sum(len(row) for rows in found["before"].values() for row in rows)
                report["jobs"][name] = {"values_compared": compared, "differences": problems[:20],
                                        "final": final_losses(found["after"])}
                print(f"{name}: {compared} values compared, {len(problems)} differ; final {final_losses(found['after'])}")
                for line in problems[:20]:
                    print("  " + line)
                failed |= bool(problems)
        finally:
            for tree in trees.values():
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
