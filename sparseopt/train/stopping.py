"""How a run stops early: a non-finite loss, or SIGTERM / Ctrl-C (how SLURM pre-empts a job).

A signal asks the run to stop after the current step; the ranks agree on the step
(checked every 10 steps), the last epoch's checkpoint is kept and the run can be
resumed. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import math
import signal
import threading

import torch

from .distributed import DistEnv


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(RuntimeError):
    """SIGTERM / SIGINT during training; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopOnSignal:
    """Within ``with``: SIGTERM and SIGINT set :attr:`signum` instead of killing the process."""

    def __init__(self, log):
        self.log = log
        self.signum = 0
        self._handlers = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signum:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name} received: stopping after this step (again to stop at once)")

    def check(self, env: DistEnv, device: torch.device, where: str) -> None:
        """Raise :class:`Interrupted` when a signal asked to stop on any rank."""
        signum = self.signum
        if env.enabled:
            flag = torch.tensor([float(signum)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            raise Interrupted(f"stopped by {signal.Signals(signum).name} at {where}", signum)


def check_finite(loss_sum: float, epoch: int, step: int, out) -> None:
    """Stop a diverged run, saying what is kept (``epoch``: epochs completed before this one)."""
    if not math.isfinite(loss_sum):
        kept = (f"the last good checkpoint (epoch {epoch}) is kept in {out}" if epoch > 0
                else "no epoch had finished, so there is no checkpoint to resume from")
        raise NonFiniteLoss(f"non-finite training loss at epoch {epoch + 1}, step {step}: stopping; {kept}. "
                            "Try a lower --lr or --max-grad-norm 1.0")


def resume_hint(out, epoch: int, command: str | None = None) -> str:
    """What the user runs to continue a run stopped after ``epoch`` epochs (``command``: the job's own)."""
    if command is not None:
        kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "no epoch of this run had finished"
        return f"{kept}; resume the whole job with: {command}"
    if epoch == 0:
        return "no epoch had finished, so there is no checkpoint: add --resume to the same command to start it again"
    return f"the checkpoint of epoch {epoch} is kept; resume with: sparseopt train --config {out / 'config.yaml'} --resume"
