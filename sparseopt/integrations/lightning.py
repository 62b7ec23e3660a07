"""Dynamic sparse training inside Lightning: the :class:`SparseTraining` callback.

::

    from sparseopt.integrations.lightning import SparseTraining

    trainer = lightning.Trainer(callbacks=[SparseTraining(sparsity=0.9, dst="rigl", delta_t=100)])
    trainer.fit(module, data)                       # or trainer.fit(module, data, ckpt_path="last.ckpt")

Where each part runs in Lightning's step (Lightning 2.2 and later):

* the masks are drawn in ``setup``, before Lightning restores a checkpoint's weights;
* the topology update, then SparseOpt's preconditioning and masking, run in
  ``on_before_optimizer_step``: after the backward pass of the last accumulated batch, after a
  GradScaler has unscaled the gradients, and before Lightning clips them (``gradient_clip_val``),
  which is the order of :class:`~sparseopt.SparseOpt`'s own step (precondition, then clip);
* the masks are applied to the weights in a step hook of the optimizer, after it has stepped.

The masks, the updater's and SparseOpt's state go into every checkpoint (``on_save_checkpoint``,
key ``"sparseopt"``) and come back on ``ckpt_path`` (``on_load_checkpoint``). The module's
``state_dict`` holds only the weights, zero at the masked positions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .extras import require
from .session import SessionCallback

pl = require("lightning.pytorch", "lightning", "sparseopt.integrations.lightning")

logger = logging.getLogger("sparseopt")
CHECKPOINT_KEY = "sparseopt"


class SparseTraining(SessionCallback, pl.Callback):
    """Train a LightningModule sparse: masks, a topology updater (RigL, SET, static) and SparseOpt.

    The arguments and attributes are :class:`~sparseopt.integrations.session.SessionCallback`'s. The
    default layers are the Linear and Conv layers inside the module's blocks (an ``nn.ModuleList`` or
    ``nn.Sequential``); ``targets=`` / ``ignore=`` choose others. One optimizer per module.
    """

    def start(self) -> None:
        self._restored: Mapping[str, Any] | None = None
        self._handle = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.session.attach_masks(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SparseTraining trains modules with one optimizer; configure_optimizers gave "
                             f"{len(trainer.optimizers)}")
        base = self.session.attach_optimizer(trainer.optimizers[0], int(trainer.estimated_stepping_batches)).base
        if self._handle is not None:
            self._handle.remove()
        self._handle = base.register_step_post_hook(lambda *_: self.session.end_step())
        if self._restored is not None:
            self.session.load_state_dict(self._restored)
            self._restored = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.session.topology_step()
        self.session.begin_step()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.session.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != pl.trainer.states.TrainerFn.FITTING:
            return  # validate/test/predict from a checkpoint: its weights are already sparse, nothing trains
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise ValueError("the checkpoint was written without the SparseTraining callback: its masks are not known "
                             "(its weights may be dense). Resume from a checkpoint written with the callback, or "
                             "start without ckpt_path")
        self.session.masks.load_state_dict(state["masks"])  # the weights are loaded: give them their masks now
        self._restored = state  # the updater and SparseOpt exist once the optimizer does (on_train_start)
