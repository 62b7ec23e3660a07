"""The training loop of ``sparseopt train``: one config in, one run folder out.

Each concern lives in its own module, so this one reads top to bottom: the run's
objects come from :mod:`.build`, its folder and lock from :mod:`.run_folder`, the
files it writes from :mod:`.records` and :mod:`.checkpoints`, the device and
backend flags from :mod:`.runtime`, signals and divergence from :mod:`.stopping`,
neuron and update statistics from :mod:`.monitoring`.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any

import torch
from torch import nn

from ..runs import RunFolder
from . import records
from .build import build_run, make_model
from .checkpoints import restore, training_state
from .config import TrainConfig
from .data import make_loaders, with_folder_image_size
from .distributed import all_reduce_sum, check_replicas_consistent, cleanup
from .evaluation import evaluate
from .monitoring import RunMonitor
from .naming import run_name  # noqa: F401 - sparseopt.train.trainer.run_name, as before
from .progress import Progress
from .run_folder import prepare_out_dir
from .runtime import (
    backend_flags,
    check_optional_loggers,
    place,
    place_model,
    without_gpu_options,
    wrap_for_training,
)
from .spec import RunSpec, effective_delta_t
from .stopping import Interrupted, NonFiniteLoss, StopOnSignal, check_finite, resume_hint


class Trainer:
    """Builds everything from a config and runs it; ``run()`` returns the results dict."""

    def __init__(self, cfg: TrainConfig, argv: list[str] | None = None, resume_command: str | None = None):
        cfg, size_notes = with_folder_image_size(cfg.validate())  # before the run folder compares configs
        self.resume_command = resume_command  # what resumes the whole job this run is part of (a comparison)
        self.argv = list(argv) if argv is not None else list(sys.argv)  # recorded in env.json
        check_optional_loggers(cfg)
        self.out, self.resuming, folder_notes = prepare_out_dir(cfg)
        self.clock = records.Stopwatch()  # training seconds over every invocation of the run
        self.device, self.env = place(cfg)
        self.recorder = records.RunRecorder(self.out, self.env.is_main)
        self.cfg, gpu_notes = without_gpu_options(cfg, self.device)
        self.spec = RunSpec.from_config(self.cfg)  # every component checks its options before anything is written
        self.notes = [*folder_notes, *gpu_notes, *size_notes]
        self.log = functools.partial(print, flush=True) if self.env.is_main else lambda msg: None  # rank 0 speaks
        self.stop = StopOnSignal(self.log)
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)
        self.data = data = make_loaders(self.spec.data, self.device, env)
        self.train_loader, self.test_loader, self.num_classes, self.class_names = (data.train, data.test, data.num_classes,
                                                                                   data.class_names)
        self.notes.extend(data.notes)
        self.steps_per_epoch = len(self.train_loader)
        schedule = self.spec.schedule
        self.total_steps = schedule.epochs * self.steps_per_epoch
        model = place_model(make_model(cfg, self.num_classes), cfg, env, self.device)
        self.objects = run = build_run(self.spec, model, self.total_steps, schedule.peak_lr)
        self.model, self.masks, self.optimizer, self.topology = run.model, run.masks, run.optimizer, run.topology
        self.scheduler = schedule.scheduler(self.optimizer, self.steps_per_epoch)
        self.forward_model = wrap_for_training(model, self.masks, self.env, self.device, cfg)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=schedule.label_smoothing)
        self.epoch, self.step, self.epoch_records = 0, 0, None
        self.monitor = RunMonitor(run, self.criterion, self.autocast, effective_delta_t(cfg), cfg.monitor)
        self.notes += records.schedule_warnings(cfg, self.total_steps, schedule.warmup_steps(self.steps_per_epoch),
                                                self.topology)
        if self.resuming:
            self.load(RunFolder(self.out).checkpoint_path)

    def load(self, path) -> None:
        state = restore(path, self.cfg, self.objects, self.scheduler, self.device)
        self.epoch, self.step, self.clock.before = int(state["epoch"]), int(state["step"]), float(state.get("seconds", 0))
        self.epoch_records = state.get("epoch_records")  # the checkpointed epoch's metric lines
        self.log(f"resumed from {path} at epoch {self.epoch} (step {self.step})")

    def state(self) -> dict[str, Any]:
        return training_state(self.cfg, self.objects, self.scheduler, epoch=self.epoch, step=self.step,
                              num_classes=self.num_classes, class_names=self.class_names, seconds=self.clock.seconds())

    def train_epoch(self, progress: Progress) -> dict[str, float]:
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
            updated = self.topology is not None and self.topology.step()  # between backward and the step
            if updated and self.cfg.check_masks:
                check_replicas_consistent(self.masks, self.model, self.env, self.step)
            self.monitor.after_backward(loss, updated, x, y, self.epoch + 1, self.step)
            opt.step()
            self.scheduler.step()
            self.step += 1
            # Accumulated on the device: no host synchronisation per step (only every 10 steps below).
            sums[0] += loss.detach().double() * len(y)
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
            if (i + 1) % 10 == 0 or i + 1 == self.steps_per_epoch:
                loss_sum, correct, n = sums.tolist()
                check_finite(loss_sum, self.epoch, self.step, self.out)
                self.stop.check(self.env, self.device, f"epoch {self.epoch + 1}, step {self.step}")
                progress.update(i + 1, loss=loss_sum / n, acc=100 * correct / n,
                                ips=n * self.env.world_size / (time.perf_counter() - start))
        seconds = time.perf_counter() - start
        loss_sum, correct, n = all_reduce_sum(sums, self.env).tolist()
        return {"train_loss": loss_sum / n, "train_acc": 100 * correct / n, "epoch_seconds": seconds,
                "images_per_s": n / seconds}

    def run(self) -> dict[str, Any]:
        ended_normally = False
        try:
            with backend_flags(self.device, self.cfg, self.env.enabled), self.stop:
                result = self._run()
            ended_normally = True
            return result
        finally:
            self.recorder.release()
            self.forward_model = None  # the DDP wrapper holds the process group: release it before leaving
            cleanup(self.env, meet=ended_normally)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.setup()
        self.start_run_folder()
        self.clock.start()
        metrics = None
        try:
            if self.epoch == 0 and self.masks is not None:
                self.log(records.mask_summary(self.masks, cfg))
            while self.epoch < cfg.epochs:
                with Progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}",
                              enabled=self.env.is_main and not cfg.quiet) as progress:
                    metrics = self.train_epoch(progress)
                metrics.update(evaluate(self.forward_model, self.test_loader, self.env, self.autocast))
                self.epoch += 1
                updates, stats = self.monitor.epoch_records()
                metrics = records.epoch_record(self.epoch, self.step, metrics, self.objects, stats)
                self.recorder.epoch(updates, metrics, self.state)
                self.log(records.summary_line(metrics, cfg.epochs))
                if self.epoch == 1 and self.masks is not None:
                    self.log(f"preconditioned layers: {self.optimizer.preconditioned_layers or 'none (baseline)'}")
                if self.epoch == 1 and self.objects.sparse is not None:  # auto decides on the first batch
                    self.log(records.record_kernels(self.out, self.cfg, self.objects.sparse, self.env.is_main))
                if self.stop.signum:  # a signal during evaluation or checkpointing: the epoch is complete
                    self.stop.check(self.env, self.device, f"epoch {self.epoch + 1}, step {self.step}")
            if metrics is None:  # resumed from the last epoch's checkpoint: nothing left to train
                metrics = (self.recorder.history() or [{"epoch": self.epoch}])[-1]
        except (NonFiniteLoss, Interrupted) as e:
            hint = resume_hint(self.out, self.epoch, self.resume_command)
            self.recorder.results(records.ended_results(cfg, e, self.epoch, self.clock.seconds(), hint))
            if isinstance(e, Interrupted):
                self.log(f"{e}; {hint}")
            raise
        results = records.run_results(cfg, self.out, metrics, epoch=self.epoch, num_classes=self.num_classes,
                                      class_names=self.class_names, seconds=self.clock.seconds(), run=self.objects,
                                      history=self.recorder.history())
        self.recorder.results(results)
        self.log(f"done: test acc {results['final'].get('test_acc', float('nan')):.2f}% -> {self.out}")
        return results

    def start_run_folder(self) -> None:
        """Lock the run folder and write its header (rank 0), then say what the run will do."""
        facts = records.run_facts(self.cfg, self.steps_per_epoch, self.total_steps, self.spec.schedule.peak_lr, self.topology, self.data,
                                  self.objects.sparse)
        self.recorder.start(self.cfg, self.device, self.env.world_size, self.argv, resuming=self.resuming,
                            epoch=self.epoch, notes=self.notes, run_facts=facts,
                            epoch_records=self.epoch_records)
        if self.env.enabled:
            torch.distributed.barrier()
        for line in records.announcements(self.notes, self.cfg, self.topology, self.total_steps):
            self.log(line)


def train(cfg: TrainConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Train one run described by ``cfg``; returns the contents of ``results.json``.

    ``argv``: the command line to record in ``env.json`` (default ``sys.argv``).
    """
    return Trainer(cfg, argv).run()
