"""Where SparseOpt's per-neuron scale ``c_i`` comes from: a registry of scale sources.

A scale source maps the preconditioned layers to their ``c`` vectors. Two are
built in: ``fan_in`` (the paper, ``sqrt(n_i / n_avg)``) and ``bn_stats`` (the
following BatchNorm's running standard deviation, averaged over DDP ranks). A
new one is a subclass registered by name, usable as
``SparseOpt(scale_source="name")`` and ``--scale-source name``::

    @SCALE_SOURCES.register("fan_in_quarter")
    class QuarterPower(ScaleSource):
        def scales(self, inputs, process_group=None):
            return [x.fan_in_scale.sqrt() for x in inputs]      # (n_i / n_avg) ** 0.25
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..masks.maskset import MaskedLayer
from ..registry import Registry, check_keywords
from .preconditioner import bn_scales

logger = logging.getLogger("sparseopt")


@dataclass(frozen=True)
class ScaleInput:
    """What a scale source may read for one preconditioned layer."""

    layer: MaskedLayer
    norm: nn.Module | None  # the normalization its output feeds (None when unknown or none)
    fan_in_scale: torch.Tensor  # the paper's scale sqrt(n_i / n_avg), per group behind a GroupNorm (sparseopt.optim.norms)

    @property
    def fan_in(self) -> torch.Tensor:
        """Deprecated name of :attr:`fan_in_scale` (it is the scale, not the count that sparseopt.fan_in returns)."""
        warnings.warn("ScaleInput.fan_in is renamed fan_in_scale (it holds sqrt(n_i / n_avg), not the fan-in count)",
                      DeprecationWarning, stacklevel=2)
        return self.fan_in_scale


class ScaleSource:
    """Computes ``c`` (shape ``(out,)``, mean of ``c**2`` about 1, 0 for a neuron without weights) per layer.

    ``dynamic``: ``c`` may change at any step (recomputed every step) rather than only when
    a mask changes (cached). ``reads_norms``: the source needs the normalization module each
    layer feeds, found on the model's first forward pass.
    """

    name = "custom"
    dynamic = False
    reads_norms = False

    def scales(self, inputs: list[ScaleInput], process_group=None) -> list[torch.Tensor]:
        raise NotImplementedError

    def check(self, inputs: list[ScaleInput]) -> None:
        """Called once when the preconditioned layers are known: say what the source cannot read."""


class FanInScale(ScaleSource):
    """The paper's ``c_i = sqrt(n_i / n_avg)``, a function of the mask only."""

    name = "fan_in"

    def scales(self, inputs: list[ScaleInput], process_group=None) -> list[torch.Tensor]:
        return [x.fan_in_scale for x in inputs]


def _running_var(x: ScaleInput) -> torch.Tensor | None:
    var = getattr(x.norm, "running_var", None)
    return var if var is not None and var.shape[0] == x.layer.mask.shape[0] else None


class BNStatsScale(ScaleSource):
    """``c_i = sigma_i / rms(sigma)`` from the running variance of the BatchNorm a layer feeds.

    The statistics are averaged over the ranks of ``process_group`` first (one all-reduce), so
    every replica applies the same ``c``. Layers without per-neuron running statistics use the fan-in.
    """

    name = "bn_stats"
    dynamic = True
    reads_norms = True

    def scales(self, inputs: list[ScaleInput], process_group=None) -> list[torch.Tensor]:
        with_stats = [i for i, x in enumerate(inputs) if _running_var(x) is not None]
        averaged = dict(zip(with_stats, mean_over_ranks([_running_var(inputs[i]) for i in with_stats], process_group)))
        return [bn_scales(averaged[i], x.layer.mask) if i in averaged else x.fan_in_scale for i, x in enumerate(inputs)]

    def check(self, inputs: list[ScaleInput]) -> None:
        no_stats = [x.layer.name for x in inputs if _running_var(x) is None]
        if no_stats:
            logger.info("scale_source='bn_stats': %s feed a normalization without running statistics; "
                        "their c_i is the fan-in scale", no_stats)


def mean_over_ranks(tensors: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """The mean of each tensor over the ranks of ``group`` (one all-reduce); the tensors themselves outside DDP.

    BatchNorm's running statistics differ per rank (each sees its own batch). Scales read from them must
    be the same on every rank, or the replicas' weights drift apart although their masks stay equal.
    """
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensors
    flat = torch.cat([t.detach().to(torch.float32).reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)  # every rank receives the same sum, so the same bits
    flat /= dist.get_world_size(group)
    return list(flat.split([t.numel() for t in tensors]))


# name -> ScaleSource subclass, instantiated by SparseOpt with its ``scale_kwargs`` (none by default).
SCALE_SOURCES: Registry[type[ScaleSource]] = Registry("scale source")
SCALE_SOURCES.register("fan_in", FanInScale)
SCALE_SOURCES.register("bn_stats", BNStatsScale)


def make_scale_source(source: str | ScaleSource | type[ScaleSource], kwargs: dict | None = None) -> ScaleSource:
    """A registered source by name (or a :class:`ScaleSource` subclass) built with ``kwargs``, or an instance as it is.

    The options are checked against the class's signature ("did you mean"); a registered object that is not
    a ScaleSource subclass, or an option its constructor cannot take, is one line naming the source.
    """
    kwargs = dict(kwargs or {})
    if isinstance(source, ScaleSource):
        if kwargs:
            raise ValueError(f"scale_kwargs {kwargs} are for a scale source built by name; "
                             f"{type(source).__name__} is built already")
        return source
    cls = source if isinstance(source, type) else SCALE_SOURCES[source]  # ValueError listing the registered names
    label = source if isinstance(source, str) else cls.__name__
    if not (isinstance(cls, type) and issubclass(cls, ScaleSource)):
        raise ValueError(f"scale source {label!r} is registered as {type(cls).__name__} {cls!r}; register a "
                         "ScaleSource subclass that defines scales(inputs, process_group) (sparseopt.optim.scales)")
    check_keywords(cls, kwargs, f"scale source {label!r} ({cls.__name__})")
    try:
        instance = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"scale source {label!r} ({cls.__name__}) with scale_kwargs {kwargs}: {e}") from None
    if isinstance(source, str) and instance.name != source:  # a registered subclass that did not set its name
        instance.name = source
    return instance
