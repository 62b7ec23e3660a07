"""The files of a run folder other than the checkpoint: config, environment, metrics, results.

Run folder::

    config.yaml      resolved configuration (every key)
    env.json         versions, device, seed, git revision, notes, every invocation (argv, time, host)
    metrics.jsonl    one JSON line per epoch, and one per topology update ("event": "update")
    checkpoint.pt    latest epoch, written atomically (model, masks, optimizer, topology, schedule)
    results.json     final status and numbers (status: completed / diverged / interrupted)
    .lock            held by the running process (one run per folder at a time)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..files import atomic_write, save_checkpoint, write_json
from ..runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ENV_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    jsonl_lines,
    read_metrics,
)
from .config import TrainConfig
from .io import environment
from .naming import method_keys, run_name
from .run_folder import MARKER, RunLock, clear_run_folder, write_marker
from .runtime import open_loggers
from .spec import effective_delta_t, resolve_method
from .stopping import Interrupted


def planned_updates(topology) -> int:
    """Topology updates the schedule will make: steps ``t`` in ``(0, t_end)`` divisible by ``delta_t``."""
    if topology is None or not topology.dynamic:
        return 0
    return (topology.t_end - 1) // topology.delta_t


def schedule_warnings(cfg: TrainConfig, total_steps: int, warmup_steps: int, topology) -> list[str]:
    """Schedules that silently mean nothing (too short a run for its warmup or its delta_t)."""
    notes = []
    if warmup_steps >= total_steps:
        notes.append(f"WARNING: warmup ({warmup_steps} steps) is at least as long as the run ({total_steps} "
                     "steps): the learning rate never reaches its peak; lower --warmup-epochs or raise --epochs")
    if topology is not None and topology.dynamic and planned_updates(topology) == 0:
        notes.append(f"WARNING: {cfg.dst} never updates the topology: delta_t = {topology.delta_t} steps "
                     f"but updates stop at step t_end = {topology.t_end} ({total_steps} steps in all); "
                     "lower --delta-t (or --delta-t-batch), or raise --epochs")
    return notes


def epoch_record(epoch: int, step: int, measured: dict[str, Any], run, monitored: dict[str, Any]) -> dict[str, Any]:
    """One epoch's line of ``metrics.jsonl``: position, learning rate, training and test numbers, masks, monitoring."""
    record = {"epoch": epoch, "step": step, "lr": run.optimizer.param_groups[0]["lr"], **measured}
    if run.masks is not None:
        record.update(run.masks.stats(), topology_updates=run.topology.num_updates,
                      topology_updates_skipped=run.topology.skipped_updates)
    return {**record, **monitored}


LABELS = ("WARNING", "data")


def announcements(notes: list[str], cfg: TrainConfig, topology, total_steps: int) -> list[str]:
    """The log lines that start a run: its notes, and the topology updates it will make."""
    # A note that carries its own label ("WARNING: ...", "data: ...") is printed as it is, not as "note: WARNING: ...".
    lines = [note if note.split(":", 1)[0] in LABELS else f"note: {note}" for note in notes]
    if topology is not None and topology.dynamic:
        lines.append(f"topology: {cfg.dst} every {topology.delta_t} steps until step {topology.t_end} of {total_steps}: "
                     f"{planned_updates(topology)} updates planned")
    return lines


class Stopwatch:
    """Training seconds over every invocation of a run: ``before`` (from the checkpoint) plus this one's."""

    def __init__(self):
        self.before, self._start = 0.0, None

    def start(self) -> None:
        self._start = time.perf_counter()

    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self._start if self._start is not None else 0.0)


def mask_summary(masks, cfg: TrainConfig) -> str:
    """The log lines that say what was masked, at the start of a run."""
    lines = [f"masks: {len(masks)} layers, density {masks.density():.4f} ({sum(masks.num_active())}/{masks.total} weights; "
             f"{masks.model_density():.4f} over all parameters), dst={cfg.dst}, optimizer={cfg.optimizer}"]
    dense = masks.unmasked_weights()
    if dense:
        lines.append("dense (not masked): " + ", ".join(f"{n} ({k})" for n, k in dense))
    return "\n".join(lines)


def start_run_folder(out: Path, cfg: TrainConfig, device: torch.device, world_size: int, argv: list[str], *,
                     resuming: bool, epoch: int, notes: list[str], run_facts: dict[str, Any],
                     epoch_records: list[dict[str, Any]] | None = None) -> RunLock:
    """Create and lock the folder, clear a replaced run (``--overwrite``), write its header; returns the held lock."""
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire()  # before anything in the folder is touched
    if not resuming:
        clear_run_folder(out)  # a previous run's files (--overwrite or a run killed before its checkpoint)
    if not resuming or not (out / MARKER).is_file():  # a new run's id (a run of an earlier version gets one too)
        write_marker(out, run_name=run_name(cfg))
    write_header(out, cfg, device, world_size, argv, resuming=resuming, epoch=epoch, notes=notes, run_facts=run_facts)
    if resuming:
        truncate_metrics(out, epoch, epoch_records)
    return lock


def write_header(out: Path, cfg: TrainConfig, device: torch.device, world_size: int, argv: list[str], *,
                 resuming: bool, epoch: int, notes: list[str], run_facts: dict[str, Any]) -> None:
    """``config.yaml``, and ``env.json``: the environment, or on resume one more invocation of the original record."""
    atomic_write(out / CONFIG_FILE, lambda f: f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()))
    invocation = {"argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from_epoch": epoch}
    previous = out / ENV_FILE
    if resuming and previous.is_file():  # keep the original record, add this invocation
        env = json.loads(previous.read_text())
        env.setdefault("invocations", []).append({**environment(device, cfg.seed, world_size), **invocation})
    else:
        env = {**environment(device, cfg.seed, world_size), "invocations": [invocation], "notes": notes, **run_facts}
    write_json(out / ENV_FILE, env)


def run_facts(cfg: TrainConfig, steps_per_epoch: int, total_steps: int, peak_lr: float, topology,
              data=None, sparse=None) -> dict[str, Any]:
    """What a run derived from its config (recorded once, in env.json): schedule, method, data pipeline, kernels."""
    facts = {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "peak_lr": peak_lr,
             "data": getattr(data, "facts", {}), "kernels": kernels_record(cfg, sparse)}
    if topology is not None:
        facts.update(resolved=resolve_method(cfg), topology=topology.config(), delta_t_effective=effective_delta_t(cfg),
                     topology_updates_planned=planned_updates(topology))
    return facts


def kernels_record(cfg: TrainConfig, sparse) -> dict[str, Any]:
    """Which kernels train the masked layers: the mode and, per layer, the decision and its reason."""
    return sparse.report() if sparse is not None else {"kernels": cfg.kernels, "layers": {}}


def record_kernels(out: Path, cfg: TrainConfig, sparse, is_main: bool) -> str:
    """Write the per-layer kernel decisions into env.json once they are made (``auto``: on the first batch); the log line."""
    record = kernels_record(cfg, sparse)
    if is_main:
        env = json.loads((out / ENV_FILE).read_text())
        env["kernels"] = record
        write_json(out / ENV_FILE, env)
    layers = record["layers"].values()
    on_sparse = sum(d.get("kernel") == "sparse" for d in layers)
    return (f"kernels={record['kernels']}: {on_sparse} of {len(layers)} masked layers train on the sparse kernels "
            f"({record['backend']}), the others masked dense (env.json: kernels)")


def truncate_metrics(out: Path, epoch: int, saved: list[dict[str, Any]] | None = None) -> None:
    """On resume, drop metric lines of epochs after the checkpoint (written after it, before a crash).

    ``saved``: the checkpointed epoch's lines as the checkpoint keeps them; they replace that epoch's
    lines in the file, so a line torn or lost after the checkpoint was written comes back.
    """
    path = out / METRICS_FILE
    lines = jsonl_lines(path) if path.is_file() else []
    keep = [line for line, record in lines if record.get("epoch", 0) < epoch or (record.get("epoch", 0) == epoch and not saved)]
    keep += [json.dumps(record) for record in saved or []]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))


def append_metrics(out: Path, updates: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write("".join(json.dumps(u) + "\n" for u in updates) + json.dumps(metrics) + "\n")


def invocations(out: Path) -> int:
    try:
        return len(json.loads((out / ENV_FILE).read_text()).get("invocations", [])) or 1
    except (OSError, ValueError):
        return 1


def run_results(cfg: TrainConfig, out: Path, last: dict[str, Any], *, epoch: int, num_classes: int,
                class_names: list[str] | None, seconds: float, run, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The contents of a completed run's ``results.json``."""
    history = history or [last]
    keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "density", "itop")
    results = {
        "status": "completed",
        "method": method_keys(cfg),
        "run_name": run_name(cfg),
        "epochs_completed": epoch,
        "num_classes": num_classes,
        "class_names": class_names,  # label index -> name
        "class_to_index": None if class_names is None else {name: i for i, name in enumerate(class_names)},
        "final": {k: last[k] for k in keys if k in last},
        "best_test_acc": max((m["test_acc"] for m in history if "test_acc" in m), default=None),
        "seconds": seconds,
        "invocations": invocations(out),
    }
    if run.masks is not None:
        results["resolved"] = resolve_method(cfg)
        if hasattr(run.topology, "prune_score_name"):  # a method that prunes by its own scores says so
            results["resolved"]["prune_score"] = run.topology.prune_score_name()
        results["preconditioned_layers"] = run.optimizer.preconditioned_layers
        results["topology_updates"] = run.topology.num_updates
        results["topology_updates_planned"] = planned_updates(run.topology)
        results["topology_updates_skipped"] = run.topology.skipped_updates  # non-finite growth scores
        results["kernels"] = kernels_record(cfg, run.sparse)
    return results


def ended_results(cfg: TrainConfig, error: Exception, epoch: int, seconds: float, hint: str) -> dict[str, Any]:
    """``results.json`` of a run that diverged (NonFiniteLoss) or was stopped by a signal."""
    interrupted = isinstance(error, Interrupted)
    return {"status": "interrupted" if interrupted else "diverged", "error": str(error), "epochs_completed": epoch,
            "method": method_keys(cfg), "seconds": seconds, **({"resume": hint} if interrupted else {})}


def summary_line(m: dict[str, Any], epochs: int) -> str:
    line = (f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:5.2f}%  "
            f"test loss {m['test_loss']:.4f} acc {m['test_acc']:5.2f}% top5 {m['test_top5']:5.2f}%  lr {m['lr']:.4g}")
    if "itop" in m:
        line += f"  itop {100 * m['itop']:.1f}%"
    return line + f"  {m['epoch_seconds']:.1f}s {m['images_per_s']:.0f} img/s"




class RunRecorder:
    """Rank 0's writer of a run folder (header, metric lines, checkpoints, results); other ranks write nothing."""

    def __init__(self, out: Path, is_main: bool):
        self.out, self.is_main = out, is_main
        self.lock: RunLock | None = None
        self.writers: list = []

    def start(self, cfg: TrainConfig, device: torch.device, world_size: int, argv: list[str], **header) -> None:
        """Lock the folder, write its header (``start_run_folder``) and open the optional loggers."""
        if self.is_main:
            self.lock = start_run_folder(self.out, cfg, device, world_size, argv, **header)
            self.writers = open_loggers(cfg, self.out)

    def epoch(self, updates: list[dict[str, Any]], metrics: dict[str, Any], state) -> None:
        """Metrics first: a crash before the checkpoint re-runs this epoch on resume, and truncate_metrics()
        drops the orphaned lines. ``state``: a function returning the checkpoint (built on rank 0 only)."""
        if self.is_main:
            append_metrics(self.out, updates, metrics)
            # The checkpoint keeps a copy of the epoch's lines: a resume restores them if the file lost them.
            save_checkpoint(self.out / CHECKPOINT_FILE, {**state(), "epoch_records": [*updates, metrics]})
            for write in self.writers:
                write(metrics)

    def history(self) -> list[dict[str, Any]]:
        return read_metrics(self.out) if self.is_main else []

    def results(self, results: dict[str, Any]) -> None:
        if self.is_main:
            write_json(self.out / RESULTS_FILE, results)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
