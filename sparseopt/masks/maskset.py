"""``MaskSet``: the single owner of a model's binary weight masks.

Masks are ``bool`` buffers named ``weight_mask`` registered on the masked
modules, so they are saved and restored with ``model.state_dict()``. Every
other object (optimizers, topology updaters, monitors) reads them from here and
watches :attr:`MaskSet.version` to know when they changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .distributions import active_counts, check_sparsity, layer_densities
from .neurons import fan_in, neuron_shape, neuron_sparsity
from .structure import Structure, check_structure

logger = logging.getLogger("sparseopt")

MASK_SUFFIX = "_mask"  # the mask of parameter <p> is the buffer <p>_mask of the same module
MASK_BUFFER = "weight" + MASK_SUFFIX
SPARSIFIABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Attention projections that are parameters of nn.MultiheadAttention itself (its out_proj is a Linear).
ATTENTION_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
INITS = ("dense", "sparse")


@dataclass(frozen=True)
class MaskedLayer:
    """One masked weight: its name, the module that owns it and the parameter's name there.

    The name is the module's qualified name for a module's ``weight`` (``"layer1.0.conv1"``)
    and ``"<module>.<parameter>"`` otherwise (``"encoder.attn.in_proj_weight"``); the
    mask is the buffer ``<parameter>_mask`` of the same module.
    """

    name: str
    module: nn.Module
    param: str = "weight"

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def buffer(self) -> str:
        return f"{self.param}{MASK_SUFFIX}"

    @property
    def weight_path(self) -> str:
        """The weight's key in ``model.state_dict()``."""
        module_name = self.name if self.param == "weight" else self.name.rsplit(".", 1)[0]
        return f"{module_name}.{self.param}" if module_name else self.param

    @property
    def buffer_path(self) -> str:
        """The mask's key in ``model.state_dict()``."""
        return self.weight_path + MASK_SUFFIX

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, self.buffer)


def resolve_weight(modules: Mapping[str, nn.Module], name: str) -> tuple[nn.Module, str] | None:
    """(module, parameter name) of a masked-weight name, or None when the model has no such weight."""
    module = modules.get(name)
    if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
        return module, "weight"
    owner, _, param = name.rpartition(".")
    module = modules.get(owner)
    if module is not None and isinstance(getattr(module, param, None), nn.Parameter):
        return module, param
    return None


def weight_candidates(model: nn.Module, embeddings: bool = False,
                      types: tuple[type[nn.Module], ...] = SPARSIFIABLE_TYPES,
                      tied: dict[str, tuple[nn.Module, str]] | None = None) -> list[tuple[str, nn.Module]]:
    """Every weight ``sparsify`` may mask, as (name, owning module), in registration order.

    Linear and Conv1d/2d/3d weights; nn.MultiheadAttention's input projections
    (``in_proj_weight``, or ``q/k/v_proj_weight`` when key and value sizes differ);
    nn.Embedding tables only with ``embeddings=True``. A weight shared by several
    modules appears once, under its first owner. ``types`` replaces the Linear and
    Conv module types (an integration adds its framework's own, as transformers' Conv1D).
    ``tied`` receives ``name -> (module, reason)`` for each weight left out for a tie (the caller says
    so for the layers it asked for).
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, types) or (embeddings and isinstance(module, nn.Embedding)):
            found.append((name, module, module.weight))
        elif isinstance(module, nn.MultiheadAttention):
            found += [(f"{name}.{p}" if name else p, module, getattr(module, p))
                      for p in ATTENTION_PARAMS if getattr(module, p, None) is not None]
    # Tied weights (a decoder sharing its embedding's table, say) are one parameter: masking it twice would
    # multiply two independent masks (actual density far below the reported one). The first owner masks it;
    # without ``embeddings`` a weight tied to an embedding table stays dense, as the table itself does.
    tables = set() if embeddings else {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen = set(tables)
    out = []
    for name, module, weight in found:
        if id(weight) in seen:
            if tied is not None:
                tied[name] = (module, "its weight is tied to an embedding table, which stays dense (embeddings=False)"
                              if id(weight) in tables else "its weight is tied to a layer masked already (one mask)")
            continue
        seen.add(id(weight))
        out.append((name, module))
    return out


def _matches(name: str, module: nn.Module, selectors: Iterable[str | type]) -> bool:
    for sel in selectors:
        if isinstance(sel, str) and fnmatch.fnmatchcase(name, sel):
            return True
        if isinstance(sel, type) and isinstance(module, sel):
            return True
    return False


def select_layers(
    model: nn.Module,
    *,
    include: Sequence[str | type] | None = None,
    exclude: Sequence[str | type] = (),
    dense_first: bool = False,
    dense_last: bool = False,
    embeddings: bool = False,
    types: tuple[type[nn.Module], ...] = SPARSIFIABLE_TYPES,
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to sparsify, in registration order.

    Candidates are the weights of :func:`weight_candidates`: Conv1d/2d/3d and
    Linear modules (grouped and depthwise conv included), MultiheadAttention's
    input projections, and Embedding tables when ``embeddings`` is set.
    ``include`` keeps only candidates matching a name pattern (fnmatch, e.g.
    ``"layer3.*"``) or module type; ``exclude`` removes matches.
    ``dense_first`` / ``dense_last`` keep the first / last candidate dense.
    A pattern that matches no candidate is an error (it is almost always a typo).
    ``types``: the module types whose ``weight`` is a candidate (see :func:`weight_candidates`).
    """
    tied: dict[str, tuple[nn.Module, str]] = {}
    candidates = weight_candidates(model, embeddings, types, tied)
    for name, (module, reason) in tied.items():  # said for the layers the selectors ask for
        if (include is None or _matches(name, module, include)) and not _matches(name, module, exclude):
            logger.info("not masking %r: %s", name, reason)
    if not candidates:
        raise ValueError("model has no Linear, Conv1d/2d/3d or MultiheadAttention weight to sparsify")
    for label, selectors in (("include", include or ()), ("exclude", exclude)):
        for sel in selectors:
            if not any(_matches(n, m, [sel]) for n, m in candidates):
                raise ValueError(
                    f"{label} selector {sel!r} matches no sparsifiable layer; "
                    f"layers are {[n for n, _ in candidates]}"
                )
    first, last = candidates[0][0], candidates[-1][0]
    chosen = []
    for name, module in candidates:
        if include is not None and not _matches(name, module, include):
            continue
        if _matches(name, module, exclude):
            continue
        if (dense_first and name == first) or (dense_last and name == last):
            continue
        chosen.append((name, module))
    if not chosen:
        raise ValueError("the include/exclude/dense_first/dense_last options leave no layer to sparsify")
    return chosen


def random_mask(shape: torch.Size, n_active: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """A bool mask with exactly ``n_active`` ones at uniformly random positions."""
    numel = int(torch.Size(shape).numel())
    order = torch.randperm(numel, generator=generator)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[:n_active]] = True
    return mask.reshape(shape).to(device)


class MaskSet:
    """Binary masks for a set of layers of one model.

    Build one with :func:`sparsify` (random masks from a distribution) or
    directly from explicit masks: ``MaskSet(model, {"fc1": mask, ...})``.

    Attributes:
        layers: the masked layers, in model order.
        version: incremented whenever any mask changes (topology update,
            ``load_state_dict``); consumers cache per-mask quantities on it.
        structure: the :class:`~sparseopt.masks.structure.Structure` every mask keeps
            (unstructured, constant fan-in, N:M); topology updates preserve it.
        persistent: whether the masks are part of ``model.state_dict()`` (default), so that
            loading a state dict loads them and re-zeroes the masked weights. With ``False``
            their owner saves them (:meth:`state_dict`) and the model's own files hold only
            the weights, zero at the masked positions: the Hugging Face and Lightning
            integrations do this, so the model loads anywhere without sparseopt.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], structure: Structure | str = "unstructured",
                 persistent: bool = True):
        modules = dict(model.named_modules())
        self.persistent = bool(persistent)
        self.model = model
        self.structure = Structure.parse(structure)
        self.layers: list[MaskedLayer] = []
        self.version = 0
        self._hooks = []
        for name, mask in masks.items():
            found = resolve_weight(modules, name)
            if found is None:
                raise ValueError(f"no layer named {name!r} with a weight in the model (nor a parameter of that name)")
            layer = MaskedLayer(name, *found)
            weight = layer.weight
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)} but its weight has shape {tuple(weight.shape)}"
                )
            if weight.dim() < 2:
                raise ValueError(f"{name!r} has a {weight.dim()}-D weight; masks are for (out, in, ...) weights")
            if hasattr(layer.module, layer.buffer):
                raise ValueError(f"layer {name!r} already has a {layer.buffer!r}: it is masked by another MaskSet")
            tied = next((other.name for other in self.layers if other.weight is weight), None)
            if tied is not None:
                raise ValueError(f"layers {tied!r} and {name!r} share one weight (tied parameters); give it one mask")
            layer.module.register_buffer(layer.buffer, mask.to(device=weight.device, dtype=torch.bool).clone(),
                                         persistent=self.persistent)
            if self.persistent and not any(other.module is layer.module for other in self.layers):
                # Loading the model's state_dict overwrites the mask buffers in place:
                # bump the version so cached per-mask quantities are recomputed.
                self._hooks.append(layer.module.register_load_state_dict_post_hook(self._on_model_load))
            self.layers.append(layer)
        if not self.layers:
            raise ValueError("a MaskSet needs at least one mask")
        for layer in self.layers:
            self.structure.check_shape(layer.name, tuple(layer.mask.shape))
        check_structure(self.structure, self.names, self.masks, "as given")
        # ITOP: union over time of all masks (Liu et al. 2021).
        self._explored = [layer.mask.clone() for layer in self.layers]
        # Connections added by the last topology update (None before the first one):
        # read by SparseOpt (undamped growth) and by the churn statistic of the updaters.
        self.grown: list[torch.Tensor] | None = None
        self.apply_()

    @torch.no_grad()
    def _on_model_load(self, module, incompatible_keys) -> None:
        # Whatever was loaded (a dense checkpoint with strict=False, say), masked weights are zero again.
        for layer in self.layers:
            if layer.module is module:
                layer.weight.mul_(layer.mask)
        self.mark_changed(update_itop=False)

    # -- access -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[MaskedLayer]:
        return iter(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def masks(self) -> list[torch.Tensor]:
        return [layer.mask for layer in self.layers]

    @property
    def weights(self) -> list[torch.Tensor]:
        return [layer.weight for layer in self.layers]

    def __getitem__(self, name: str) -> torch.Tensor:
        for layer in self.layers:
            if layer.name == name:
                return layer.mask
        raise KeyError(f"no mask for layer {name!r}; masked layers are {self.names}")

    # -- counts -----------------------------------------------------------------
    @property
    def total(self) -> int:
        """Number of sparsifiable weights (dense size of all masked layers)."""
        return sum(layer.mask.numel() for layer in self.layers)

    def num_active(self) -> list[int]:
        return [int(layer.mask.sum()) for layer in self.layers]

    def densities(self) -> dict[str, float]:
        return {layer.name: int(layer.mask.sum()) / layer.mask.numel() for layer in self.layers}

    def density(self) -> float:
        return sum(self.num_active()) / self.total

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def _unmasked_parameters(self) -> list[tuple[str, torch.Tensor]]:
        masked = {id(layer.weight) for layer in self}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) not in masked]

    def unmasked_weights(self) -> list[tuple[str, int]]:
        """(name, size) of the model's parameters with 2+ dims that no mask covers: what stays dense."""
        return [(n, p.numel()) for n, p in self._unmasked_parameters() if p.dim() >= 2]

    def model_density(self) -> float:
        """Density over every parameter of the model (biases, norms and unmasked weights count as dense)."""
        total = sum(p.numel() for p in self.model.parameters())
        dense = sum(p.numel() for _, p in self._unmasked_parameters())
        return (dense + sum(self.num_active())) / total

    # -- enforcing the masks ----------------------------------------------------
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight (``w *= m``)."""
        torch._foreach_mul_(self.weights, self.masks)

    def mark_changed(self, update_itop: bool = True, grown: list[torch.Tensor] | None = None) -> None:
        """Call after editing masks in place: bumps :attr:`version`, updates ITOP.

        ``grown``: per layer, the connections the edit added (a topology update passes them).
        """
        self.version += 1
        if grown is not None:
            self.grown = grown
        if update_itop:
            for explored, mask in zip(self.explored, self.masks):
                explored.logical_or_(mask)

    def _follow_masks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Move per-layer bookkeeping (in place in the list) to the masks' current device, after ``model.to``."""
        for i, mask in enumerate(self.masks):
            if tensors[i].device != mask.device:
                tensors[i] = tensors[i].to(mask.device)
        return tensors

    @property
    def explored(self) -> list[torch.Tensor]:
        """ITOP's union of all masks seen, per layer, on the masks' current device."""
        return self._follow_masks(self._explored)

    def grown_on_device(self) -> list[torch.Tensor] | None:
        """:attr:`grown` on the masks' current device (None before the first topology update)."""
        return None if self.grown is None else self._follow_masks(self.grown)

    # -- monitoring ---------------------------------------------------------------
    def itop_rates(self) -> dict[str, float]:
        """Per-layer ITOP rate: |union of masks seen| / weights of the layer."""
        return {layer.name: int(e.sum()) / e.numel() for layer, e in zip(self.layers, self.explored)}

    def itop_rate(self) -> float:
        """Global ITOP rate: |union of all masks seen| / total sparsifiable weights."""
        return sum(int(e.sum()) for e in self.explored) / self.total

    def stats(self) -> dict[str, float]:
        """Flat dict ready for logging: densities, ITOP rates, neuron-sparsity statistics.

        Keys: ``density``, ``itop``, ``density/<layer>``, ``itop/<layer>``,
        ``neuron_sparsity/<layer>/{min,mean,max,std}``. Rates are fractions in [0, 1].
        """
        out: dict[str, float] = {"density": self.density(), "density_model": self.model_density(), "itop": self.itop_rate()}
        itop = self.itop_rates()
        for layer in self.layers:
            s = neuron_sparsity(layer.mask)
            out[f"density/{layer.name}"] = int(layer.mask.sum()) / layer.mask.numel()
            out[f"itop/{layer.name}"] = itop[layer.name]
            out[f"neuron_sparsity/{layer.name}/min"] = float(s.min())
            out[f"neuron_sparsity/{layer.name}/mean"] = float(s.mean())
            out[f"neuron_sparsity/{layer.name}/max"] = float(s.max())
            out[f"neuron_sparsity/{layer.name}/std"] = float(s.std(unbiased=False))
        return out

    def checksum(self) -> str:
        """A hex digest of all masks, equal iff the masks are equal (cross-rank checks)."""
        digest = hashlib.blake2b(digest_size=16)
        for mask in self.masks:
            digest.update(mask.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    # -- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "names": self.names,
            "masks": [m.clone() for m in self.masks],
            "explored": [e.clone() for e in self._explored],
            "grown": None if self.grown is None else [g.clone() for g in self.grown],
            "structure": self.structure.to_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                f"checkpoint masks are for layers {list(state['names'])}, this MaskSet has {self.names}: "
                "is the checkpoint from another model or sparsity configuration?"
            )
        saved = Structure.from_dict(state.get("structure"))
        if saved != self.structure:
            raise ValueError(f"checkpoint masks have the {saved} structure, this MaskSet has {self.structure}")
        check_structure(self.structure, self.names, list(state["masks"]), "in the checkpoint")
        for layer, mask, name in zip(self.layers, state["masks"], self.names):
            if tuple(mask.shape) != tuple(layer.mask.shape):
                raise ValueError(f"checkpoint mask for {name!r} has shape {tuple(mask.shape)}, expected {tuple(layer.mask.shape)}")
            layer.mask.copy_(mask)
        for dst, src in zip(self.explored, state["explored"]):
            dst.copy_(src)
        grown = state.get("grown")
        self.grown = None if grown is None else [g.to(m.device, torch.bool).clone() for g, m in zip(grown, self.masks)]
        self.mark_changed(update_itop=False)
        self.apply_()

    def remove(self) -> None:
        """Detach the masks from the model (weights keep their current values)."""
        for hook in self._hooks:
            hook.remove()
        for layer in self.layers:
            delattr(layer.module, layer.buffer)
        self.layers = []


@torch.no_grad()
def sparse_init_(masks: MaskSet, gain: float = 2.0**0.5, generator: torch.Generator | None = None) -> None:
    """Sparsity-aware init (Evci et al. 2022): active weights of neuron i ~ N(0, gain^2 / n_i).

    ``gain`` defaults to He's sqrt(2) for ReLU networks. Neurons with no
    active weight stay all-zero.
    """
    for layer in masks:
        n = fan_in(layer.mask).to(torch.float32).clamp_min(1.0)
        std = (gain / n.sqrt()).reshape(neuron_shape(layer.weight))
        noise = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float32)
        layer.weight.copy_((noise * std.cpu()).to(layer.weight) * layer.mask)


def sparsify(
    model: nn.Module,
    sparsity: float,
    distribution: str = "erk",
    *,
    include: Sequence[str | type] | None = None,
    exclude: Sequence[str | type] = (),
    dense_first: bool = False,
    dense_last: bool = False,
    power_scale: float = 1.0,
    custom: Mapping[str, float] | None = None,
    init: str = "dense",
    generator: torch.Generator | None = None,
    embeddings: bool = False,
    structure: str | Structure = "unstructured",
    nm: str | tuple[int, int] | None = None,
    types: tuple[type[nn.Module], ...] = SPARSIFIABLE_TYPES,
    persistent: bool = True,
) -> MaskSet:
    """Mask a model's Conv/Linear weights at global ``sparsity`` with random masks.

    Args:
        model: any ``nn.Module``; its weights are masked in place.
        sparsity: global sparsity ``S`` in [0, 1) over all masked weights.
        distribution: ``"erk"`` (default, as RigL), ``"er"``, ``"uniform"`` or
            ``"custom"`` (then ``custom`` maps every layer name to its sparsity).
        include / exclude / dense_first / dense_last: which layers, see :func:`select_layers`.
            Layers kept dense are not masked and not counted in the total.
        power_scale: ERK exponent (RigL default 1).
        init: ``"dense"`` keeps the model's init and masks it (default, as RigL);
            ``"sparse"`` re-draws active weights with the per-neuron fan-in (Evci et al. 2022).
        generator: seeds the random masks (and sparse init); ``None`` uses torch's global RNG.
        embeddings: also mask nn.Embedding tables (off by default: rows of an embedding are not neurons).
        structure: ``"unstructured"`` (default), ``"constant_fan_in"`` (every neuron of a layer
            keeps ``round(density * fan_in)`` inputs, the layer densities of ``distribution``;
            SRigL) or ``"nm"`` with ``nm="N:M"`` (exactly N active in every M consecutive inputs;
            ``sparsity`` must then be ``1 - N/M``). See :mod:`sparseopt.masks.structure`.
        types: the module types whose weights may be masked (default Linear and Conv1d/2d/3d).
        persistent: whether the masks are part of ``model.state_dict()`` (see :class:`MaskSet`).

    Returns:
        the :class:`MaskSet`; the global number of active weights is
        ``round((1 - S) * total)`` exactly (up to one weight per layer when a
        layer is too small to hold its share; constant fan-in rounds each layer
        to a whole number of inputs per neuron).
    """
    sparsity = check_sparsity(sparsity)
    structure = Structure.parse(structure, nm)
    if structure.density is not None and abs((1 - sparsity) - structure.density) > 1e-9:
        raise ValueError(f"structure {structure} fixes the sparsity at {1 - structure.density:g}; got sparsity={sparsity:g}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(INITS)}")
    chosen = select_layers(model, include=include, exclude=exclude, dense_first=dense_first, dense_last=dense_last,
                           embeddings=embeddings, types=types)
    modules = dict(model.named_modules())
    names = [n for n, _ in chosen]
    weights = [getattr(*resolve_weight(modules, n)) for n in names]
    shapes = [tuple(w.shape) for w in weights]
    densities = layer_densities(names, shapes, sparsity, distribution, power_scale=power_scale, custom=custom)
    counts = active_counts([w.numel() for w in weights], densities, exact_total=distribution != "custom")
    for name, shape in zip(names, shapes):
        structure.check_shape(name, shape)
    draw = structure.random_mask if structure.grouped else random_mask
    masks = {name: draw(w.shape, count, generator, w.device) for name, w, count in zip(names, weights, counts)}
    mask_set = MaskSet(model, masks, structure, persistent)
    if init == "sparse":
        sparse_init_(mask_set, generator=generator)
    dense = mask_set.unmasked_weights()
    if dense:
        logger.info("sparsify: %d weights stay dense (%s); density %.4f over the masked weights, %.4f over the model",
                    len(dense), ", ".join(f"{n} ({k})" for n, k in dense), mask_set.density(), mask_set.model_density())
    return mask_set
