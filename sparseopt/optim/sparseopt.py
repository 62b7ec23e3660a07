"""``SparseOpt``: the sparsity-aware diagonal preconditioner around any optimizer.

One step (``precondition=True``):

1. ``g_W[i] *= c_i * m`` for every masked weight ``W`` (rows / output channels
   ``i``, ``m`` the mask): undoes BatchNorm's ``1/sqrt(1 - s_i)`` amplification
   and masks the gradient in one multiply. ``c_i`` comes from a scale source
   (:mod:`sparseopt.optim.scales`): by default ``bn_stats``, ``sigma_i / rms(sigma)``
   from the running variance of the BatchNorm the layer feeds; the paper's
   ``fan_in``, ``sqrt(n_i / n_avg)``, with ``scale_source="fan_in"``;
2. optionally clip the global gradient norm to ``max_grad_norm`` (the paper's
   direction-only ablation, appendix F);
3. the base optimizer's step (SGD with momentum in the paper, or any other);
4. ``W *= m``: masked weights are exactly zero after every step.

With ``precondition=False`` the same object is the plain masked DST baseline
(``c_i = 1``): comparisons between the two change nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..feeds import FeedWatcher
from ..masks.maskset import MaskSet
from .clip import clip_grad_norm_of
from .norms import NORM_TYPES, channel_dim, norm_group_size, removes_skew
from .preconditioner import gradient_multiplier, neuron_scales, smooth_scales
from .presets import OPTIMIZER_PRESETS, preset_for
from .scales import ScaleInput, ScaleSource, make_scale_source
from .wrapper import OptimizerWrapper, foreach_add_, foreach_mul_, grads_of

LAYER_CHOICES = ("all", "normalized")
logger = logging.getLogger("sparseopt")
_NONE: list[str] = []  # the baseline's (empty) selection, one object so the cache check is an identity test


class NormalizedLayerFinder:
    """Finds the masked layers whose output feeds a normalization layer that skews their gradients.

    Watches the model's first forward pass (:class:`sparseopt.feeds.FeedWatcher`): a masked
    layer feeds a norm when the very tensor it returns is the input of a BatchNorm /
    InstanceNorm / GroupNorm / LayerNorm / RMSNorm module. ``found`` lists those whose norm
    has a skew between neurons to cancel (:mod:`sparseopt.optim.norms`: not a LayerNorm over
    the features); ``group_sizes`` says how many neurons share one statistic. Works for any
    model, without tracing.
    """

    def __init__(self, model: nn.Module, masks: MaskSet):
        self.found: list[str] | None = None
        self.norms: dict[str, nn.Module] = {}  # masked layer -> the normalization module it feeds
        self.group_sizes: dict[str, int] = {}  # masked layer -> neurons per statistic of that norm
        self._layers = {layer.name: layer.module for layer in masks}
        self._order = masks.names
        self._watcher: FeedWatcher | None = FeedWatcher(model, self._layers, NORM_TYPES)
        self._done = model.register_forward_hook(self._finish)

    def _finish(self, *_) -> None:
        skewed = set()
        for name, feed in self._watcher.first_norms().items():
            layer = self._layers[name]
            self.norms[name] = feed.module
            self.group_sizes[name] = norm_group_size(feed.module, layer, feed.shape)
            if removes_skew(self.group_sizes[name], feed.shape[channel_dim(layer, feed.shape)]):
                skewed.add(name)
        self.found = [n for n in self._order if n in skewed]
        self.close()

    def conclude(self) -> bool:
        """Settle the answer from what the forward passes so far showed; False if no masked layer has run yet.

        The model's own forward hook settles it after the first full pass; a framework whose step calls
        submodules, not the model (a LightningModule's ``training_step``), settles it here, at the first step.
        """
        if self.found is None and self._watcher is not None and self._watcher.seen:
            self._finish()
        return self.found is not None

    def close(self) -> None:
        """Remove the hooks (after the first forward pass, or when the answer is known)."""
        if self._watcher is not None:
            self._watcher.close()
        if self._done is not None:
            self._done.remove()
            self._done = None


class DetectedLayers:
    """What a finished :class:`NormalizedLayerFinder` found, without its hooks (for copies and pickles)."""

    def __init__(self, found: list[str], norms: dict[str, nn.Module], group_sizes: dict[str, int]):
        self.found, self.norms, self.group_sizes = found, norms, group_sizes

    def conclude(self) -> bool:
        return self.found is not None

    def close(self) -> None:
        pass


class SparseOpt(OptimizerWrapper):
    """Wrap ``base`` so that it trains the sparse model of ``masks`` (optionally preconditioned).

    Args:
        base: any ``torch.optim.Optimizer`` (or wrapper such as :class:`~sparseopt.HAM`)
            holding every masked weight.
        masks: the model's :class:`~sparseopt.MaskSet`.
        precondition: apply the SparseOpt scaling (``False``: plain masked DST baseline).
        layers: which masked layers are preconditioned: ``"normalized"`` (default:
            only layers whose output feeds a normalization with a per-neuron or
            per-group statistic (BatchNorm, InstanceNorm, GroupNorm), which is what
            the theory covers, each with the scale its norm calls for
            (:mod:`sparseopt.optim.norms`; a LayerNorm or RMSNorm over the features
            shares one statistic, has no skew between neurons and is left alone);
            detected on the model's first forward pass), ``"all"`` (every masked
            layer, per neuron, as the authors), or a list of layer names (per neuron).
        max_grad_norm: if set, clip the global gradient norm over all parameters
            to this value after the correction (appendix F; default ``None``).
        scale_weight_decay: fold the base optimizer's coupled weight decay into the
            gradient *before* the scaling, as an L2 term in the loss would be
            (JAX/Flax recipes). Default ``False``: PyTorch's SGD adds it after the
            scaling, unscaled. Intended for SGD; AdamW's decay is decoupled.
        scale_source: where ``c_i`` comes from, a name of
            :data:`~sparseopt.optim.scales.SCALE_SOURCES` or a
            :class:`~sparseopt.optim.scales.ScaleSource`: ``"bn_stats"`` (default,
            recommended: ``sigma_i / rms(sigma)`` from the running variance of the
            BatchNorm the layer feeds, averaged over DDP ranks, recomputed every step;
            layers without running statistics use the fan-in) or ``"fan_in"`` (the
            paper, ``sqrt(n_i / n_avg)``, recomputed when a mask changes).
            docs/results.md has the evidence for the default.
        scale_kwargs: options of the scale source's constructor (a source registered by name).
        scale_ema: ``beta`` of an exponential moving average of ``c`` over steps
            (``0``, the default: ``c`` jumps to its new value at a mask update).
        undamped_growth: connections added by the last topology update get
            ``max(c_i, 1)`` instead of ``c_i`` until the next update.
        preset: the name of the optimizer preset (:data:`~sparseopt.optim.presets.OPTIMIZER_PRESETS`) these
            settings come from; default: the one they are (:func:`~sparseopt.optim.presets.preset_for`). An
            updater's ``prune_score="auto"`` is the preset's prune score.
        process_group: under DDP, the ranks whose BatchNorm statistics are averaged
            before ``bn_stats`` scales are computed (default: the whole world), so
            that every replica applies the same ``c``.
        foreach: use the multi-tensor ``torch._foreach_*`` kernels (``None``, the
            default: when every masked weight is on a CUDA device, as torch.optim
            decides) or one kernel per tensor (``False``).

    Call :meth:`skip_next_step` to make the next :meth:`step` a no-op (the
    topology updaters do this on mask-update steps, as reference RigL does).
    """

    def __init__(
        self,
        base: Optimizer,
        masks: MaskSet,
        *,
        precondition: bool = True,
        layers: str | Sequence[str] = "normalized",
        max_grad_norm: float | None = None,
        scale_weight_decay: bool = False,
        scale_source: str | ScaleSource = "bn_stats",
        scale_kwargs: dict[str, Any] | None = None,
        scale_ema: float = 0.0,
        undamped_growth: bool = False,
        preset: str | None = None,
        process_group=None,
        foreach: bool | None = None,
    ):
        super().__init__(base)
        if not isinstance(masks, MaskSet):
            raise TypeError(f"masks must be a sparseopt.MaskSet, got {type(masks).__name__}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
        source = make_scale_source(scale_source, scale_kwargs)  # ValueError naming the source and the option
        if not 0.0 <= float(scale_ema) < 1.0:
            raise ValueError(f"scale_ema must be in [0, 1), got {scale_ema!r}")
        held = {id(p) for group in base.param_groups for p in group["params"]}
        missing = [layer.name for layer in masks if id(layer.weight) not in held]
        if missing:
            raise ValueError(
                f"the base optimizer does not hold the weights of masked layers {missing}; "
                "build it from model.parameters() (every masked weight must be optimized)"
            )
        self.masks = masks
        self.precondition = bool(precondition)
        self.max_grad_norm = max_grad_norm
        self.scale_weight_decay = bool(scale_weight_decay)
        self._source = source
        self.scale_source = source.name
        self.foreach = foreach
        self.scale_ema = float(scale_ema)
        self.undamped_growth = bool(undamped_growth)
        # The preset these settings belong to (what an updater's prune_score="auto" means with this optimizer):
        # named by whoever built it from one (the command line), or the one its settings are.
        self.preset = OPTIMIZER_PRESETS[preset] if preset is not None else preset_for(
            self.precondition, layers, self.scale_source)
        self.process_group = process_group
        if isinstance(layers, str):
            if layers not in LAYER_CHOICES:
                raise ValueError(f"unknown layers={layers!r}; choose one of {list(LAYER_CHOICES)} or a list of layer names")
            self.layers = layers
            self._selected: list[str] | None = masks.names if layers == "all" else None
        else:
            unknown = sorted(set(layers) - set(masks.names))
            if unknown:
                raise ValueError(f"layers {unknown} are not masked; masked layers are {masks.names}")
            self._selected = [n for n in masks.names if n in set(layers)]
            self.layers = list(self._selected)  # the names themselves, in model order (recorded as given)
        # One finder per run: it serves the layer selection, the scale source and the trainer's monitoring.
        self._finder: NormalizedLayerFinder | DetectedLayers = NormalizedLayerFinder(masks.model, masks)
        self._skip_next = False
        self._saved_decay: list[Any] | None = None  # base weight decay folded into the gradients by begin_step
        # The scales applied now (per layer; None = not preconditioned) and the multipliers built from them.
        self._scales: list[torch.Tensor | None] | None = None
        self._cache_key: tuple | None = None
        self._multipliers: dict[int, torch.Tensor] = {}
        self._fan_in: list[torch.Tensor] = []
        self._fan_in_key: tuple | None = None
        # Neurons per normalization statistic of each preconditioned layer (layers="normalized" only; 1 if absent).
        self._group_sizes: dict[str, int] = {}

    @property
    def dynamic_scales(self) -> bool:
        """Whether ``c`` may change at every step (then it is recomputed per step, not cached)."""
        return self.precondition and (self._source.dynamic or self.scale_ema > 0)

    # -- which layers ---------------------------------------------------------------
    @property
    def preconditioned_layers(self) -> list[str]:
        """Names of the layers whose gradients are scaled (empty for the baseline)."""
        return list(self._selection())

    def normalizations(self) -> dict[str, nn.Module] | None:
        """Masked layer name -> the normalization module its output feeds (None before the first forward pass)."""
        return self._finder.norms if self._finder.found is not None else None

    def _detected(self) -> NormalizedLayerFinder:
        if self._finder.found is None and not self._finder.conclude():
            raise RuntimeError(
                "layers='normalized' and scale_source='bn_stats' are detected on the model's first forward pass; "
                "run a forward pass before calling step() or reading preconditioned_layers"
            )
        return self._finder

    def _selection(self) -> list[str]:
        """The selected layer list itself (not a copy): the per-step cache check compares its identity."""
        if not self.precondition:
            return _NONE
        if self._selected is None:
            self._selected = self._detected().found
            self._set_group_sizes(self._detected().group_sizes)
            if not self._selected:
                logger.warning(
                    "SparseOpt(layers='normalized'): no masked layer's output goes straight into a normalization with "
                    "per-neuron statistics (BatchNorm, InstanceNorm, GroupNorm; a LayerNorm or RMSNorm over the features "
                    "has no skew to cancel), so no gradient is preconditioned and SparseOpt trains exactly as the masked "
                    "baseline; pass layers='all' or a list of layer names to precondition them anyway"
                )
            elif self._source.reads_norms:
                self._source.check(self._scale_inputs(set(self._selected)))
        return self._selected

    def _scale_inputs(self, chosen: set[str]) -> list[ScaleInput]:
        norms = self._detected().norms if self._source.reads_norms and chosen else {}
        fan_in = self._fan_in_scales()
        return [ScaleInput(layer, norms.get(layer.name), fan_in[i]) for i, layer in enumerate(self.masks) if layer.name in chosen]

    def _target_scales(self) -> list[torch.Tensor | None]:
        chosen = set(self._selection())
        computed = iter(self._source.scales(self._scale_inputs(chosen), self.process_group) if chosen else [])
        return [next(computed) if layer.name in chosen else None for layer in self.masks]

    def _set_group_sizes(self, sizes: dict[str, int]) -> None:
        # layers="all" and explicit lists are the paper's rule: every neuron its own c_i.
        self._group_sizes = {n: int(g) for n, g in sizes.items() if g > 1} if self.layers == "normalized" else {}
        self._fan_in_key = None

    def _fan_in_scales(self) -> list[torch.Tensor]:
        """The fan-in ``c`` of every layer, computed once per mask change (smoothing asks for it every step).

        Per neuron (the paper) or, behind a GroupNorm, per group of neurons that share one statistic.
        """
        key = (self.masks.version, tuple(m.device for m in self.masks.masks))
        if self._fan_in_key != key:
            self._fan_in = [neuron_scales(layer.mask, self._group_sizes.get(layer.name, 1)) for layer in self.masks]
            self._fan_in_key = key
        return self._fan_in

    def layer_scales(self) -> list[torch.Tensor]:
        """Per-layer ``c`` vectors as applied now (ones for layers that are not preconditioned)."""
        scales = self._scales if self._scales is not None else self._target_scales()
        return [
            torch.ones(layer.mask.shape[0], device=layer.mask.device) if c is None else c
            for layer, c in zip(self.masks, scales)
        ]

    def _refresh(self) -> None:
        """Bring the scales and multipliers up to date for this step.

        The paper's scale (fan-in, no smoothing) changes only with a mask or the
        selection, so the multipliers are cached and the step is one multiply per
        weight; dynamic scales (BN statistics, smoothing) are recomputed per step.
        """
        selected = self._selection()
        # Keyed on where and in what precision the weights live too: model.to(device / dtype) rebuilds the multipliers.
        key = (self.masks.version, id(selected), tuple((w.device, w.dtype) for w in self.masks.weights))
        if not self.dynamic_scales and key == self._cache_key:
            return
        target = self._target_scales()
        if self.scale_ema > 0 and self._scales is not None:
            target = [
                t if (c is None or t is None) else smooth_scales(c.to(t), t, self.scale_ema)
                for c, t in zip(self._scales, target)
            ]
        self._scales = target
        grown = self.masks.grown_on_device() if self.undamped_growth else None
        multipliers = {}
        for i, (layer, c) in enumerate(zip(self.masks, target)):
            new = gradient_multiplier(layer.mask, c, layer.weight.dtype, None if (grown is None or c is None) else grown[i])
            old = self._multipliers.get(id(layer.weight))
            if old is not None and old.shape == new.shape and old.dtype == new.dtype and old.device == new.device:
                new = old.copy_(new)  # the same storage: a captured (CUDA-graph) step sees the new values
            multipliers[id(layer.weight)] = new
        self._multipliers = multipliers
        self._cache_key = key

    # -- the step -----------------------------------------------------------------------
    def skip_next_step(self) -> None:
        """Make the next :meth:`step` a no-op; the request expires at the next :meth:`zero_grad`.

        The expiry makes it safe with ``GradScaler``: when the scaler skips the
        update step itself (fp16 overflow), the request does not skip the next,
        good step instead.
        """
        self._skip_next = True

    def clear_skip(self) -> None:
        """Withdraw a :meth:`skip_next_step` request that no step consumed (a GradScaler skipped that step)."""
        self._skip_next = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.clear_skip()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def precondition_grads_(self) -> None:
        """Mask (and, if enabled, precondition) the gradients of the masked weights in place."""
        self._refresh()
        params, grads = grads_of(layer.weight for layer in self.masks)
        if params:
            foreach_mul_(grads, [self._multipliers[id(p)] for p in params], self.foreach)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        if self.begin_step():
            try:
                self.base.step()
            finally:
                self.end_step()
        return loss

    # -- the step in two halves, around a base step that someone else calls ------------------
    # Hugging Face's Trainer and Lightning step the optimizer they built (wrapped by accelerate, a
    # GradScaler or a strategy); sparseopt.integrations runs these two halves around that step instead
    # of replacing the optimizer.
    @torch.no_grad()
    def begin_step(self) -> bool:
        """Everything :meth:`step` does before the base optimizer's step; False when this step is skipped.

        A skipped step (:meth:`skip_next_step`) consumes the request; :meth:`end_step` follows the base
        optimizer's step (after a skipped one it only re-applies masks the weights already have).
        """
        if self._skip_next:
            self._skip_next = False
            return False
        self._saved_decay = self._fold_weight_decay() if self.scale_weight_decay else None
        try:
            self.precondition_grads_()
            if self.max_grad_norm is not None:
                clip_grad_norm_of(self.param_groups, self.max_grad_norm, self.foreach)
        except BaseException:
            self._restore_weight_decay()
            raise
        return True

    @torch.no_grad()
    def end_step(self) -> None:
        """Everything :meth:`step` does after the base optimizer's step: masked weights are zero again."""
        self._restore_weight_decay()
        self.masks.apply_()

    def _restore_weight_decay(self) -> None:
        saved, self._saved_decay = self._saved_decay, None
        if saved is not None:
            for group, wd in zip(self.param_groups, saved):
                group["weight_decay"] = wd

    def _fold_weight_decay(self) -> list[Any]:
        """Move coupled weight decay into the gradients; the base step then sees wd = 0."""
        saved = []
        for group in self.param_groups:
            wd = group.get("weight_decay", 0.0)
            saved.append(wd)
            if wd:
                params, grads = grads_of(group["params"])
                if params:
                    foreach_add_(grads, params, wd, self.foreach)
                group["weight_decay"] = 0.0
        return saved

    def __getstate__(self) -> dict[str, Any]:
        # The finder's forward hooks cannot be copied: keep what it found (copies then need no forward pass).
        state = super().__getstate__()
        finder = state.pop("_finder")
        state["_finder"] = DetectedLayers(finder.found, finder.norms, finder.group_sizes)
        return state

    # -- checkpoints ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The options that define the method (recorded with every run)."""
        return {
            "precondition": self.precondition,
            "layers": self.layers,
            "max_grad_norm": self.max_grad_norm,
            "scale_weight_decay": self.scale_weight_decay,
            "scale_source": self.scale_source,
            "scale_ema": self.scale_ema,
            "undamped_growth": self.undamped_growth,
        }

    def wrapper_state(self) -> dict[str, Any]:
        return {
            **self.config(),
            "selected": self._selected,
            "group_sizes": dict(self._group_sizes),
            "skip_next": self._skip_next,
            # The scales of the last step: smoothing carries them to the next, and a topology update that
            # runs before the next step's refresh prunes by them (BN statistics change with every forward,
            # so recomputing them after a resume would prune by other scores than the uninterrupted run).
            "scales": [None if c is None else c.clone() for c in self._scales] if self._scales else None,
        }

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        defaults = {"scale_source": "fan_in", "scale_ema": 0.0, "undamped_growth": False}  # checkpoints from before these options
        for key in ("precondition", "scale_weight_decay", *defaults):
            saved = state.get(key, defaults.get(key))
            if saved != getattr(self, key):
                raise ValueError(f"checkpoint was written with {key}={saved}, this SparseOpt has {getattr(self, key)}")
        if state["selected"] is not None:
            self._selected = list(state["selected"])
            self._set_group_sizes(state.get("group_sizes", {}))  # older checkpoints: per neuron, as they trained
        self._skip_next = bool(state["skip_next"])
        saved_scales = state.get("scales")
        self._scales = None if saved_scales is None else [
            None if c is None else c.to(layer.mask.device) for c, layer in zip(saved_scales, self.masks)
        ]
        self._cache_key = None
