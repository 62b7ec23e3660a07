"""Per-neuron statistics of a sparse model (pure functions of masks, weights and scales).

They answer the questions of the SparseOpt-vs-baseline study: do neurons die
(``n_i = 0``), does the fan-in become unequal (rich get richer), how far apart
are the preconditioner's ``c_i``, and how does a neuron's weight norm follow its
fan-in. At initialisation (i.i.d. weights, then masked) ``||w_i|| ~ sqrt(n_i)``,
a log-log slope of 0.5; BatchNorm's scale invariance lets training move it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..masks.maskset import MaskSet
from ..masks.neurons import fan_in

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def norm_fan_in_slope(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """Pooled log-log slope of a per-neuron scale (weight norm, BN's sigma) against fan-in.

    ``pairs``: per layer ``(n, norm)`` over its neurons. Each layer is centred on
    its own means of ``log n`` and ``log norm`` (layers differ in scale), then one
    least-squares slope is fitted through all live neurons (``n > 0``, ``norm > 0``).
    ``None`` when fan-in does not vary.
    """
    xs, ys = [], []
    for n, norm in pairs:
        live = (n > 0) & (norm > 0)
        if int(live.sum()) < 2:
            continue
        x, y = n[live].double().log(), norm[live].double().log()
        xs.append(x - x.mean())
        ys.append(y - y.mean())
    if not xs:
        return None
    x, y = torch.cat(xs), torch.cat(ys)
    sxx = float((x * x).sum())
    return float((x * y).sum()) / sxx if sxx > 0 else None


@torch.no_grad()
def neuron_stats(
    masks: MaskSet, scales: list[torch.Tensor] | None = None, norms: Mapping[str, nn.Module] | None = None,
) -> dict[str, float]:
    """Flat dict of neuron statistics over all masked layers.

    Keys:
        ``neurons/dead``, ``neurons/dead_frac``: neurons with no active weight;
        ``neurons/dead/<layer>``: the same per layer;
        ``fan_in/min``: smallest ``n_i`` of a live neuron;
        ``fan_in/cv``: mean over layers of ``std(n) / mean(n)`` (fan-in inequality);
        ``fan_in/q05`` ... ``fan_in/q95``: quantiles of the relative fan-in ``n_i / n_avg``
        pooled over layers;
        ``scale/min``, ``scale/max``, ``scale/std``: range of the applied ``c_i`` over live neurons
        (all 1 for the plain baseline);
        ``weight_norm/fan_in_slope``: see :func:`norm_fan_in_slope`;
        ``bn_sigma/fan_in_slope`` (with ``norms``, masked layer name -> the BatchNorm it feeds): the same
        slope for BN's ``sigma_i = sqrt(running_var_i)``. SparseOpt's ``c_i = sqrt(n_i / n_avg)`` assumes
        ``sigma_i ~ sqrt(n_i)``, a slope of 0.5 (true at initialisation); the measured slope says how far
        training has moved BatchNorm's real amplification ``1 / sigma_i`` away from that assumption.
    """
    out: dict[str, float] = {}
    dead_total, neurons_total = 0, 0
    cvs, relative, pairs, live_min = [], [], [], None
    scale_values = []
    for index, layer in enumerate(masks):
        n = fan_in(layer.mask).to(torch.float32).cpu()
        norm = (layer.weight.detach().float() * layer.mask).reshape(n.shape[0], -1).norm(dim=1).cpu()
        dead = int((n == 0).sum())
        out[f"neurons/dead/{layer.name}"] = dead
        dead_total += dead
        neurons_total += n.numel()
        mean = float(n.mean())
        if mean > 0:
            cvs.append(float(n.std(unbiased=False)) / mean)
            relative.append(n / mean)
        live = n > 0
        if live.any():
            smallest = float(n[live].min())
            live_min = smallest if live_min is None else min(live_min, smallest)
            if scales is not None:
                scale_values.append(scales[index].detach().float().cpu()[live])
        pairs.append((n, norm))
    out["neurons/dead"] = dead_total
    out["neurons/dead_frac"] = dead_total / neurons_total
    out["fan_in/min"] = live_min if live_min is not None else 0.0
    out["fan_in/cv"] = sum(cvs) / len(cvs) if cvs else 0.0
    if relative:
        q = torch.quantile(torch.cat(relative), torch.tensor(QUANTILES))
        for level, value in zip(QUANTILES, q.tolist()):
            out[f"fan_in/q{round(100 * level):02d}"] = value
    if scale_values:
        c = torch.cat(scale_values)
        out["scale/min"], out["scale/max"], out["scale/std"] = float(c.min()), float(c.max()), float(c.std(unbiased=False))
    slope = norm_fan_in_slope(pairs)
    if slope is not None:
        out["weight_norm/fan_in_slope"] = slope
    if norms:
        sigma_pairs = []
        for layer, (n, _) in zip(masks, pairs):
            var = getattr(norms.get(layer.name), "running_var", None)
            if var is not None and var.shape[0] == n.shape[0]:
                sigma_pairs.append((n, var.detach().float().clamp_min(0).sqrt().cpu()))
        sigma_slope = norm_fan_in_slope(sigma_pairs)
        if sigma_slope is not None:
            out["bn_sigma/fan_in_slope"] = sigma_slope
    return out
