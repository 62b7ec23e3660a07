"""``MaskSet``: the single owner of a model's binary weight masks.

Masks are ``bool`` buffers named ``weight_mask`` registered on the masked
modules, so they are saved and restored with ``model.state_dict()``. Every
other object (optimizers, topology updaters, monitors) reads them from here and
watches :attr:`MaskSet.version` to know when they changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .distributions import active_counts, check_sparsity, layer_densities
from .neurons import fan_in, neuron_shape, neuron_sparsity

MASK_BUFFER = "weight_mask"
SPARSIFIABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
INITS = ("dense", "sparse")


@dataclass(frozen=True)
class MaskedLayer:
    """One masked weight: the module's qualified name and the module itself."""

    name: str
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, MASK_BUFFER)


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
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to sparsify, in registration order.

    Candidates are Conv1d/2d/3d and Linear modules (grouped and depthwise conv
    included). ``include`` keeps only candidates matching a name pattern
    (fnmatch, e.g. ``"layer3.*"``) or module type; ``exclude`` removes matches.
    ``dense_first`` / ``dense_last`` keep the first / last candidate dense.
    A pattern that matches no candidate is an error (it is almost always a typo).
    """
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, SPARSIFIABLE_TYPES)]
    if not candidates:
        raise ValueError("model has no Linear or Conv1d/2d/3d layer to sparsify")
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
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        modules = dict(model.named_modules())
        self.model = model
        self.layers: list[MaskedLayer] = []
        self.version = 0
        self._hooks = []
        for name, mask in masks.items():
            module = modules.get(name)
            if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise ValueError(f"no layer named {name!r} with a weight in the model")
            if tuple(mask.shape) != tuple(module.weight.shape):
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)} but its weight has shape {tuple(module.weight.shape)}"
                )
            if hasattr(module, MASK_BUFFER):
                raise ValueError(f"layer {name!r} already has a {MASK_BUFFER!r}: it is masked by another MaskSet")
            module.register_buffer(MASK_BUFFER, mask.to(device=module.weight.device, dtype=torch.bool).clone())
            # Loading the model's state_dict overwrites the mask buffers in place:
            # bump the version so cached per-mask quantities are recomputed.
            self._hooks.append(module.register_load_state_dict_post_hook(self._on_model_load))
            self.layers.append(MaskedLayer(name, module))
        if not self.layers:
            raise ValueError("a MaskSet needs at least one mask")
        # ITOP: union over time of all masks (Liu et al. 2021).
        self._explored = [layer.mask.clone() for layer in self.layers]
        # Connections added by the last topology update (None before the first one):
        # read by SparseOpt (undamped growth) and by the churn statistic of the updaters.
        self.grown: list[torch.Tensor] | None = None
        self.apply_()

    @torch.no_grad()
    def _on_model_load(self, module, incompatible_keys) -> None:
        # Whatever was loaded (a dense checkpoint with strict=False, say), masked weights are zero again.
        module.weight.mul_(getattr(module, MASK_BUFFER))
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

    @property
    def explored(self) -> list[torch.Tensor]:
        """ITOP's union of all masks seen, per layer, on the masks' current device (moved lazily after ``model.to``)."""
        for i, mask in enumerate(self.masks):
            if self._explored[i].device != mask.device:
                self._explored[i] = self._explored[i].to(mask.device)
        return self._explored

    def grown_on_device(self) -> list[torch.Tensor] | None:
        """:attr:`grown` on the masks' current device (None before the first topology update)."""
        if self.grown is None:
            return None
        for i, mask in enumerate(self.masks):
            if self.grown[i].device != mask.device:
                self.grown[i] = self.grown[i].to(mask.device)
        return self.grown

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
        out: dict[str, float] = {"density": self.density(), "itop": self.itop_rate()}
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
        }

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                f"checkpoint masks are for layers {list(state['names'])}, this MaskSet has {self.names}: "
                "is the checkpoint from another model or sparsity configuration?"
            )
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
            delattr(layer.module, MASK_BUFFER)
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

    Returns:
        the :class:`MaskSet`; the global number of active weights is
        ``round((1 - S) * total)`` exactly (up to one weight per layer when a
        layer is too small to hold its share).
    """
    sparsity = check_sparsity(sparsity)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(INITS)}")
    chosen = select_layers(model, include=include, exclude=exclude, dense_first=dense_first, dense_last=dense_last)
    names = [n for n, _ in chosen]
    shapes = [tuple(m.weight.shape) for _, m in chosen]
    densities = layer_densities(names, shapes, sparsity, distribution, power_scale=power_scale, custom=custom)
    counts = active_counts([m.weight.numel() for _, m in chosen], densities, exact_total=distribution != "custom")
    masks = {
        name: random_mask(module.weight.shape, count, generator, module.weight.device)
        for (name, module), count in zip(chosen, counts)
    }
    mask_set = MaskSet(model, masks)
    if init == "sparse":
        sparse_init_(mask_set, generator=generator)
    return mask_set
