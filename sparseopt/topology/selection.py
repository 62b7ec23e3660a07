"""Prune-and-grow selection for one layer (pure functions).

Ties are broken deterministically by position (a stable sort keeps the lower
flat index first), so every rank of a distributed run selects the same
connections from the same scores.
"""

from __future__ import annotations

import torch


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` largest scores; ties go to the lower index."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def prune_and_grow(
    mask: torch.Tensor,
    drop_score: torch.Tensor,
    grow_score: torch.Tensor,
    n_drop: int,
    n_active: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(kept, new)`` masks. ``new``: keep the ``n_active - n_drop`` active entries with the largest
    ``drop_score`` (weight magnitude), then grow ``n_drop`` entries with the
    largest ``grow_score`` among all entries not kept (a just-dropped entry may
    be regrown). ``kept`` is the mask after pruning, before growing. The number
    of active entries is unchanged (``n_active`` may be passed to save a count).
    """
    flat = mask.reshape(-1)
    if n_active is None:
        n_active = int(flat.sum())
    n_drop = max(0, min(int(n_drop), n_active))
    neg_inf = float("-inf")
    keep_scores = torch.where(flat, drop_score.reshape(-1).float(), neg_inf)
    kept = torch.zeros_like(flat)
    kept[_top_k(keep_scores, n_active - n_drop)] = True
    grow_scores = torch.where(kept, neg_inf, grow_score.reshape(-1).float().nan_to_num(nan=0.0, posinf=3e38))
    new = kept.clone()
    new[_top_k(grow_scores, n_drop)] = True
    return kept.reshape(mask.shape), new.reshape(mask.shape)
