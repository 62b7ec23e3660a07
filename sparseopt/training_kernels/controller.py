"""Which masked layers train on the compiled sparse kernels: :func:`sparse_training`.

``kernels="sparse"`` runs every masked Conv2d and Linear the kernels take on them; ``"auto"``
times, per layer, one forward and backward of the masked dense and of the sparse path on the first
training batch and keeps the faster (the first convolution, with three input channels, usually
stays masked); ``"masked"`` changes nothing. A layer the kernels cannot take stays masked dense, with
its reason in :meth:`SparseTraining.report`.

The model's parameters stay dense tensors with zeros at the inactive positions: the layer's
``forward`` is replaced (on the instance) by one that gathers the active values at each call and
runs :mod:`.functions`. Nothing the optimizer, the topology updater, a checkpoint or DDP sees
changes. After a topology update the packed form is rebuilt from the new mask at the next forward:
the mask buffer's version counter says when.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..masks.maskset import MaskedLayer, MaskSet
from ..native import build
from ..native import conv as native_conv
from ..native.grad import TrainingWeight
from ..timing import time_alternating
from .functions import SparseConv2dFunction, SparseLinearFunction

logger = logging.getLogger("sparseopt")

KERNEL_MODES = ("masked", "sparse", "auto")
TIMING_ROUNDS = 3


@dataclass
class LayerDecision:
    """How one masked layer trains: ``kernel`` is ``sparse`` or ``masked``, ``reason`` says why."""

    kernel: str
    reason: str
    masked_ms: float | None = None  # forward + backward of the first batch, auto mode only
    sparse_ms: float | None = None


class _Layer:
    """One masked layer's sparse state: its packed weight (rebuilt when the mask changes) and its decision."""

    def __init__(self, owner: SparseTraining, layer: MaskedLayer):
        self.owner, self.layer, self.module = owner, layer, layer.module
        self.conv = isinstance(self.module, nn.Conv2d)
        if self.conv:
            m = self.module
            padding = (0, 0) if m.padding == "valid" else tuple(m.padding)
            self.geometry = (tuple(m.kernel_size), tuple(m.stride), padding)
        self.tw: TrainingWeight | None = None
        self._key: tuple | None = None
        self.decision: LayerDecision | None = None
        self.installed = None  # the forward set on the module (see SparseTraining)

    def weights(self) -> TrainingWeight:
        mask = self.layer.mask
        key = (mask.data_ptr(), mask._version)
        if key != self._key:
            start = time.perf_counter()
            self.tw = TrainingWeight(mask)
            self._key = key
            self.owner.rebuilds += 1
            self.owner.rebuild_seconds += time.perf_counter() - start
        return self.tw

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.module).forward(self.module, x)

    def sparse(self, x: torch.Tensor) -> torch.Tensor:
        module, dense = self.module, self.owner.dense_gradient()
        if self.conv:
            return SparseConv2dFunction.apply(x, module.weight, module.bias, self.weights(), self.geometry, dense)
        return SparseLinearFunction.apply(x, module.weight, module.bias, self.weights(), dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        why = self.owner.fallback_reason(x, self.module.weight)
        if why is not None:
            self.owner.note_once(why)
            return self.masked(x)
        if self.decision is None:
            if not (torch.is_grad_enabled() and self.module.training):
                return self.sparse(x)  # evaluation before any training step: decide on a training batch
            self.decision = self.owner.decide(self, x)
        return self.sparse(x) if self.decision.kernel == "sparse" else self.masked(x)

    def time_paths(self, x: torch.Tensor) -> tuple[float, float]:
        """Median milliseconds of one forward + backward, masked dense and sparse, in alternating rounds."""
        weight = self.module.weight.detach().requires_grad_()
        bias = None if self.module.bias is None else self.module.bias.detach().requires_grad_()
        inp = x.detach().requires_grad_(x.requires_grad)
        tw = self.weights()

        def masked() -> None:
            y = (F.conv2d(inp, weight, bias, self.geometry[1], self.module.padding) if self.conv
                 else F.linear(inp, weight, bias))
            y.backward(torch.ones_like(y))

        def sparse() -> None:
            y = (SparseConv2dFunction.apply(inp, weight, bias, tw, self.geometry, False) if self.conv
                 else SparseLinearFunction.apply(inp, weight, bias, tw, False))
            y.backward(torch.ones_like(y))

        # one warm-up round (plans, workspaces, torch's kernel selection), then alternating rounds
        seconds = time_alternating({"masked": masked, "sparse": sparse}, TIMING_ROUNDS)
        return seconds["masked"] * 1e3, seconds["sparse"] * 1e3


class SparseTraining:
    """Masked layers of one model trained on the compiled sparse kernels (see :func:`sparse_training`).

    Attributes:
        kernels: ``sparse``, ``auto`` or ``masked``.
        decisions: per masked layer, a :class:`LayerDecision` (``auto`` layers get theirs on the
            first training batch).
        rebuilds / rebuild_seconds: packed weights built so far (one per layer per topology update),
            and the time they took.
    """

    def __init__(self, masks: MaskSet, kernels: str = "sparse", topology=None):
        if kernels not in KERNEL_MODES:
            raise ValueError(f"kernels must be one of {list(KERNEL_MODES)}, got {kernels!r}")
        self.masks, self.kernels, self.topology = masks, kernels, topology
        self.rebuilds, self.rebuild_seconds = 0, 0.0
        self._noted: set[str] = set()
        self._layers: dict[str, _Layer] = {}
        self.decisions: dict[str, LayerDecision] = {}
        backend = build.backend() if kernels != "masked" else None
        for layer in masks:
            reason = self._unsupported(layer)
            if kernels == "masked":
                reason = "kernels=masked"
            elif reason is None and not backend.available:
                reason = f"compiled kernels unavailable ({backend.reason})"
            if reason is not None:
                self.decisions[layer.name] = LayerDecision("masked", reason)
                continue
            state = self._layers[layer.name] = _Layer(self, layer)
            if kernels == "sparse":
                state.decision = self.decisions[layer.name] = LayerDecision("sparse", "kernels=sparse")
            # on the instance: the class and its state_dict are untouched. Opaque to torch.compile: the
            # layer is one graph break, instead of dynamo tracing into the ctypes calls (dozens of breaks)
            state.installed = torch.compiler.disable(state.forward)
            layer.module.forward = state.installed
        if kernels != "masked" and not backend.available:
            warnings.warn(f"sparse training kernels unavailable ({backend.reason}); training continues masked dense "
                          "(same results, dense speed)", stacklevel=2)

    @staticmethod
    def _unsupported(layer: MaskedLayer) -> str | None:
        module = layer.module
        if layer.param != "weight" or not isinstance(module, (nn.Conv2d, nn.Linear)):
            return f"{type(module).__name__}.{layer.param}: the kernels take Conv2d and Linear weights"
        if layer.weight.device.type != "cpu":
            return f"weight on {layer.weight.device}: the sparse kernels run on the CPU"
        if isinstance(module, nn.Conv2d):
            why = native_conv.conv_unsupported(module.kernel_size, module.padding, module.dilation, module.groups,
                                               module.padding_mode)
            if why is None and not isinstance(module.padding, str) and any(
                    p > k - 1 for p, k in zip(module.padding, module.kernel_size)):
                why = f"padding {tuple(module.padding)} >= kernel {tuple(module.kernel_size)}: no transposed kernel"
            return why
        return None

    # -- per call ----------------------------------------------------------------------------------
    @staticmethod
    def fallback_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
        """Why this call runs masked dense (None: it can run sparse)."""
        if x.device.type != "cpu" or weight.device.type != "cpu":
            return "the sparse kernels run on the CPU; layers on another device train masked dense"
        if torch.is_autocast_enabled("cpu") or x.dtype != torch.float32 or weight.dtype != torch.float32:
            return (f"the sparse kernels take float32 (got {x.dtype} input, {weight.dtype} weight"
                    f"{', autocast on' if torch.is_autocast_enabled('cpu') else ''}); those calls train masked dense")
        return None

    def note_once(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            warnings.warn(message, stacklevel=3)

    def dense_gradient(self) -> bool:
        """Whether this step's backward must give the dense weight gradient (a topology update that reads it)."""
        needs = getattr(self.topology, "needs_dense_gradient", None)
        return bool(needs()) if needs is not None else False

    def decide(self, state: _Layer, x: torch.Tensor) -> LayerDecision:
        masked_ms, sparse_ms = state.time_paths(x)
        kernel = "sparse" if sparse_ms < masked_ms else "masked"
        decision = LayerDecision(kernel, f"auto: {'sparse' if kernel == 'sparse' else 'masked dense'} was faster "
                                 f"({sparse_ms:.2f} vs {masked_ms:.2f} ms forward + backward)", masked_ms, sparse_ms)
        self.decisions[state.layer.name] = decision
        return decision

    # -- records ------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What env.json and results.json record: the mode, the backend and every layer's decision."""
        backend = build.backend()
        names = [layer.name for layer in self.masks]
        return {"kernels": self.kernels, "backend": backend.path, "backend_reason": backend.reason,
                "rebuilds": self.rebuilds, "rebuild_seconds": round(self.rebuild_seconds, 6),
                "layers": {n: asdict(self.decisions[n]) if n in self.decisions else {"kernel": "pending"}
                           for n in names}}

    def state_dict(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "decisions": {n: asdict(d) for n, d in self.decisions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Reuse a checkpoint's per-layer decisions (a resumed ``auto`` run takes the same path, bit for bit)."""
        if state.get("kernels") != self.kernels:
            return
        for name, saved in state.get("decisions", {}).items():
            layer = self._layers.get(name)
            if layer is not None:
                layer.decision = self.decisions[name] = LayerDecision(**saved)

    def remove(self) -> None:
        """Give every layer back its own forward."""
        for state in self._layers.values():
            if state.module.__dict__.get("forward") is state.installed:
                del state.module.forward
        self._layers.clear()


def sparse_training(masks: MaskSet, kernels: str = "sparse", topology=None) -> SparseTraining:
    """Train the masked layers of ``masks.model`` on the compiled sparse kernels.

    ``kernels``: ``"sparse"`` (every layer the kernels take), ``"auto"`` (per layer, the faster of
    sparse and masked dense on the first training batch) or ``"masked"`` (no change). ``topology``:
    the :class:`~sparseopt.topology.TopologyUpdater`, so that the steps whose update reads the dense
    gradient (RigL's growth) get it; every other step computes the gradient of the active weights only.

    Call it after building the masks and before the first forward. Where the kernels cannot be
    built, one warning says why and training runs masked dense, with the same results.
    """
    return SparseTraining(masks, kernels, topology)
