"""Prune-and-grow selection for one layer (pure functions).

Selection uses ``torch.topk`` (linear time) with an exact, deterministic
tie-break: entries strictly beyond the k-th value are taken, and among the
entries equal to it the lowest flat indices win (for growth and for keeping),
so every rank of a distributed run selects the same connections from the same
scores. The result equals a stable descending sort's first ``k``.
"""

from __future__ import annotations

import torch


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of a 1-D tensor; ties go to the lower index."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    chosen = scores >= threshold
    extra = int(chosen.sum()) - k
    if extra:  # more entries equal the threshold than places left: the lowest indices stay
        ties = torch.nonzero(scores == threshold).reshape(-1)  # ascending
        chosen[ties[ties.numel() - extra :]] = False
    return chosen


def select_bottom(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` smallest entries; ties go to the *higher* index
    (so that what remains is the stable-sort top of the rest).

    The k largest of the negated, reversed scores, with their lower-index tie-break, mapped back.
    """
    return select_top(-scores.flip(0), k).flip(0)


def prune(mask: torch.Tensor, prune_score: torch.Tensor, n_drop: int, n_active: int | None = None) -> tuple[torch.Tensor, int]:
    """``(kept, n_dropped)``: ``mask`` without its ``n_drop`` active entries of smallest ``prune_score``.

    The score is ranked as it is, signed: magnitude pruning passes ``weight.abs()``
    (:mod:`sparseopt.topology.scores`), and a custom score of ``-|w|`` drops the largest weights.
    """
    flat = mask.reshape(-1)
    if n_active is None:
        n_active = int(flat.sum())
    n_drop = max(0, min(int(n_drop), n_active))
    # Rank only the active entries (a few % of the layer at high sparsity): a much smaller topk.
    active = torch.nonzero(flat).reshape(-1)  # ascending, so index tie-breaks carry over
    dropped = active[select_bottom(prune_score.reshape(-1)[active], n_drop)]
    kept = flat.clone()
    kept[dropped] = False
    return kept.reshape(mask.shape), n_drop


def prune_and_grow(
    mask: torch.Tensor,
    prune_score: torch.Tensor,
    grow_score: torch.Tensor,
    n_drop: int,
    n_active: int | None = None,
    n_grow: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(kept, new)`` masks. ``new``: drop the ``n_drop`` active entries
    with the smallest ``prune_score`` (``weight.abs()``: magnitude pruning),
    then grow ``n_grow`` (default ``n_drop``) entries with the largest ``grow_score``
    among all entries not kept (a just-dropped entry may be regrown). ``kept`` is
    the mask after pruning, before growing. With ``n_grow = n_drop`` the number of
    active entries is unchanged (``n_active`` may be passed to save a count).
    """
    kept, n_drop = prune(mask, prune_score, n_drop, n_active)
    n_grow = n_drop if n_grow is None else max(0, int(n_grow))
    kept = kept.reshape(-1)
    # Growth ranks only the entries not kept, so the active count is exact whatever the scores hold;
    # non-finite scores (e.g. an fp16 gradient overflow) rank last.
    candidates = torch.nonzero(~kept).reshape(-1)  # ascending, so index tie-breaks carry over
    scores = _finite(grow_score.reshape(-1)[candidates])
    new = kept.clone()
    new[candidates[select_top(scores, n_grow)]] = True
    return kept.reshape(mask.shape), new.reshape(mask.shape)


def _finite(score: torch.Tensor) -> torch.Tensor:
    """``score`` as float32 with non-finite entries (an fp16 gradient overflow) below every finite one."""
    return score.to(torch.float32).nan_to_num(nan=-3e38, posinf=-3e38, neginf=-3e38)


def _row_ranks(key: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """Each entry's place in its row ordered by ``key``, largest first (0 = best); ``first``: a bool
    tensor whose True entries come before all others in their row. Ties go to the lower index."""
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    if first is not None:  # a second stable sort on the flag keeps the key's order within each side
        order = order.gather(1, torch.sort(first.gather(1, order).to(torch.int8), dim=1, descending=True,
                                           stable=True).indices)
    return torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))


def prune_and_grow_grouped(
    mask: torch.Tensor,
    prune_score: torch.Tensor,
    grow_score: torch.Tensor,
    n_drop: int,
    groups,
    n_active: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prune_and_grow` that keeps every group's active count (structured sparsity).

    ``groups(t)`` views a tensor of the mask's shape as ``(groups, group size)``
    (:meth:`sparseopt.masks.structure.Structure.groups`: rows for constant fan-in,
    blocks of M inputs for N:M). The ``n_drop`` active entries of smallest
    ``prune_score`` (signed; the built-in scores are magnitudes) anywhere in the layer are dropped, as in the unstructured
    update (SRigL's layer-wise magnitude pruning); then each group regrows as many
    as it lost, by largest ``grow_score`` among its entries not kept. Ties go to
    the lower index (a stable sort), so every rank selects the same entries.
    """
    kept, _ = prune(mask, prune_score, n_drop, n_active)
    lost = groups(mask & ~kept).sum(1, keepdim=True)  # (G, 1): how many each group regrows
    g_kept = groups(kept)
    # Entries not kept rank above every kept one; among them, non-finite scores (fp16 overflow) rank last.
    score = _finite(groups(grow_score))
    rank = _row_ranks(torch.where(g_kept, torch.full_like(score, float("-inf")), score))
    new = g_kept | (rank < lost)
    return kept, new.reshape(mask.shape)


def prune_and_grow_ablating(
    mask: torch.Tensor,
    prune_score: torch.Tensor,
    grow_score: torch.Tensor,
    n_drop: int,
    gamma: float,
    n_active: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant fan-in prune-and-grow with SRigL's neuron ablation (Lasby et al., ICLR 2024).

    The layer prunes as unstructured RigL would, and an unstructured growth step marks
    the connections RigL would want: a neuron whose *salient* connections (kept plus
    wanted) number fewer than ``gamma * k`` (``k`` the layer's fan-in) is ablated: all
    its inputs are removed. The layer's active count is then shared out again over the
    live neurons, ``k' = round(active / live)``, and each live neuron keeps its largest
    surviving weights and grows by ``grow_score`` up to ``k'``. Every live neuron has the
    same fan-in afterwards; an ablated neuron has none, and may come back at a later
    update when its connections become salient again.
    """
    rows = mask.reshape(mask.shape[0], -1)
    total = int(rows.sum()) if n_active is None else n_active
    kept, wanted = prune_and_grow(mask, prune_score, grow_score, n_drop, total)
    counts = rows.sum(1)
    k = int(counts.max())
    salient = wanted.reshape(rows.shape).sum(1)
    live = salient >= gamma * k
    # Enough neurons stay live to hold the layer's count (fan-in at most the dense fan-in), never none: the most salient.
    needed = max(1, -(-total // rows.shape[1]))
    if int(live.sum()) < needed:
        live[torch.sort(salient, descending=True, stable=True).indices[:needed]] = True
    new_k = min(rows.shape[1], max(1, round(total / int(live.sum()))))
    kept_rows = kept.reshape(rows.shape)
    # Per row: kept weights first (largest score first), then free positions by largest grow score.
    key = torch.where(kept_rows, prune_score.reshape(rows.shape).to(torch.float32),
                      _finite(grow_score.reshape(rows.shape)))
    new = (_row_ranks(key, first=kept_rows) < new_k) & live.reshape(-1, 1)
    return kept, new.reshape(mask.shape)
