"""Dynamic sparse training inside Hugging Face's ``Trainer``: :class:`SparseTrainingCallback`.

::

    from sparseopt.integrations.huggingface import SparseTrainingCallback

    sparse = SparseTrainingCallback(sparsity=0.9, dst="rigl", delta_t=100)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[sparse])
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)
    sparse.save_pretrained("my-sparse-model")        # weights with zeros, masks, config.json's sparsity_config

Where each part runs in the Trainer's step (transformers 4.46 and later, 5.x):

* the masks are drawn when the Trainer is built (``on_init_end``), before any checkpoint loads;
* the topology update runs in ``on_pre_optimizer_step``: after gradient accumulation, after the
  Trainer's gradient clipping (a uniform factor, which changes no ranking), on gradients that
  DDP has already averaged, so every rank draws the same masks;
* SparseOpt's preconditioning and masking run in torch's step hooks of the optimizer the Trainer
  built (``register_step_pre_hook``/``register_step_post_hook``): inside accelerate's wrapper and
  after a GradScaler has unscaled the gradients and checked them, so fp16, bf16 and any optimizer
  the Trainer makes work unchanged. The step that changes the topology is skipped, as reference
  RigL does, by dropping its gradients.

Checkpoints: every Trainer checkpoint folder gets ``sparseopt_state.pt`` (masks, the updater's
state, SparseOpt's state), read back by ``resume_from_checkpoint``; the model's own files hold the
weights only, zero at the masked positions, so ``from_pretrained`` loads them anywhere.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..masks.maskset import SPARSIFIABLE_TYPES, MaskSet
from .extras import require
from .session import SessionCallback, SparseSession

transformers = require("transformers", "hf", "sparseopt.integrations.huggingface")
from transformers import TrainerCallback  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

logger = logging.getLogger("sparseopt")

STATE_FILE = "sparseopt_state.pt"
# The key of trainer_state.json's "stateful_callbacks" under which each checkpoint names its own state file.
TOKEN_KEY = "sparseopt"
MASKS_FILE = "sparse_masks.safetensors"
MASKS_FORMAT = "sparseopt-masks"
# GPT-2's Conv1D is a Linear layer that stores its weight as (in, out): unstructured masks only.
HF_TYPES: tuple[type[nn.Module], ...] = (*SPARSIFIABLE_TYPES, Conv1D)


def save_masks(masks: MaskSet, folder: str | Path, config: Mapping[str, Any]) -> Path:
    """``sparse_masks.safetensors`` in ``folder``: one bool tensor per masked layer, the description in its header."""
    from safetensors.torch import save  # a dependency of transformers

    from ..files import write_bytes

    tensors = {name: mask.detach().cpu().contiguous() for name, mask in zip(masks.names, masks.masks)}
    data = save(tensors, metadata={"format": MASKS_FORMAT, "sparsity_config": json.dumps(dict(config))})
    return write_bytes(Path(folder) / MASKS_FILE, data)


def load_masks(folder: str | Path) -> dict[str, torch.Tensor]:
    """The masks saved in ``folder`` (by :meth:`SparseTrainingCallback.save_pretrained`, or in a checkpoint)."""
    folder = Path(folder)
    path = folder / MASKS_FILE
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("format") != MASKS_FORMAT:
                    raise ValueError("its header does not say it holds sparseopt masks")
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no items()
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file is one line
            raise ValueError(f"{path} cannot be read as sparseopt masks: {e}") from None
    if (folder / STATE_FILE).is_file():
        state = SparseSession.read(folder / STATE_FILE)
        return dict(zip(state["masks"]["names"], state["masks"]["masks"]))
    raise FileNotFoundError(f"{folder} has neither {MASKS_FILE} nor {STATE_FILE}: no sparseopt masks there")


def _saved_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor] | None:
    """The masks of a model loaded with ``from_pretrained`` from a folder that sparseopt saved, else None."""
    config = getattr(model, "config", None)
    saved = getattr(config, "sparsity_config", None)
    if not saved:
        return None
    if abs(float(saved.get("sparsity", sparsity)) - sparsity) > 1e-9:
        raise ValueError(f"the model was saved at sparsity {saved['sparsity']} (config.json's sparsity_config); the "
                         f"callback asks for {sparsity}: use the same sparsity, or delete config.sparsity_config")
    folder = Path(getattr(config, "_name_or_path", "") or ".")
    try:
        return load_masks(folder)
    except FileNotFoundError:
        raise ValueError(f"the model's config.json has a sparsity_config, but {folder} has neither {MASKS_FILE} nor "
                         f"{STATE_FILE}: its masks are not known. Save with SparseTrainingCallback.save_pretrained, "
                         "or delete config.sparsity_config to draw new masks") from None


def _checkpoint_folder(args, state) -> Path:
    """Where the Trainer writes the checkpoint of the current step (``<output_dir>/checkpoint-<step>``)."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


class SparseTrainingCallback(SessionCallback, TrainerCallback):
    """Train the Trainer's model sparse: masks, a topology updater (RigL, SET, static) and SparseOpt.

    The arguments and attributes are :class:`~sparseopt.integrations.session.SessionCallback`'s. The
    default layers are every Linear (and GPT-2's ``Conv1D``) inside the model's blocks: embeddings,
    heads (``lm_head``, ``classifier``, a pooler) and norms stay dense. Structured masks need (out, in)
    weights, so not GPT-2's ``Conv1D``, which stores its weight transposed.
    """

    layer_types = HF_TYPES

    def start(self) -> None:
        self._handles: list = []
        self._run = uuid.uuid4().hex  # with the step, names the state file each checkpoint's trainer_state.json goes with

    # -- the Trainer's events ------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._mask(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._mask(model)  # a Trainer built with model_init has its model only now
        base = self.session.attach_optimizer(optimizer, state.max_steps).base
        for handle in self._handles:
            handle.remove()
        self._handles = [base.register_step_pre_hook(lambda *_: self.session.begin_step()),
                         base.register_step_post_hook(lambda *_: self.session.end_step())]
        if state.global_step > 0:
            self._resume(args, state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.session.topology_step()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._mark(state)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:  # one process writes, as the Trainer does; every rank holds the same state
            return
        folder = _checkpoint_folder(args, state)
        if not folder.is_dir():
            raise RuntimeError(f"the Trainer's checkpoint {folder} is not there to add {STATE_FILE} to (a "
                               "hyperparameter search writes checkpoints elsewhere, which this callback does not follow)")
        self.session.save(folder / STATE_FILE, token=self._token(state))

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and Path(best, STATE_FILE).is_file():
            # the Trainer has just loaded that checkpoint's weights: give them that checkpoint's masks
            self.masks.load_state_dict(SparseSession.read(Path(best, STATE_FILE))["masks"])

    # -- saving ----------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, model: nn.Module | None = None, **kwargs) -> Path:
        """``model.save_pretrained(folder)`` (safetensors weights, zero at the masked positions, and config.json
        with a ``sparsity_config``) plus ``sparse_masks.safetensors``, from which this callback resumes."""
        if self.masks is None:
            raise RuntimeError("no masks yet: the callback masks the model when the Trainer is built")
        model = self.masks.model if model is None else model
        self.masks.apply_()
        model.config.sparsity_config = self.session.sparsity_config()
        model.save_pretrained(folder, **kwargs)
        return save_masks(self.masks, folder, model.config.sparsity_config)

    # -- internals -------------------------------------------------------------------------------------
    def _mask(self, model: nn.Module) -> None:
        if self.masks is not None and self.masks.model is model:
            return
        self.session.attach_masks(model, _saved_masks(model, self.session.sparsity))
        if getattr(model, "config", None) is not None:
            model.config.sparsity_config = self.session.sparsity_config()

    def _token(self, state) -> str:
        return f"{self._run}-{state.global_step}"

    def _mark(self, state) -> None:
        # Before the Trainer writes a checkpoint's trainer_state.json (it saves after on_step_end / on_epoch_end),
        # record which state file goes with it: the Trainer tells a callback the state of a resumed checkpoint,
        # not the checkpoint's folder.
        state.stateful_callbacks[TOKEN_KEY] = {"token": self._token(state)}

    def _resume(self, args, state) -> None:
        token = (state.stateful_callbacks or {}).get(TOKEN_KEY, {}).get("token")
        if token is None:
            raise ValueError(
                f"resuming at step {state.global_step} from a checkpoint written without SparseTrainingCallback: its "
                "masks are not known (its weights may be dense). Resume from a checkpoint the callback wrote, or start "
                "without resume_from_checkpoint")
        given = getattr(args, "resume_from_checkpoint", None)
        folders = [Path(given)] if isinstance(given, str) else []
        folders.append(_checkpoint_folder(args, state))
        for path in (folder / STATE_FILE for folder in folders):
            if path.is_file():
                saved = SparseSession.read(path)
                if saved.get("token") == token:
                    self.session.load_state_dict(saved)
                    logger.info("sparseopt: resumed the masks and the %s state from %s", self.session.method, path)
                    return
        raise ValueError(
            f"resuming at step {state.global_step}: the checkpoint's {STATE_FILE} is not in {folders[-1]}. The Trainer "
            "does not tell callbacks where it resumes from; for a checkpoint outside output_dir, pass its folder "
            "as TrainingArguments(resume_from_checkpoint=...) too")
