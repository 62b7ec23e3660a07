"""Dense against sparse inference of one model, side by side in one process (``sparseopt bench-infer``).

The dense side is the strongest fair one: eval mode, BatchNorm folded, ``torch.inference_mode``,
and the faster of the contiguous and channels-last layouts. Both sides are timed in alternating
rounds, so a change of machine load hits both alike; the numbers are medians.
"""

from __future__ import annotations

import copy
import os
import platform
from typing import Any

import torch
from torch import nn

from ..masks.maskset import MaskSet
from ..timing import time_alternating
from .inference import fold_batchnorm, sparse_inference


def _layouts(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    out = {"contiguous": (model, x.contiguous())}
    if x.dim() == 4:
        out["channels_last"] = (copy.deepcopy(model).to(memory_format=torch.channels_last),
                                x.contiguous(memory_format=torch.channels_last))
    return out


def bench_inference(
    model: nn.Module,
    masks: MaskSet,
    example_input: torch.Tensor,
    *,
    threads: int | None = None,
    rounds: int = 15,
    repeats: int = 5,
    choose: str = "time",
    warmup_seconds: float = 1.0,
) -> dict[str, Any]:
    """``dense_ms``, ``sparse_ms``, ``speedup``, ``max_abs_diff`` and the per-layer kernel choices."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            dense = copy.deepcopy(model).eval()
            fold_batchnorm(dense, example_input)
            layouts = _layouts(dense, example_input)
            sparse = sparse_inference(model, masks, example_input, choose=choose, repeats=repeats)
            calls = {name: (lambda m=m, x=x: m(x)) for name, (m, x) in layouts.items()}
            calls["sparse"] = lambda: sparse(example_input)
            seconds = time_alternating(calls, rounds, min_seconds=0.5, warmup_seconds=warmup_seconds)
            dense_layout = min(layouts, key=seconds.get)
            reference = layouts[dense_layout][0](layouts[dense_layout][1])
            diff = float((sparse(example_input) - reference).abs().max())
        report = sparse.sparse_report
        kernels = [layer["kernel"] for layer in report["layers"].values()]
        dense_ms, sparse_ms = seconds[dense_layout] * 1e3, seconds["sparse"] * 1e3
        return {
            "dense_ms": dense_ms,
            "dense_layout": dense_layout,
            "dense_ms_by_layout": {n: seconds[n] * 1e3 for n in layouts},
            "sparse_layout": report["layout"],
            "whole_model_ms": report.get("whole_model_ms"),
            "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms,
            "max_abs_diff": diff,
            "batch_size": int(example_input.shape[0]),
            "input_shape": list(example_input.shape[1:]),
            "threads": torch.get_num_threads(),
            "rounds": rounds,
            "kernel_counts": {k: kernels.count(k) for k in sorted(set(kernels))},
            "layers": report["layers"],
            "kept_dense": report["kept_dense"],
            "kept_dense_reasons": report["kept_dense_reasons"],
            "fusion": report.get("fusion"),
            "weight_memory": report.get("weight_memory"),
            "backend": report["backend"],
            "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "torch": str(torch.__version__), "mkl": torch.backends.mkl.is_available()},
        }
    finally:
        torch.set_num_threads(previous_threads)
