"""Sparsity structures: where the active weights of a layer may be (pure functions on masks).

* ``unstructured``: anywhere (SET/RigL as published).
* ``constant_fan_in``: every output neuron keeps the same number ``k`` of active inputs
  (SRigL, Lasby et al. ICLR 2024). All ``n_i`` of a layer are equal, so SparseOpt's
  fan-in scale is 1 and BatchNorm's fan-in skew is gone by construction; and a layer
  can be stored and multiplied as a dense ``(out, k)`` block of values and indices
  (the condensed layer of :mod:`sparseopt.deploy`).
* ``nm`` (``N:M``): in every group of ``M`` consecutive inputs of a neuron exactly ``N``
  are active (2:4 for sparse tensor cores). The inputs are a weight's flattened
  ``(in, *kernel)`` dimension, the reduction dimension of the layer's matrix product.

Each structure splits a mask into *groups* (rows for constant fan-in, blocks of M for
N:M) whose active counts a topology update keeps unchanged: prune anywhere in the
layer by score, then regrow in each group as many as it lost (:func:`sparseopt.topology.
selection.prune_and_grow_grouped`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRUCTURES = ("unstructured", "constant_fan_in", "nm")


@dataclass(frozen=True)
class Structure:
    kind: str = "unstructured"
    n: int = 0  # N of N:M
    m: int = 0  # M of N:M

    def __post_init__(self):
        if self.kind not in STRUCTURES:
            raise ValueError(f"unknown structure {self.kind!r}; choose one of {list(STRUCTURES)}")
        if self.kind == "nm" and not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f"N:M needs 0 < N < M, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, structure: str | Structure = "unstructured", nm: str | tuple[int, int] | None = None) -> Structure:
        """From ``"unstructured" | "constant_fan_in" | "nm"`` and, for ``"nm"``, ``nm="2:4"`` or ``(2, 4)``."""
        if isinstance(structure, Structure):
            return structure
        if structure != "nm":
            return cls(structure)  # an unknown name is refused by __post_init__
        if nm is None:
            raise ValueError("structure='nm' needs nm='N:M' (e.g. '2:4')")
        if isinstance(nm, str):
            parts = nm.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"nm must look like 'N:M' (e.g. '2:4'), got {nm!r}")
            nm = (int(parts[0]), int(parts[1]))
        return cls("nm", int(nm[0]), int(nm[1]))

    @property
    def grouped(self) -> bool:
        return self.kind != "unstructured"

    @property
    def density(self) -> float | None:
        """The density the structure itself fixes (N / M), or None."""
        return self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, "m": self.m}

    @classmethod
    def from_dict(cls, data: dict | None) -> Structure:
        """Inverse of :meth:`to_dict`; ``None`` (files from before structures existed) is unstructured."""
        return cls(**data) if data else cls()

    # -- groups ----------------------------------------------------------------------
    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a layer whose shape the structure cannot tile."""
        fan = int(torch.Size(shape[1:]).numel())
        if self.kind == "nm" and fan % self.m:
            raise ValueError(
                f"layer {name!r} has {fan} inputs per neuron, not a multiple of M={self.m}, so it cannot be {self}; "
                "keep it dense (dense_first / exclude) or choose another M"
            )

    def groups(self, mask: torch.Tensor) -> torch.Tensor:
        """A view of ``mask`` (or any tensor of its shape) as ``(groups, group size)``."""
        if self.kind == "constant_fan_in":
            return mask.reshape(mask.shape[0], -1)
        if self.kind == "nm":
            return mask.reshape(-1, self.m)
        return mask.reshape(1, -1)

    def random_mask(self, shape: tuple[int, ...], n_active: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """A random mask of this structure with about ``n_active`` active weights.

        Constant fan-in: ``k = round(n_active / out)`` per neuron (at least 1); N:M: exactly N per group
        (``n_active`` is then fixed by the shape).
        """
        out, fan = shape[0], int(torch.Size(shape[1:]).numel())
        if self.kind == "constant_fan_in":
            rows, per_group = out, min(fan, max(1, round(n_active / out)))
        else:
            rows, per_group = out * fan // self.m, self.n
        width = fan if self.kind == "constant_fan_in" else self.m
        order = torch.rand(rows, width, generator=generator).argsort(dim=1)
        mask = torch.zeros(rows, width, dtype=torch.bool)
        mask.scatter_(1, order[:, :per_group], True)
        return mask.reshape(shape).to(device)

    def violations(self, mask: torch.Tensor) -> torch.Tensor:
        """Number of groups (a 0-d tensor, on the mask's device) whose active count breaks the structure."""
        counts = self.groups(mask).sum(1)
        if self.kind == "nm":
            return (counts != self.n).sum()
        if self.kind == "constant_fan_in":
            # Live neurons share one fan-in (the most common nonzero count names the odd ones out); a neuron with
            # no input at all is allowed: SRigL's neuron ablation removes whole neurons.
            live = counts[counts > 0]
            common = live.mode().values if live.numel() else counts.new_zeros(())
            return ((counts != common) & (counts > 0)).sum()
        return torch.zeros((), dtype=torch.long, device=mask.device)


def check_structure(structure: Structure, names: list[str], masks: list[torch.Tensor], when: str) -> None:
    """Raise naming the layers whose masks break ``structure`` (one host synchronisation for all layers)."""
    if not structure.grouped:
        return
    bad = torch.stack([structure.violations(m) for m in masks]).tolist()
    broken = [f"{n} ({b} groups)" for n, b in zip(names, bad) if b]
    if broken:
        raise RuntimeError(f"masks break the {structure} structure {when}: {', '.join(broken)}")
