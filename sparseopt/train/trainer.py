"""The training loop of ``sparseopt train``: one config in, one run folder out.

Run folder::

    config.yaml      resolved configuration (every key)
    env.json         versions, device, seed, git revision, notes, every invocation (argv, time, host)
    metrics.jsonl    one JSON line per epoch, and one per topology update ("event": "update")
    checkpoint.pt    latest epoch, written atomically (model, masks, optimizer, topology, schedule)
    results.json     final status and numbers (status: completed / diverged / interrupted)
    .lock            held by the running process (one run per folder at a time)

SIGTERM (how SLURM pre-empts a job) and Ctrl-C end a run cleanly: the last
epoch's checkpoint is kept, ``results.json`` says ``interrupted`` and the log
names the command that resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..monitor import UpdateProbe, loss_on_batch, neuron_stats
from ..optim.sparseopt import NormalizedLayerFinder
from .build import build_run, effective_delta_t, make_model, resolve_method
from .config import TrainConfig, config_differences
from .data import make_loaders
from .distributed import (
    DistEnv,
    all_reduce_sum,
    check_replicas_consistent,
    cleanup,
    init_distributed,
)
from .io import (
    atomic_write,
    environment,
    jsonl_lines,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    write_json,
)
from .progress import Progress
from .run_folder import RunLock, check_out_path, clear_run_folder, has_run_content
from .schedule import peak_lr, warmup_cosine_scheduler


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(RuntimeError):
    """SIGTERM / SIGINT during training; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def run_name(cfg: TrainConfig) -> str:
    """Stable, readable name of a run from its method fields."""
    parts = [cfg.dataset, cfg.model, cfg.dst]
    if cfg.dst != "dense":
        parts += [cfg.optimizer, f"s{cfg.sparsity:g}"]
        if cfg.structure != "unstructured":
            parts.append("cfi" if cfg.structure == "constant_fan_in" else f"nm{cfg.nm.replace(':', '-')}")
        if cfg.neuron_ablation is not None:
            parts.append(f"ablate{cfg.neuron_ablation:g}")
    if cfg.ham:
        parts.append("ham")
    if cfg.renorm is not None:
        parts.append(f"renorm{cfg.renorm:g}")
    if cfg.growth_grad != "original":
        parts.append(f"grow-{cfg.growth_grad}")
    parts += [f"e{cfg.epochs}", f"seed{cfg.seed}"]
    return "-".join(parts)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use --device cpu or auto")
    return device


def prepare_out_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """The run folder and whether to resume from its checkpoint; refuses what would mix or lose results.

    Nothing is written here: the folder is created, locked and (``--overwrite``) cleared in ``write_header``.
    """
    out = Path(cfg.out if cfg.out else Path("runs") / run_name(cfg))
    check_out_path(out)
    if cfg.resume:
        if (out / "checkpoint.pt").is_file():
            return out, True
        if (out / "config.yaml").is_file():  # killed before its first checkpoint: nothing to resume, start again
            return out, False
        raise ValueError(f"--resume: no checkpoint at {out / 'checkpoint.pt'} and no run started there; "
                         f"start it without --resume")
    if has_run_content(out) and not cfg.overwrite:
        raise FileExistsError(f"output folder {out} already exists: pass --resume to continue it or --overwrite to replace it")
    return out, False


def check_optional_loggers(cfg: TrainConfig) -> None:
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--wandb needs the wandb package: pip install wandb") from None


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, autocast) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole test set (reduced over ranks)."""
    was_training = model.training
    model.eval()
    sums = None
    for x, y in loader:
        with autocast():
            out = model(x)
        out = out.float()
        top5 = out.topk(min(5, out.shape[1]), dim=1).indices
        if sums is None:
            sums = torch.zeros(4, dtype=torch.float64, device=out.device)
        sums[0] += nn.functional.cross_entropy(out, y, reduction="sum")
        sums[1] += (top5[:, 0] == y).sum()
        sums[2] += (top5 == y[:, None]).any(dim=1).sum()
        sums[3] += len(y)
    sums = all_reduce_sum(sums, env)
    model.train(was_training)
    n = sums[3].item()
    return {"test_loss": sums[0].item() / n, "test_acc": 100 * sums[1].item() / n, "test_top5": 100 * sums[2].item() / n}


class Trainer:
    """Builds everything from a config and runs it; ``run()`` returns the results dict."""

    def __init__(self, cfg: TrainConfig, argv: list[str] | None = None):
        self.cfg = cfg.validate()
        self.argv = list(argv) if argv is not None else list(sys.argv)  # recorded in env.json
        self.device = resolve_device(cfg.device)
        check_optional_loggers(cfg)
        self.out, self.resuming = prepare_out_dir(cfg)
        self.lock: RunLock | None = None
        self.elapsed_before = 0.0  # training seconds of earlier invocations (resume)
        self._session_start: float | None = None  # when this invocation started training
        self._stop_signal = 0  # SIGTERM / SIGINT received, checked every 10 steps
        self.env = init_distributed(self.device.type)
        if self.env.enabled and cfg.batch_size % self.env.world_size:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the world size {self.env.world_size}")
        if self.device.type == "cuda" and self.env.enabled:
            self.device = torch.device("cuda", self.env.local_rank)
        self.notes: list[str] = []
        if cfg.resume and not self.resuming:
            self.notes.append(f"--resume: {self.out} holds a run that stopped before its first checkpoint: starting it from scratch")
        if self.device.type != "cuda":
            for flag in ("bf16", "channels_last", "compile"):
                if getattr(cfg, flag):
                    self.notes.append(f"--{flag.replace('_', '-')} is a GPU speed option: ignored on {self.device.type}")
            if cfg.sync_bn:
                self.notes.append("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel): ignored, BN statistics stay per rank")
            self.cfg = cfg = dataclasses.replace(cfg, bf16=False, channels_last=False, compile=False, sync_bn=False)
        else:
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def log(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    # -- set-up ------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)
        data = make_loaders(cfg, self.device, env)
        self.train_loader, self.test_loader, self.num_classes = data.train, data.test, data.num_classes
        self.class_names = data.class_names if data.class_names and len(data.class_names) == data.num_classes else None
        self.notes.extend(data.notes)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        model = make_model(cfg, self.num_classes)
        if cfg.sync_bn and env.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.peak_lr = peak_lr(cfg.lr, cfg.batch_size, cfg.lr_batch_scaling)
        run = build_run(cfg, model, self.total_steps, self.peak_lr)
        self.model, self.masks, self.optimizer, self.topology = run.model, run.masks, run.optimizer, run.topology
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = warmup_cosine_scheduler(self.optimizer, self.total_steps, warmup, self.peak_lr, cfg.lr_min)
        self.forward_model: nn.Module = model
        if env.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.masks is not None:
                # Masks are identical by construction: no need to broadcast them every forward.
                ignore = [layer.buffer_path for layer in self.masks]
                DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
            self.forward_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            # Masks are buffers updated in place, so topology updates do not force a recompilation.
            self.forward_model = torch.compile(self.forward_model, mode=cfg.compile_mode)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.epoch = 0
        self.step = 0
        monitored = cfg.monitor and self.topology is not None and self.topology.dynamic
        self.probe = UpdateProbe(window=max(1, min(10, effective_delta_t(cfg) // 2))) if monitored else None
        # Which BatchNorm each masked layer feeds (found on the first forward pass), for the sigma-vs-fan-in statistic.
        self.norm_finder = NormalizedLayerFinder(self.model, self.masks) if cfg.monitor and self.masks is not None else None
        self.check_schedule(warmup)
        if self.resuming:
            self.load(self.out / "checkpoint.pt")

    def planned_updates(self) -> int:
        """Topology updates the schedule will make: steps ``t`` in ``(0, t_end)`` divisible by ``delta_t``."""
        if self.topology is None or not self.topology.dynamic:
            return 0
        return (self.topology.t_end - 1) // self.topology.delta_t

    def check_schedule(self, warmup_steps: int) -> None:
        """Warn loudly about schedules that silently mean nothing (too short a run for its warmup or its delta_t)."""
        if warmup_steps >= self.total_steps:
            self.notes.append(f"WARNING: warmup ({warmup_steps} steps) is at least as long as the run ({self.total_steps} "
                              "steps): the learning rate never reaches its peak; lower --warmup-epochs or raise --epochs")
        if self.topology is not None and self.topology.dynamic and self.planned_updates() == 0:
            self.notes.append(f"WARNING: {self.cfg.dst} never updates the topology: delta_t = {self.topology.delta_t} steps "
                              f"but updates stop at step t_end = {self.topology.t_end} ({self.total_steps} steps in all); "
                              "lower --delta-t (or --delta-t-batch), or raise --epochs")

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": "sparseopt-checkpoint-v1",
            "epoch": self.epoch,
            "step": self.step,
            "config": self.cfg.to_dict(),
            # What this version made of the config's "auto" settings: a resume under another version must not
            # switch method halfway while config.yaml still says the same thing.
            "resolved": resolve_method(self.cfg),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "model": self.model.state_dict(),
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "topology": self.topology.state_dict() if self.topology is not None else None,
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "seconds": self.elapsed(),
        }

    def elapsed(self) -> float:
        """Training seconds over every invocation of this run."""
        start = self._session_start
        return self.elapsed_before + (time.perf_counter() - start if start is not None else 0.0)

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state.get("format") != "sparseopt-checkpoint-v1":
            raise ValueError(f"{path} is not a sparseopt training checkpoint")
        diffs = config_differences(state["config"], self.cfg.to_dict(), state.get("resolved"))
        if diffs:
            raise ValueError(f"checkpoint {path} is from another configuration; differing keys: " + "; ".join(diffs))
        saved_method, method = state.get("resolved"), resolve_method(self.cfg)
        # Keys a checkpoint does not record were not 'auto' in its version: they cannot have changed.
        changed = [f"{k}={saved_method[k]!r} (now {method[k]!r})" for k in method
                   if saved_method is not None and saved_method.get(k, method[k]) != method[k]]
        if changed:
            raise ValueError(
                f"checkpoint {path} was trained with {', '.join(changed)}: this version resolves the config's 'auto' "
                "settings differently; set them explicitly (e.g. --prune-score, --precondition-layers, --scale-source) to continue "
                "the run "
                "as it was trained"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not fit this model: {e}") from None
        if self.masks is not None:
            self.masks.load_state_dict(state["masks"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.topology is not None:
            self.topology.load_state_dict(state["topology"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.elapsed_before = float(state.get("seconds", 0.0))
        self.log(f"resumed from {path} at epoch {self.epoch} (step {self.step})")

    # -- one epoch ----------------------------------------------------------------------------
    def train_epoch(self, progress: Progress) -> dict[str, float]:
        cfg = self.cfg
        model, opt = self.forward_model, self.optimizer
        model.train()
        self.train_loader.set_epoch(self.epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, correct, n
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader):
            with self.autocast():
                out = model(x)
                loss = self.criterion(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            updated = self.topology is not None and self.topology.step()
            if updated and cfg.check_masks:
                check_replicas_consistent(self.masks, self.model, self.env, self.step)
            if self.probe is not None:
                self.probe.record(loss)
                if updated:
                    self.probe_update(x, y)
            if self.masks is None and cfg.renorm is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.renorm)
            opt.step()
            self.scheduler.step()
            self.step += 1
            # Accumulated on the device: no host synchronisation per step (only every 10 steps below).
            sums[0] += loss.detach().double() * len(y)
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
            if (i + 1) % 10 == 0 or i + 1 == self.steps_per_epoch:
                loss_sum, correct, n = sums.tolist()
                if not math.isfinite(loss_sum):
                    kept = (f"the last good checkpoint (epoch {self.epoch}) is kept in {self.out}" if self.epoch > 0
                            else "no epoch had finished, so there is no checkpoint to resume from")
                    raise NonFiniteLoss(f"non-finite training loss at epoch {self.epoch + 1}, step {self.step}: stopping; "
                                        f"{kept}. Try a lower --lr or --renorm 1.0")
                self.check_stop()
                elapsed = time.perf_counter() - start
                progress.update(i + 1, loss=loss_sum / n, acc=100 * correct / n, ips=n * self.env.world_size / elapsed)
        seconds = time.perf_counter() - start
        sums = all_reduce_sum(sums, self.env)
        loss_sum, correct, n = sums.tolist()
        return {"train_loss": loss_sum / n, "train_acc": 100 * correct / n, "epoch_seconds": seconds,
                "images_per_s": n / seconds}

    # -- stopping on a signal ------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.log(f"\n{signal.Signals(signum).name} received: stopping after this step (again to stop at once)")

    def check_stop(self) -> None:
        """Raise :class:`Interrupted` when a signal asked to stop; ranks agree on the step (checked every 10 steps)."""
        signum = self._stop_signal
        if self.env.enabled:
            flag = torch.tensor([float(signum)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            raise Interrupted(f"stopped by {signal.Signals(signum).name} at epoch {self.epoch + 1}, step {self.step}", signum)

    def resume_hint(self) -> str:
        if self.epoch == 0:
            return "no epoch had finished, so there is no checkpoint: add --resume to the same command to start it again"
        return (f"the checkpoint of epoch {self.epoch} is kept; resume with: "
                f"sparseopt train --config {self.out / 'config.yaml'} --resume")

    def probe_update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Open the monitoring record of the topology update that just happened on batch ``(x, y)``."""
        info = {"event": "update", "epoch": self.epoch + 1, "step": self.step, **(self.topology.last_update or {})}
        info.pop("t", None)
        stats = neuron_stats(self.masks, self.optimizer.layer_scales(), self.monitored_norms())
        info.update({k: v for k, v in stats.items() if not k.startswith("neurons/dead/")})
        self.probe.begin(info, loss_on_batch(self.model, self.criterion, x, y, self.autocast))

    def monitored_norms(self) -> dict[str, nn.Module] | None:
        finder = self.norm_finder
        return finder.norms if finder is not None and finder.found is not None else None

    def monitor_epoch(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(this epoch's update records, the epoch's neuron statistics and update summary)."""
        stats = neuron_stats(self.masks, self.optimizer.layer_scales(), self.monitored_norms())
        if self.probe is None:
            return [], stats
        updates = self.probe.flush()
        for key in ("grown_pruned", "loss_before", "loss_after", "loss_window_before", "loss_window_after"):
            values = [u[key] for u in updates if u.get(key) is not None]
            if values:
                stats[f"update/{key}"] = sum(values) / len(values)
        return updates, stats

    # -- the run ------------------------------------------------------------------------------------
    def write_header(self) -> None:
        """Create and lock the run folder, clear a replaced run (``--overwrite``), write config and environment."""
        cfg = self.cfg
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.out).acquire()  # before anything in the folder is touched
            if not self.resuming:
                clear_run_folder(self.out)  # a previous run's files (--overwrite or a run killed before its checkpoint)
            atomic_write(self.out / "config.yaml", lambda f: f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()))
            invocation = {"argv": self.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from_epoch": self.epoch}
            previous = self.out / "env.json"
            if self.resuming and previous.is_file():  # keep the original record, add this invocation
                env = json.loads(previous.read_text())
                env.setdefault("invocations", []).append({**environment(self.device, cfg.seed, self.env.world_size),
                                                          **invocation})
            else:
                env = environment(self.device, cfg.seed, self.env.world_size)
                env["invocations"] = [invocation]
                env["notes"] = self.notes
                env["steps_per_epoch"] = self.steps_per_epoch
                env["total_steps"] = self.total_steps
                env["peak_lr"] = self.peak_lr
                if self.topology is not None:
                    env["resolved"] = resolve_method(cfg)
                    env["topology"] = self.topology.config()
                    env["delta_t_effective"] = effective_delta_t(cfg)
                    env["topology_updates_planned"] = self.planned_updates()
            write_json(self.out / "env.json", env)
        if self.env.enabled:
            torch.distributed.barrier()
        for note in self.notes:
            self.log(f"note: {note}")
        if self.topology is not None and self.topology.dynamic:
            self.log(f"topology: {cfg.dst} every {self.topology.delta_t} steps until step {self.topology.t_end} "
                     f"of {self.total_steps}: {self.planned_updates()} updates planned")

    def truncate_metrics(self) -> None:
        """On resume, drop metric lines of epochs after the checkpoint (written after it, before a crash)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [line for line, record in jsonl_lines(path) if record.get("epoch", 0) <= self.epoch]
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))

    def run(self) -> dict[str, Any]:
        handlers = {}
        if threading_main():
            handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        ended_normally = False
        try:
            result = self._run()
            ended_normally = True
            return result
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.lock is not None:
                self.lock.release()
            self.forward_model = None  # the DDP wrapper holds the process group: release it before leaving
            cleanup(self.env, meet=ended_normally)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.setup()
        self.write_header()
        if self.resuming and self.env.is_main:
            self.truncate_metrics()
        writers = self.open_loggers()
        self._session_start = time.perf_counter()
        metrics = None
        try:
            if self.epoch == 0 and self.masks is not None:
                self.log(f"masks: {len(self.masks)} layers, density {self.masks.density():.4f} "
                         f"({sum(self.masks.num_active())}/{self.masks.total} weights; {self.masks.model_density():.4f} "
                         f"over all parameters), dst={cfg.dst}, optimizer={cfg.optimizer}")
                dense = self.masks.unmasked_weights()
                if dense:
                    self.log("dense (not masked): " + ", ".join(f"{n} ({k})" for n, k in dense))
            while self.epoch < cfg.epochs:
                progress = Progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}",
                                    enabled=self.env.is_main and not cfg.quiet)
                with progress:
                    metrics = self.train_epoch(progress)
                metrics.update(evaluate(self.forward_model, self.test_loader, self.env, self.autocast))
                self.epoch += 1
                metrics = {"epoch": self.epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"], **metrics}
                updates = []
                if self.masks is not None:
                    metrics.update(self.masks.stats())
                    metrics["topology_updates"] = self.topology.num_updates
                    metrics["topology_updates_skipped"] = self.topology.skipped_updates
                    if cfg.monitor:
                        updates, stats = self.monitor_epoch()
                        metrics.update(stats)
                if self.env.is_main:
                    # Metrics first: a crash before the checkpoint re-runs this epoch on resume,
                    # and truncate_metrics() drops the orphaned lines.
                    with open(self.out / "metrics.jsonl", "a") as f:
                        f.write("".join(json.dumps(u) + "\n" for u in updates) + json.dumps(metrics) + "\n")
                    save_checkpoint(self.out / "checkpoint.pt", self.state())
                    for w in writers:
                        w(metrics)
                self.log(self.summary_line(metrics))
                if self.epoch == 1 and self.masks is not None:
                    self.log(f"preconditioned layers: {self.optimizer.preconditioned_layers or 'none (baseline)'}")
                if self._stop_signal:  # a signal during evaluation or checkpointing: the epoch is complete
                    self.check_stop()
            if metrics is None:  # resumed from the last epoch's checkpoint: nothing left to train
                metrics = (self.history() or [{"epoch": self.epoch}])[-1]
            results = self.results(metrics, "completed")
        except NonFiniteLoss as e:
            self.write_results({"status": "diverged", "error": str(e), "epochs_completed": self.epoch,
                                "method": cfg.method(), "seconds": self.elapsed()})
            raise
        except Interrupted as e:
            self.write_results({"status": "interrupted", "error": str(e), "epochs_completed": self.epoch,
                                "method": cfg.method(), "seconds": self.elapsed(), "resume": self.resume_hint()})
            self.log(f"{e}; {self.resume_hint()}")
            raise
        self.write_results(results)
        self.log(f"done: test acc {results['final'].get('test_acc', float('nan')):.2f}% -> {self.out}")
        return results

    def write_results(self, results: dict[str, Any]) -> None:
        if self.env.is_main:
            write_json(self.out / "results.json", results)

    def history(self) -> list[dict[str, Any]]:
        return read_metrics(self.out)

    def invocations(self) -> int:
        try:
            return len(json.loads((self.out / "env.json").read_text()).get("invocations", [])) or 1
        except (OSError, ValueError):
            return 1

    def results(self, last: dict[str, Any], status: str) -> dict[str, Any]:
        history = (self.history() if self.env.is_main else []) or [last]
        keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "density", "itop")
        out = {
            "status": status,
            "method": self.cfg.method(),
            "run_name": run_name(self.cfg),
            "epochs_completed": self.epoch,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "final": {k: last[k] for k in keys if k in last},
            "best_test_acc": max((m["test_acc"] for m in history if "test_acc" in m), default=None),
            "seconds": self.elapsed(),
            "invocations": self.invocations(),
        }
        if self.masks is not None:
            out["resolved"] = resolve_method(self.cfg)
            out["preconditioned_layers"] = self.optimizer.preconditioned_layers
            out["topology_updates"] = self.topology.num_updates
            out["topology_updates_planned"] = self.planned_updates()
            out["topology_updates_skipped"] = self.topology.skipped_updates  # non-finite growth scores
        return out

    def summary_line(self, m: dict[str, Any]) -> str:
        line = (f"epoch {m['epoch']:>3}/{self.cfg.epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:5.2f}%  "
                f"test loss {m['test_loss']:.4f} acc {m['test_acc']:5.2f}% top5 {m['test_top5']:5.2f}%  lr {m['lr']:.4g}")
        if "itop" in m:
            line += f"  itop {100 * m['itop']:.1f}%"
        return line + f"  {m['epoch_seconds']:.1f}s {m['images_per_s']:.0f} img/s"

    def open_loggers(self):
        writers = []
        if not self.env.is_main:
            return writers
        scalars = lambda m: {k: v for k, v in m.items() if isinstance(v, (int, float)) and k not in ("epoch",)}  # noqa: E731
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.out / "tensorboard"))
            writers.append(lambda m: [tb.add_scalar(k, v, m["epoch"]) for k, v in scalars(m).items()] and tb.flush())
        if self.cfg.wandb:
            import wandb

            run = wandb.init(project="sparseopt", name=run_name(self.cfg), config=self.cfg.to_dict(), dir=str(self.out),
                             resume="allow")
            writers.append(lambda m: run.log(scalars(m), step=m["epoch"]))
        return writers


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Train one run described by ``cfg``; returns the contents of ``results.json``.

    ``argv``: the command line to record in ``env.json`` (default ``sys.argv``).
    """
    return Trainer(cfg, argv).run()

