"""What the Hugging Face and Lightning callbacks share: one sparse training session around a framework's loop.

A session knows which layers to mask (:func:`target_layers`), builds the masks, runs
:class:`~sparseopt.SparseOpt` in two halves around the optimizer step that the framework
makes itself (its optimizer may be wrapped by accelerate, a GradScaler or a strategy; the
session does not replace it), steps the topology updater once per optimizer step, and
saves all of it in one file beside the framework's checkpoint.

The masks are not part of ``model.state_dict()`` (``persistent=False``): the framework's
own model files hold only the weights, zero at the masked positions, so they load
anywhere without sparseopt, and the session's file holds the masks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import SGD, Optimizer

from ..files import atomic_write, load_checkpoint
from ..masks.maskset import SPARSIFIABLE_TYPES, MaskSet, sparsify, weight_candidates
from ..masks.structure import Structure
from ..optim.sparseopt import SparseOpt
from ..plugins import load_plugins
from ..probe import check_by_building
from ..registry import check_keywords, takes_keyword
from ..topology.updaters import DST_METHODS, TopologyUpdater

logger = logging.getLogger("sparseopt")

STATE_FORMAT = "sparseopt-session"
STATE_VERSION = 1
Patterns = str | Sequence[str] | None


def _patterns(value: Patterns, name: str) -> list[re.Pattern]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    compiled = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{name} must be a regular expression or a list of them, got {item!r}")
        try:
            compiled.append(re.compile(item))
        except re.error as e:
            raise ValueError(f"{name} pattern {item!r} is not a regular expression: {e}") from None
    return compiled


def _under_a_block(name: str, blocks: list[str]) -> bool:
    return any(not block or name.startswith(block + ".") for block in blocks)  # "" : the model is the container


def target_layers(model: nn.Module, targets: Patterns = None, ignore: Patterns = None,
                  types: tuple[type[nn.Module], ...] = SPARSIFIABLE_TYPES) -> list[str]:
    """The names of the layers to mask.

    Default: every layer of ``types`` inside the model's blocks, that is under an
    ``nn.ModuleList`` or ``nn.Sequential`` (``bert.encoder.layer.3.intermediate.dense``,
    ``transformer.h.0.mlp.c_fc``, a ResNet's ``layer2.0.conv1``): embeddings, heads (``lm_head``,
    ``classifier``, a pooler), a network's stem and norms stay dense.
    ``targets``: regular expressions (``re.search`` on the layer's name) that choose the
    layers instead; ``ignore``: expressions that remove layers. A pattern that matches no
    layer is an error naming it. Frozen layers (``requires_grad=False``) stay dense by default and
    are refused when ``targets`` names them. A weight tied to an embedding table (a language model's
    head) stays dense, and a weight shared by two layers is masked once, as in :func:`~sparseopt.sparsify`.
    """
    wanted, unwanted = _patterns(targets, "targets"), _patterns(ignore, "ignore")
    tied: dict[str, tuple[nn.Module, str]] = {}
    candidates = [name for name, _ in weight_candidates(model, types=types, tied=tied)]
    every = [name for name, module in model.named_modules() if isinstance(module, types)]
    for label, patterns in (("targets", wanted), ("ignore", unwanted)):
        for pattern in patterns:
            if not any(pattern.search(name) for name in every):
                raise ValueError(f"{label} pattern {pattern.pattern!r} matches no layer; layers are for example "
                                 f"{every[:4] + (['...'] if len(every) > 4 else [])}")
    if wanted:
        chosen = [n for n in candidates if any(p.search(n) for p in wanted)]
    else:
        blocks = [name for name, module in model.named_modules() if isinstance(module, (nn.ModuleList, nn.Sequential))]
        chosen = [n for n in candidates if _under_a_block(n, blocks)]
    chosen = [n for n in chosen if not any(p.search(n) for p in unwanted)]
    frozen = [n for n in chosen if not model.get_submodule(n).weight.requires_grad]
    if frozen and wanted:
        raise ValueError(f"targets= names frozen layers (requires_grad=False), which no optimizer trains sparse: "
                         f"{frozen[:4] + (['...'] if len(frozen) > 4 else [])}; unfreeze them or ignore= them")
    if frozen:  # a fine-tuning run that freezes some blocks: the blocks it trains are the ones to make sparse
        logger.info("sparseopt: %d frozen layers (requires_grad=False) stay dense, e.g. %r", len(frozen), frozen[0])
        chosen = [n for n in chosen if n not in frozen]
    for name, (_, reason) in tied.items():
        if any(p.search(name) for p in wanted):
            logger.warning("not masking %r: %s", name, reason)
    if not chosen:
        if wanted:
            hint = "targets= names no layer that can be masked"
        elif frozen:
            hint = "every layer in its blocks is frozen"
        else:
            hint = "the model has no blocks (no nn.ModuleList or nn.Sequential)"
        raise ValueError(f"no layer to sparsify: {hint}; pass targets= (regular expressions), layers are for example "
                         f"{every[:4] + (['...'] if len(every) > 4 else [])}")
    return chosen


def innermost_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside a framework's wrappers (accelerate's ``.optimizer``, Lightning's ``._optimizer``)."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper holding one), got {type(optimizer).__name__}")
    return optimizer


class SparseSession:
    """Masks, SparseOpt and the topology updater of one training run inside a framework's loop.

    The arguments are those of the callbacks (:class:`sparseopt.integrations.huggingface.SparseTrainingCallback`);
    every one is checked here, at construction, so a bad value is one line before anything runs.
    """

    def __init__(
        self,
        sparsity: float,
        *,
        distribution: str = "erk",
        structure: str = "unstructured",
        nm: str | None = None,
        dst: str | type[TopologyUpdater] = "rigl",
        delta_t: int = 100,
        alpha: float = 0.3,
        t_end_fraction: float = 0.75,
        precondition: bool = True,
        scale_source: str = "bn_stats",
        targets: Patterns = None,
        ignore: Patterns = None,
        seed: int = 0,
        dst_kwargs: Mapping[str, Any] | None = None,
        types: tuple[type[nn.Module], ...] = SPARSIFIABLE_TYPES,
    ):
        load_plugins()  # a plugin's DST method, distribution or scale source is a valid name here too
        self.sparsity = float(sparsity) if isinstance(sparsity, (int, float)) else sparsity
        self.structure = Structure.parse(structure, nm)
        if isinstance(dst, str):
            self.updater_class = DST_METHODS[dst]
            self.method = dst
        elif isinstance(dst, type) and issubclass(dst, TopologyUpdater):
            self.updater_class, self.method = dst, dst.__name__
        else:
            raise ValueError(f"dst must be one of {DST_METHODS.names()} or a TopologyUpdater subclass, got {dst!r}")
        if not 0.0 < float(t_end_fraction) <= 1.0:
            raise ValueError(f"t_end_fraction must be in (0, 1], got {t_end_fraction!r}")
        self.distribution, self.delta_t, self.alpha = distribution, delta_t, alpha
        self.t_end_fraction, self.precondition, self.scale_source = float(t_end_fraction), bool(precondition), scale_source
        self.targets, self.ignore, self.seed, self.types = targets, ignore, int(seed), types
        self.dst_kwargs = dict(dst_kwargs or {})
        check_keywords(self.updater_class, self.dst_kwargs, f"dst {self.method!r} ({self.updater_class.__name__})",
                       reserved={**{k: "an argument of the callback" for k in ("delta_t", "alpha", "seed")},
                                 "t_end": "set by t_end_fraction", "total_steps": "the trainer's length",
                                 "masks": "built by the callback", "optimizer": "built by the callback"})
        _patterns(targets, "targets"), _patterns(ignore, "ignore")
        # Each component refuses its own bad options (sparsity, distribution, N:M rule, alpha, delta_t, scale
        # source, a method's own options): built once on a probe model, now, before any framework runs.
        check_by_building(self.structure, self._draw, lambda model, masks: self._sparseopt(SGD(model.parameters()), masks),
                          self._updater)
        self.masks: MaskSet | None = None
        self.optimizer: SparseOpt | None = None
        self.topology: TopologyUpdater | None = None

    # -- masks ------------------------------------------------------------------------------------
    def attach_masks(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> MaskSet:
        """Mask ``model``: random masks of the session's distribution, or the given ``masks`` (a saved model's)."""
        if self.masks is not None and self.masks.model is model:
            return self.masks
        if self.masks is not None and self.optimizer is not None:  # a reused callback: its state is the first model's
            raise ValueError(f"this callback has trained a {type(self.masks.model).__name__} (masks on {len(self.masks)} "
                             f"layers) and was given another {type(model).__name__}; a callback holds one model's masks "
                             "and updater: make a new one for each model")
        # No masks yet, or the model was replaced before training began (the Trainer's model_init): mask this one.
        names = target_layers(model, self.targets, self.ignore, self.types)
        transposed = [n for n in names if not isinstance(model.get_submodule(n), SPARSIFIABLE_TYPES)]
        if transposed and self.structure.kind != "unstructured":
            raise ValueError(f"structure {self.structure} needs (out, in) weights, but {transposed[0]!r} is a "
                             f"{type(model.get_submodule(transposed[0])).__name__} that stores (in, out); use "
                             "structure='unstructured' for it, or ignore= it")
        if masks is not None:
            self.masks = MaskSet(model, {n: masks[n] for n in names if n in masks}, self.structure, persistent=False)
            if self.masks.names != names:
                raise ValueError(f"the saved masks cover {self.masks.names}, the callback's targets are {names}")
        else:
            self.masks = self._draw(model, names)
        logger.info("sparseopt: %d layers masked at %.4f density (%s, %s)", len(self.masks), self.masks.density(),
                    self.distribution, self.structure)
        return self.masks

    # -- the optimizer and the topology ------------------------------------------------------------
    def attach_optimizer(self, optimizer: Any, total_steps: int) -> SparseOpt:
        """SparseOpt over the torch optimizer inside ``optimizer``, and the topology updater over ``total_steps``."""
        if self.masks is None:
            raise RuntimeError("attach_masks(model) comes before attach_optimizer()")
        base = innermost_optimizer(optimizer)
        if self.optimizer is not None and self.optimizer.base is base:
            return self.optimizer
        self.optimizer = self._sparseopt(base, self.masks)
        self.topology = self._updater(self.masks, self.optimizer, total_steps)
        return self.optimizer

    # -- the components, built here and only here (for the run and for the probe) -----------------------
    def _draw(self, model: nn.Module, names: list[str] | None = None) -> MaskSet:
        return sparsify(model, self.sparsity, self.distribution, include=names, structure=self.structure,
                        generator=torch.Generator().manual_seed(self.seed), types=self.types, persistent=False)

    def _sparseopt(self, base: Optimizer, masks: MaskSet) -> SparseOpt:
        return SparseOpt(base, masks, precondition=self.precondition, scale_source=self.scale_source)

    def _updater(self, masks: MaskSet, optimizer: SparseOpt, total_steps: int) -> TopologyUpdater:
        options = dict(delta_t=self.delta_t, alpha=self.alpha, t_end=max(1, int(self.t_end_fraction * total_steps)),
                       total_steps=max(1, int(total_steps)), seed=self.seed)
        options = {k: v for k, v in options.items() if takes_keyword(self.updater_class, k)}
        try:
            return self.updater_class(masks, optimizer, **{**options, **self.dst_kwargs})
        except (TypeError, ValueError) as e:
            raise ValueError(f"dst {self.method!r} ({self.updater_class.__name__})"
                             f"{f' with dst_kwargs {self.dst_kwargs}' if self.dst_kwargs else ''}: {e}") from None

    def topology_step(self) -> bool:
        """Once per optimizer step, with the step's gradients complete; True when the masks changed.

        A skip that the last step did not consume (a GradScaler skipped that step for an overflow)
        expires here, as :meth:`SparseOpt.zero_grad` makes it expire in a plain loop.
        """
        self.optimizer.clear_skip()
        return self.topology.step()

    @torch.no_grad()
    def begin_step(self) -> None:
        """Before the base optimizer steps: precondition and mask the gradients, or skip this step.

        A skipped step (the one that changed the topology, as reference RigL does) drops every
        gradient, so the base optimizer, whoever calls it, changes no weight and no state.
        """
        if not self.optimizer.begin_step():
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    @torch.no_grad()
    def end_step(self) -> None:
        """After the base optimizer's step (a skipped one too: it changed nothing): masked weights are zero again."""
        self.optimizer.end_step()

    # -- what the session records ---------------------------------------------------------------------
    def sparsity_config(self) -> dict[str, Any]:
        """The description written into a saved model's config (Hugging Face: ``config.json``'s ``sparsity_config``)."""
        return {
            "format": "sparseopt-masked", "targets": self.masks.names if self.masks is not None else None,
            "target_patterns": self.targets, "ignore": self.ignore, "sparsity": self.sparsity,
            "distribution": self.distribution, "structure": str(self.structure), "method": self.method,
            "delta_t": self.delta_t, "alpha": self.alpha, "precondition": self.precondition,
            "density": None if self.masks is None else self.masks.density(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "config": self.sparsity_config(),
            "masks": self.masks.state_dict(),
            "topology": None if self.topology is None else self.topology.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict()["wrapper"],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a sparseopt session state (format {state.get('format')!r})")
        self.masks.load_state_dict(state["masks"])
        if self.topology is not None and state.get("topology") is not None:
            self.topology.load_state_dict(state["topology"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_wrapper_state(state["optimizer"])

    def save(self, path: str | Path, **extra: Any) -> Path:
        """The state (and ``extra`` plain values: a framework's bookkeeping), written atomically."""
        return atomic_write(path, lambda f: torch.save({**self.state_dict(), **extra}, f))

    @staticmethod
    def read(path: str | Path) -> dict[str, Any]:
        """A saved session state, loaded without unpickling code; a foreign or damaged file is one line."""
        state = load_checkpoint(path)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a sparseopt session state")
        return state


class SessionCallback:
    """The arguments, the session and the attributes both framework callbacks share (a mix-in of each).

    Args:
        sparsity: global sparsity in [0, 1) over the masked layers.
        distribution: ``"erk"`` (default), ``"er"``, ``"uniform"`` or a registered one.
        structure / nm: ``"unstructured"`` (default), ``"constant_fan_in"``, or ``"nm"`` with ``nm="2:4"``.
        dst: ``"rigl"`` (default), ``"set"``, ``"static"``, a plugin's name, or a ``TopologyUpdater`` subclass.
        delta_t, alpha, t_end_fraction: the update period (optimizer steps), the initial drop fraction and
            the share of training after which the masks stop changing.
        precondition, scale_source: SparseOpt's options. Layers that feed a LayerNorm (every transformer)
            have no skew to cancel, so nothing is preconditioned there (docs/results.md); the log says so once.
        targets, ignore: regular expressions (``re.search`` on layer names) that choose the masked layers
            instead of the default (:func:`target_layers`: the layers inside the model's blocks), and that
            remove layers.
        seed: seeds the masks and SET's growth (the same on every rank).
        dst_kwargs: further options of the DST method's constructor.

    Attributes:
        masks: the :class:`~sparseopt.MaskSet` once the model is masked.
        topology, optimizer: the updater and the SparseOpt wrapper once training begins.
    """

    layer_types: tuple[type[nn.Module], ...] = SPARSIFIABLE_TYPES  # the module types a layer to mask may be

    def __init__(self, sparsity: float = 0.9, *, distribution: str = "erk", structure: str = "unstructured",
                 nm: str | None = None, dst: str | type[TopologyUpdater] = "rigl", delta_t: int = 100,
                 alpha: float = 0.3, t_end_fraction: float = 0.75, precondition: bool = True,
                 scale_source: str = "bn_stats", targets: Patterns = None, ignore: Patterns = None, seed: int = 0,
                 dst_kwargs: Mapping[str, Any] | None = None):
        self.session = SparseSession(
            sparsity, distribution=distribution, structure=structure, nm=nm, dst=dst, delta_t=delta_t, alpha=alpha,
            t_end_fraction=t_end_fraction, precondition=precondition, scale_source=scale_source, targets=targets,
            ignore=ignore, seed=seed, dst_kwargs=dst_kwargs, types=self.layer_types)
        self.start()

    def start(self) -> None:
        """A subclass's own attributes (instead of an ``__init__`` that would hide the arguments' signature)."""

    @property
    def masks(self) -> MaskSet | None:
        return self.session.masks

    @property
    def topology(self) -> TopologyUpdater | None:
        return self.session.topology

    @property
    def optimizer(self) -> SparseOpt | None:
        return self.session.optimizer
