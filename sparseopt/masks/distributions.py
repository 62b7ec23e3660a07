"""Layer-density distributions ("sparsity distributions") as pure functions.

A distribution maps the weight shapes of the sparsified layers and a target
global sparsity ``S`` to one density per layer, such that the total number of
active weights is ``(1 - S) * total`` (SPEC section 3).

* ``uniform``: every layer at density ``1 - S``.
* ``er`` (Erdos-Renyi, Mocanu et al. 2018): ``d_l ∝ (out + in) / (out * in)``.
* ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020):
  ``d_l ∝ (sum of the weight's dims) / (product of the weight's dims)``,
  e.g. ``(out + in + kh + kw) / (out * in * kh * kw)`` for a conv.

For ER/ERK the proportionality constant ``eps`` is solved in closed form; a
layer whose density would exceed 1 is made dense and ``eps`` re-solved, as in
google-research/rigl ``sparse_utils.get_sparsities``.

:func:`active_counts` turns densities into exact integer counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..registry import Registry

Shape = Sequence[int]


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float, or raise ``ValueError`` if outside [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1) (1.0 would remove every weight), got {sparsity!r}")
    return value


def _numel(shape: Shape) -> int:
    return math.prod(int(d) for d in shape)


def _raw_erk_score(shape: Shape, kernel: bool, power_scale: float) -> float:
    # PyTorch weights are (out, in/groups, *kernel); ER uses only (out, in).
    dims = [int(d) for d in (shape if kernel else shape[:2])]
    return (sum(dims) / math.prod(dims)) ** power_scale


def erk_densities(
    shapes: Sequence[Shape],
    sparsity: float,
    *,
    power_scale: float = 1.0,
    kernel: bool = True,
) -> list[float]:
    """Per-layer densities of the ERK (``kernel=True``) or ER distribution.

    Solves ``sum_l d_l * N_l = (1 - S) * sum_l N_l`` with ``d_l = eps * raw_l``,
    ``raw_l = (sum(shape_l) / prod(shape_l)) ** power_scale``. Layers whose
    density would exceed 1 are fixed dense and ``eps`` is solved again over the
    rest (the loop of the RigL reference implementation).

    Args:
        shapes: weight shapes, PyTorch layout ``(out, in/groups, *kernel)``.
        sparsity: target global sparsity ``S`` in [0, 1).
        power_scale: exponent on the raw ERK score (RigL default 1.0; 0 gives uniform).
        kernel: ``True`` for ERK, ``False`` for ER (ignores kernel dims).
    """
    sparsity = check_sparsity(sparsity)
    if len(shapes) == 0:
        raise ValueError("erk_densities needs at least one layer shape")
    numels = [_numel(s) for s in shapes]
    raw = [_raw_erk_score(s, kernel, power_scale) for s in shapes]
    dense: set[int] = set()
    while True:
        # rhs = active weights the non-dense layers must hold in total.
        rhs = sum(n * (1.0 - sparsity) for i, n in enumerate(numels) if i not in dense)
        rhs -= sum(n * sparsity for i, n in enumerate(numels) if i in dense)
        divisor = sum(raw[i] * numels[i] for i in range(len(numels)) if i not in dense)
        if divisor <= 0:  # every layer dense: only possible when sparsity == 0
            return [1.0] * len(shapes)
        eps = rhs / divisor
        over = [i for i in range(len(numels)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        # Make only the layers with the largest raw score dense, then re-solve:
        # eps grows, so another layer may cross 1 on the next pass.
        top = max(raw[i] for i in over)
        dense.update(i for i in over if raw[i] == top)
    return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]


def uniform_densities(shapes: Sequence[Shape], sparsity: float) -> list[float]:
    """Every layer at density ``1 - S``."""
    sparsity = check_sparsity(sparsity)
    return [1.0 - sparsity] * len(shapes)


def _custom_densities(names, shapes, sparsity, *, power_scale=1.0, custom=None) -> list[float]:
    if custom is None:
        raise ValueError("distribution='custom' needs a per-layer map {layer name: sparsity}")
    unknown = sorted(set(custom) - set(names))
    if unknown:
        raise ValueError(f"custom sparsity map names unknown layers {unknown}; sparsifiable layers are {list(names)}")
    missing = [n for n in names if n not in custom]
    if missing:
        raise ValueError(f"custom sparsity map is missing layers {missing}; give a sparsity for every layer in {list(names)}")
    return [1.0 - check_sparsity(custom[n], f"sparsity of layer {n!r}") for n in names]


# name -> fn(names, shapes, sparsity, *, power_scale, custom) -> densities. A new distribution is one call:
# DISTRIBUTIONS.register("mine", fn); it is then a choice of sparsify(), layer_densities() and --distribution.
DISTRIBUTIONS: Registry = Registry("distribution")
DISTRIBUTIONS.register("uniform", lambda names, shapes, s, **kw: uniform_densities(shapes, s))
DISTRIBUTIONS.register("er", lambda names, shapes, s, *, power_scale=1.0, custom=None:
                       erk_densities(shapes, s, power_scale=power_scale, kernel=False))
DISTRIBUTIONS.register("erk", lambda names, shapes, s, *, power_scale=1.0, custom=None:
                       erk_densities(shapes, s, power_scale=power_scale, kernel=True))
DISTRIBUTIONS.register("custom", _custom_densities)


def layer_densities(
    names: Sequence[str],
    shapes: Sequence[Shape],
    sparsity: float,
    distribution: str = "erk",
    *,
    power_scale: float = 1.0,
    custom: Mapping[str, float] | None = None,
) -> list[float]:
    """Dispatch to a registered distribution. ``custom`` maps every layer name to its sparsity."""
    return DISTRIBUTIONS[distribution](names, shapes, sparsity, power_scale=power_scale, custom=custom)


def active_counts(numels: Sequence[int], densities: Sequence[float], *, exact_total: bool = True) -> list[int]:
    """Integer numbers of active weights per layer.

    With ``exact_total`` (largest-remainder rounding) the counts sum to
    ``round(sum_l d_l * N_l)`` exactly, and each layer is within one weight of
    ``d_l * N_l``. Every layer keeps at least one weight.
    """
    targets = [d * n for d, n in zip(densities, numels)]
    counts = [min(n, math.floor(t)) for t, n in zip(targets, numels)]
    if exact_total:
        remainder = round(sum(targets)) - sum(counts)
        # Layers sorted by fractional part (largest first), index as deterministic tie-break.
        order = sorted(range(len(targets)), key=lambda i: (-(targets[i] - counts[i]), i))
        for i in order:
            if remainder <= 0:
                break
            if counts[i] < numels[i]:
                counts[i] += 1
                remainder -= 1
    else:
        counts = [min(n, round(t)) for t, n in zip(targets, numels)]
    return [max(1, c) for c in counts]
