"""Topology updaters: ``Static``, ``SET`` and ``RigL``, and the bases to write others.

:class:`TopologyUpdater` is what a training loop calls; :class:`DSTUpdater` is a
prune-and-grow update split into steps a subclass overrides one at a time:
:meth:`~DSTUpdater.plan` (how many connections each layer drops and grows: moving
connections between layers, as Sparse Momentum and DSR do, or a density schedule,
as GraNet, is a new plan), :meth:`~DSTUpdater.prune_scores` and
:meth:`~DSTUpdater.grow_scores` (what is dropped and grown), :meth:`~DSTUpdater.select`
(which entries, given the scores), :meth:`~DSTUpdater.apply` (weights, optimizer
state and mask of one layer) and :meth:`~DSTUpdater.record` (what ``last_update`` says).

An updater is a peer of the optimizer with its own ``step()`` and
``state_dict()``; call it once per iteration after ``loss.backward()`` and
before ``optimizer.step()``::

    loss.backward()
    topology.step()     # on schedule: prune by magnitude, grow (random / by |dense grad|)
    optimizer.step()

Reference RigL conventions (google-research/rigl), each configurable:

* ``keep_regrown``: a connection dropped and regrown in the same update keeps
  its value and optimizer state (it never left the network);
* ``reset_optimizer_state``: a newly grown connection starts at 0 (inactive
  weights are exactly 0) with every optimizer state tensor of the
  parameter's shape zeroed at its position;
* ``skip_update``: the weight update of the step that changes the topology is
  skipped (its gradient was computed for the old mask).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from ..masks.maskset import MaskedLayer, MaskSet
from ..masks.neurons import neuron_shape
from ..masks.structure import check_structure
from ..optim.presets import OptimizerPreset
from ..registry import Registry
from .optim_state import zero_state_
from .protocols import ProvidesScales, SkipsSteps
from .schedule import drop_fraction, is_update_step
from .scores import PRUNE_SCORES
from .selection import prune_and_grow, prune_and_grow_ablating, prune_and_grow_grouped

GROWTH_GRADIENTS = ("original", "corrected")


class TopologyUpdater(ABC):
    """A peer of the optimizer: ``step()`` once per iteration, after ``loss.backward()``, before ``optimizer.step()``.

    Keeps the iteration count and the update counters, and checkpoints them; ``dynamic``
    says whether the topology can change at all.
    """

    dynamic = False

    def __init__(self, masks: MaskSet, optimizer: Optimizer | None = None):
        if not isinstance(masks, MaskSet):
            raise TypeError(f"masks must be a sparseopt.MaskSet, got {type(masks).__name__}")
        self.masks = masks
        self.optimizer = optimizer
        self.t = 0
        self.num_updates = 0
        self.skipped_updates = 0
        self.last_update: dict[str, Any] | None = None

    @abstractmethod
    def step(self) -> bool:
        """Advance one iteration; returns whether the topology changed."""

    def needs_dense_gradient(self) -> bool:
        """Whether the next ``step()`` reads the gradient at inactive positions (RigL's growth).

        Sparse training kernels (:func:`sparseopt.sparse_training`) compute the gradient of the
        active weights only, except in the backward passes before a step that answers True here.
        """
        return False

    def config(self) -> dict[str, Any]:
        return {"method": type(self).__name__}

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "t": self.t, "num_updates": self.num_updates,
                "skipped_updates": self.skipped_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("type") != type(self).__name__:
            raise ValueError(f"topology state was written by {state.get('type')}, cannot load it into {type(self).__name__}")
        self.t = int(state["t"])
        self.num_updates = int(state["num_updates"])
        self.skipped_updates = int(state.get("skipped_updates", 0))


class Static(TopologyUpdater):
    """Static sparse training: the masks never change. ``step()`` only counts iterations."""

    def step(self) -> bool:
        self.t += 1
        return False


@dataclass(frozen=True)
class LayerPlan:
    """How many connections one layer drops and grows at an update (equal: its density is kept)."""

    n_drop: int
    n_grow: int


class DSTUpdater(TopologyUpdater):
    """Prune-and-grow on a schedule; subclasses define the growth scores (and may override any step).

    Args:
        masks: the :class:`~sparseopt.MaskSet` to update (its single owner).
        optimizer: the optimizer whose state is reset for new connections and
            whose next step is skipped on update steps (one that
            :class:`~sparseopt.topology.protocols.SkipsSteps`, such as
            :class:`~sparseopt.SparseOpt`, when ``skip_update=True``).
        delta_t: iterations between topology updates (CIFAR default 100).
        alpha: initial drop fraction of the cosine schedule (default 0.3).
        t_end: last iteration with updates; default ``int(0.75 * total_steps)``.
        total_steps: total training iterations (needed when ``t_end`` is not given,
            and used to reject a ``t_end`` past the end of training).
        prune_score: which active connections are dropped: ``"magnitude"``
            (``|w|``, RigL/SET as published), ``"scaled"`` (``|w| / c_i`` with the
            optimizer's SparseOpt scales), ``"normalized"`` (``|w|`` over the
            neuron's RMS weight), a callable ``(weight, mask, scale) -> score``
            (the smallest, signed, dropped first; ``scale`` is the layer's per-neuron ``c``
            when the optimizer provides scales, as SparseOpt does, else None), or ``"auto"`` (default): the
            prune score of the optimizer's preset (``SparseOpt.preset``:
            ``"scaled"`` for the recommended SparseOpt, ``"magnitude"`` for the
            paper's, the baseline's and any optimizer that does not precondition). With the
            paper's magnitude pruning SparseOpt starves low-fan-in neurons until they
            die (docs/results.md). Subclasses may override :meth:`prune_scores` instead.
        neuron_ablation: SRigL's ``gamma_sal`` (constant fan-in masks only; default
            ``None``, off): at each update a neuron with fewer than ``gamma * k``
            salient connections loses all its inputs and the layer's fan-in is shared
            out over the live neurons (:func:`~sparseopt.topology.selection.prune_and_grow_ablating`;
            Lasby et al. use 0.3).

    After each update :attr:`last_update` holds ``t``, the drop fraction, the
    number of connections pruned and regrown, and ``grown_pruned``: the share of
    the connections grown at the previous update that this update removed again.
    """

    dynamic = True
    # Whether grow_scores reads the weight's gradient (at every position). True unless a subclass
    # says otherwise: a plugin's growth may read it, and a wrong False would grow from zeros.
    grows_by_gradient = True

    def __init__(
        self,
        masks: MaskSet,
        optimizer: Optimizer | None = None,
        *,
        delta_t: int = 100,
        alpha: float = 0.3,
        t_end: int | None = None,
        total_steps: int | None = None,
        keep_regrown: bool = True,
        reset_optimizer_state: bool = True,
        skip_update: bool = True,
        prune_score="auto",
        neuron_ablation: float | None = None,
    ):
        super().__init__(masks, optimizer)
        if neuron_ablation is not None:
            if masks.structure.kind != "constant_fan_in":
                raise ValueError(f"neuron_ablation needs constant fan-in masks (sparsify(..., structure='constant_fan_in')); "
                                 f"these are {masks.structure}")
            if not 0.0 < float(neuron_ablation) <= 1.0:
                raise ValueError(f"neuron_ablation (SRigL's gamma_sal) must be in (0, 1], got {neuron_ablation!r}")
        if not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"delta_t must be a positive integer, got {delta_t!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha (initial drop fraction) must be in [0, 1], got {alpha!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if t_end is None:
            if total_steps is None:
                raise ValueError("give t_end, or total_steps to use the default t_end = 0.75 * total_steps")
            t_end = int(0.75 * total_steps)
        if not isinstance(t_end, int) or t_end < 1:
            raise ValueError(f"t_end must be a positive integer, got {t_end!r}")
        if total_steps is not None and t_end > total_steps:
            raise ValueError(f"t_end={t_end} is past the end of training (total_steps={total_steps}); use t_end <= total_steps")
        if (skip_update or reset_optimizer_state) and optimizer is None:
            raise ValueError(
                "pass the optimizer (to reset the state of new connections and skip the update step), "
                "or set reset_optimizer_state=False and skip_update=False"
            )
        if skip_update and not isinstance(optimizer, SkipsSteps):
            raise ValueError(
                f"skip_update=True needs an optimizer with skip_next_step(), such as sparseopt.SparseOpt "
                f"(use SparseOpt(base, masks, precondition=False) for the plain baseline); got {type(optimizer).__name__}. "
                "Or set skip_update=False"
            )
        if prune_score == "auto":  # what the optimizer's preset prunes by (docs/results.md)
            preset = getattr(optimizer, "preset", None)
            prune_score = preset.prune_score if isinstance(preset, OptimizerPreset) else "magnitude"
        if not callable(prune_score) and prune_score not in PRUNE_SCORES:
            raise ValueError(f"unknown prune_score {prune_score!r}; choose one of {list(PRUNE_SCORES)} or pass a callable")
        if prune_score == "scaled" and not isinstance(optimizer, ProvidesScales):
            raise ValueError("prune_score='scaled' needs a sparseopt.SparseOpt optimizer (it supplies the scales)")
        self.prune_score = prune_score
        self._score_fn = prune_score if callable(prune_score) else PRUNE_SCORES[prune_score]
        self.delta_t = delta_t
        self.alpha = float(alpha)
        self.t_end = t_end
        self.total_steps = total_steps
        self.keep_regrown = keep_regrown
        self.reset_optimizer_state = reset_optimizer_state
        self.skip_update = skip_update
        self.neuron_ablation = None if neuron_ablation is None else float(neuron_ablation)
        self._counts: list[int] = []
        self._counts_version: int | None = None  # masks.version the cached counts belong to

    def drop_fraction(self, t: int | None = None) -> float:
        return drop_fraction(self.t if t is None else t, self.alpha, self.t_end)

    def update_due(self) -> bool:
        """Whether the next ``step()`` updates the topology (the schedule's answer for this iteration)."""
        return is_update_step(self.t, self.delta_t, self.t_end)

    def needs_dense_gradient(self) -> bool:
        return self.grows_by_gradient and self.update_due()

    def step(self) -> bool:
        """Advance one iteration; on schedule, update the topology.

        Returns True when the topology changed. Then, with ``skip_update``, the
        optimizer's next ``step()`` is a no-op; the skip expires at its next
        ``zero_grad()``, so a step that GradScaler skips for an fp16 overflow
        does not pass it on to the next good step.
        """
        updated = self.update_due() and self.update(self.drop_fraction())
        self.t += 1
        return updated

    # -- the steps of an update, each overridable ------------------------------------------------
    def plan(self, fraction: float, counts: list[int]) -> list[LayerPlan]:
        """How many connections each layer drops and grows: ``int(fraction * active)`` of each, both."""
        return [LayerPlan(int(fraction * c), int(fraction * c)) for c in counts]

    @abstractmethod
    def grow_scores(self, index: int, layer: MaskedLayer) -> torch.Tensor:
        """Score of every entry of the layer's weight; the largest inactive ones are grown."""

    def prune_scores(self, index: int, layer: MaskedLayer, scales: list[torch.Tensor] | None) -> torch.Tensor:
        """Score of every entry of the layer's weight; the smallest active ones are dropped."""
        return self._score_fn(layer.weight, layer.mask, None if scales is None else scales[index])

    def select(self, index: int, layer: MaskedLayer, plan: LayerPlan, prune_score: torch.Tensor,
               grow_score: torch.Tensor | None, n_active: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept, new)`` masks of one layer: after pruning, and after growing, keeping the mask's structure."""
        structure = self.masks.structure
        if plan.n_grow != plan.n_drop and (structure.grouped or self.neuron_ablation is not None):
            raise ValueError(f"layer {layer.name!r}: a {structure} mask keeps every neuron's count, so it must grow "
                             f"what it drops (plan: drop {plan.n_drop}, grow {plan.n_grow})")
        if grow_score is None:  # nothing to grow
            grow_score = torch.zeros_like(layer.mask, dtype=torch.float32)
        if self.neuron_ablation is not None:
            return prune_and_grow_ablating(layer.mask, prune_score, grow_score, plan.n_drop, self.neuron_ablation, n_active)
        if structure.grouped:  # prune anywhere in the layer, regrow within each neuron (N:M group)
            return prune_and_grow_grouped(layer.mask, prune_score, grow_score, plan.n_drop, structure.groups, n_active)
        return prune_and_grow(layer.mask, prune_score, grow_score, plan.n_drop, n_active, plan.n_grow)

    def apply(self, index: int, layer: MaskedLayer, kept: torch.Tensor, new: torch.Tensor) -> None:
        """Make ``new`` the layer's mask: restarted positions get weight 0 and zeroed optimizer state.

        Positions restarting from 0 are the pruned ones and the new ones. With ``keep_regrown`` a
        connection dropped and regrown in the same update never left, so only connections outside
        the old mask are new; otherwise everything not kept is.
        """
        old = layer.mask
        restart = ~(new & old) if self.keep_regrown else ~kept
        layer.weight.masked_fill_(restart, 0.0)
        if self.reset_optimizer_state:
            zero_state_(self.optimizer, layer.weight, restart)
        old.copy_(new)

    def record(self, fraction: float, pruned: int, grown_pruned_share: float | None) -> dict[str, Any]:
        """What :attr:`last_update` says about the update that just happened."""
        return {"t": self.t, "drop_fraction": fraction, "pruned_and_regrown": pruned, "grown_pruned": grown_pruned_share}

    # -- one update --------------------------------------------------------------------------------
    def _active_counts(self) -> list[int]:
        """Active weights per layer, recounted only when the masks changed outside an update."""
        if self._counts_version != self.masks.version:
            self._counts = [int(c) for c in torch.stack([m.sum() for m in self.masks.masks]).tolist()]
            self._counts_version = self.masks.version
        return self._counts

    @torch.no_grad()
    def update(self, fraction: float) -> bool:
        """Update every layer by :meth:`plan`: prune by :meth:`prune_scores`, grow by :meth:`grow_scores`.

        Returns False, changing nothing, when a growth score is not finite (an fp16
        overflow step, say): such an update is skipped and counted in
        :attr:`skipped_updates`.
        """
        counts = self._active_counts()
        plans = self.plan(fraction, counts)
        if len(plans) != len(counts):
            raise ValueError(f"plan() returned {len(plans)} layer plans for {len(counts)} masked layers")
        growth = [self.grow_scores(i, layer) if p.n_grow else None for i, (layer, p) in enumerate(zip(self.masks, plans))]
        finite = [s.isfinite().all() for s in growth if s is not None]
        if finite and not bool(torch.stack(finite).all()):  # one synchronisation for all layers
            self.skipped_updates += 1
            self.last_update = {"t": self.t, "drop_fraction": fraction, "skipped": "non-finite growth scores"}
            return False
        # Every prune score gets the layer's scale when the optimizer has scales (a custom score may read it).
        scales = self.optimizer.layer_scales() if isinstance(self.optimizer, ProvidesScales) else None
        previous = self.masks.grown_on_device()
        total_drop, grown_before, grown_pruned, active = 0, 0, 0, 0
        grown = []
        for index, (layer, plan) in enumerate(zip(self.masks, plans)):
            old = layer.mask
            if previous is not None:  # small reductions on the device, synchronised once below
                grown_before += previous[index].sum()
            if plan.n_drop == 0 and plan.n_grow == 0:
                grown.append(torch.zeros_like(old))
                continue
            kept, new = self.select(index, layer, plan, self.prune_scores(index, layer, scales), growth[index], counts[index])
            active += new.sum()
            if previous is not None:  # net: a connection dropped and regrown at once never left
                grown_pruned += (previous[index] & ~new).sum()
            grown.append(new & ~old)
            self.apply(index, layer, kept, new)
            total_drop += plan.n_drop
        changed = [(c, p) for c, p in zip(counts, plans) if p.n_drop or p.n_grow]
        expected = sum(c - p.n_drop + p.n_grow for c, p in changed)
        # every layer ends with its planned count (ablation: up to rounding k' = active / live); anything else is a bug
        slack = sum(m.shape[0] for m, p in zip(self.masks.masks, plans) if p.n_drop) if self.neuron_ablation else 0
        if abs(int(active) - expected) > slack:
            raise RuntimeError(f"topology update changed the number of active weights: {int(active)} != {expected}")
        check_structure(self.masks.structure, self.masks.names, self.masks.masks, f"after the topology update at t={self.t}")
        self.masks.mark_changed(grown=grown)
        # an update that keeps each layer's count keeps the cache valid; other plans and ablation recount next time
        keeps_counts = self.neuron_ablation is None and all(p.n_drop == p.n_grow for p in plans)
        self._counts_version = self.masks.version if keeps_counts else None
        self.num_updates += 1
        if self.skip_update:
            self.optimizer.skip_next_step()
        share = None
        if previous is not None and int(grown_before) > 0:
            share = int(grown_pruned) / int(grown_before)
        self.last_update = self.record(fraction, total_drop, share)
        return True

    def prune_score_name(self) -> str:
        """What decides the pruning: the configured score, or the subclass whose ``prune_scores`` replaces it."""
        if type(self).prune_scores is not DSTUpdater.prune_scores:
            return f"{type(self).__name__}.prune_scores"
        return self.prune_score if isinstance(self.prune_score, str) else repr(self.prune_score)

    def config(self) -> dict[str, Any]:
        return {
            "method": type(self).__name__,
            "delta_t": self.delta_t,
            "alpha": self.alpha,
            "t_end": self.t_end,
            "keep_regrown": self.keep_regrown,
            "reset_optimizer_state": self.reset_optimizer_state,
            "skip_update": self.skip_update,
            "prune_score": self.prune_score_name(),
            "neuron_ablation": self.neuron_ablation,
        }


class SET(DSTUpdater):
    """Sparse Evolutionary Training (Mocanu et al. 2018): grow uniformly at random.

    The random generator is owned by the object, seeded with ``seed`` (the same
    on every rank, so masks agree by construction) and saved in its state.
    """

    grows_by_gradient = False

    def __init__(self, masks: MaskSet, optimizer: Optimizer | None = None, *, seed: int = 0, **kwargs):
        super().__init__(masks, optimizer, **kwargs)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def grow_scores(self, index: int, layer: MaskedLayer) -> torch.Tensor:
        # Drawn on the CPU so the masks are the same on every device.
        return torch.rand(layer.mask.shape, generator=self.generator).to(layer.mask.device)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


class RigL(DSTUpdater):
    """Rigging the Lottery (Evci et al. 2020): grow where the dense gradient is largest.

    ``growth_gradient="original"`` (default) ranks by the raw dense gradient of
    the current batch, as the paper recommends (higher ITOP, better accuracy);
    ``"corrected"`` ranks by the SparseOpt-scaled gradient ``c_i * g`` (needs a
    :class:`~sparseopt.SparseOpt` optimizer). In DDP runs the gradient is
    already averaged over ranks when ``step()`` runs.
    """

    def __init__(self, masks: MaskSet, optimizer: Optimizer | None = None, *, growth_gradient: str = "original", **kwargs):
        super().__init__(masks, optimizer, **kwargs)
        if growth_gradient not in GROWTH_GRADIENTS:
            raise ValueError(f"unknown growth_gradient {growth_gradient!r}; choose one of {list(GROWTH_GRADIENTS)}")
        if growth_gradient == "corrected" and not isinstance(optimizer, ProvidesScales):
            raise ValueError("growth_gradient='corrected' needs a sparseopt.SparseOpt optimizer (it supplies the scales)")
        self.growth_gradient = growth_gradient
        self._scales: list[torch.Tensor] | None = None

    def update(self, fraction: float) -> bool:
        if self.growth_gradient == "corrected":
            self._scales = self.optimizer.layer_scales()  # from the masks before this update
        try:
            return super().update(fraction)
        finally:
            self._scales = None

    def grow_scores(self, index: int, layer: MaskedLayer) -> torch.Tensor:
        grad = layer.weight.grad
        if grad is None:
            raise RuntimeError(
                f"RigL needs the dense gradient of {layer.name!r}: call topology.step() after "
                "loss.backward() and before optimizer.step() / zero_grad()"
            )
        score = grad.abs()
        if self._scales is not None:
            score = score * self._scales[index].to(score).reshape(neuron_shape(score))
        return score

    def config(self) -> dict[str, Any]:
        return {**super().config(), "growth_gradient": self.growth_gradient}


# name -> updater class. A new DST method is one call (``@DST_METHODS.register("mine")`` on a DSTUpdater
# subclass that defines grow_scores); it is then a choice of --dst. The CLI passes the DSTUpdater keywords
# and, where the class takes them, ``seed`` and ``growth_gradient``.
DST_METHODS: Registry = Registry("DST method")
DST_METHODS.register("static", Static)
DST_METHODS.register("set", SET)
DST_METHODS.register("rigl", RigL)
