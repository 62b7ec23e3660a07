"""``sparse_inference``: a masked model that computes only with its active weights, on the CPU.

What it does to a copy of the model (the original is left as it is):

1. eval mode; every BatchNorm whose input is the output of a Conv2d/Linear is folded
   into that layer (``W'_i = W_i * gamma_i / sqrt(var_i + eps)``, a per-row scale, so
   the sparsity pattern is kept) and replaced by ``nn.Identity``;
2. each masked Conv2d/Linear becomes a :class:`SparseConv2d` / :class:`SparseLinear`
   that runs one of the kernels of :mod:`sparseopt.deploy.kernels`, chosen per layer by
   timing them all, the dense one included, on that layer's input from
   ``example_input`` (``choose="time"``), so that no layer is slower than dense at that
   batch size; or forced (``choose="csr"`` etc., for tests and benchmarks); a layer no
   sparse kernel takes stays dense, with the reason in the report;
3. the ReLUs, residual adds and paddings that follow layers on the compiled ``direct`` kernel
   move into their epilogues (:mod:`sparseopt.deploy.fusion`);
4. the whole converted model is timed in the contiguous and channels-last layouts,
   against the all-dense folded model in both, and the fastest is kept;
5. the outputs of the copy and the original on ``example_input`` are compared; a
   difference beyond float rounding is an error (a BatchNorm folded although the layer's
   output is used elsewhere, say), never a silently different model.

The result carries ``model.sparse_report``: per layer the kernel chosen and the timings, the
layers kept dense and why, the fused epilogues, the weight memory, the compiled backend, and the
measured ``max_abs_diff``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..feeds import FeedWatcher
from ..masks.maskset import MaskSet
from ..native import build as native_build
from ..timing import time_alternating
from .fusion import fuse_epilogues
from .kernels import KERNELS, SparseConv2d, SparseLinear, unsupported

FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d/Linear into it, in place.

    The pairs are found on one forward pass of ``example_input`` (the layer's output tensor
    is the BatchNorm's input). Returns the folded ``(layer, norm)`` names.
    """
    model.eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    watcher = FeedWatcher(model, layers, FOLDABLE_NORMS)  # the same rule SparseOpt uses to find its layers
    try:
        model(example_input)
    finally:
        watcher.close()
    pairs: dict[str, str] = {}
    for feed in watcher.feeds:  # per norm, the first layer that fed it
        pairs.setdefault(feed.norm, feed.layer)
    used = {}
    for norm_name, layer_name in pairs.items():
        if layer_name in used:  # one layer feeding two norms: fold neither a second time
            continue
        norm, layer = model.get_submodule(norm_name), model.get_submodule(layer_name)
        out_features = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        if norm.running_var is None or norm.num_features != out_features:
            continue
        scale = (norm.weight if norm.affine else torch.ones_like(norm.running_var)) / torch.sqrt(norm.running_var + norm.eps)
        shift = (norm.bias if norm.affine else torch.zeros_like(norm.running_mean)) - norm.running_mean * scale
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
        layer.weight.mul_(scale.reshape(shape).to(layer.weight))
        new_bias = (bias * scale + shift).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias, requires_grad=False)
        else:
            layer.bias.copy_(new_bias)
        parent, attr = _parent(model, norm_name)
        setattr(parent, attr, nn.Identity())
        used[layer_name] = norm_name
    return list(used.items())


def _capture_inputs(model: nn.Module, names: list[str], example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: inputs.setdefault(name, args[0].detach())))
    try:
        with torch.inference_mode():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return inputs


class SparseModel(nn.Module):
    """The converted network, run in the memory layout that measured fastest (inputs converted on entry)."""

    def __init__(self, net: nn.Module, channels_last: bool):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def _convert(model: nn.Module, masks: MaskSet, names: list[str], kernels: dict[str, str]) -> tuple[nn.Module, dict]:
    """``(copy, fusion report)``: the folded ``model`` with each named layer replaced by its sparse module
    running ``kernels[name]``, and the epilogues of the direct ones fused.

    A layer whose kernel is ``dense`` stays the folded ``nn.Conv2d`` / ``nn.Linear`` itself: no wrapper's call overhead.
    """
    model = copy.deepcopy(model)
    for name in (n for n in names if kernels[n] != "dense"):
        module = model.get_submodule(name)
        wrapper = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
        parent, attr = _parent(model, name)
        setattr(parent, attr, wrapper(module, module.weight_mask, kernels[name]))
    return fuse_epilogues(model)


def _weight_memory(model: nn.Module, masks: MaskSet) -> dict[str, Any]:
    """Bytes of the masked layers' weights as the model holds them, against their dense fp32 size."""
    dense = sum(layer.module.weight.numel() * 4 for layer in masks if layer.param == "weight")
    held = 0
    sparse = {n.removeprefix("net."): m for n, m in model.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))}
    for layer in masks:
        if layer.param != "weight":
            continue
        module = sparse.get(layer.name)
        held += module.weight_bytes if module is not None else layer.module.weight.numel() * 4
    return {"dense_bytes": dense, "bytes": held, "ratio": held / dense if dense else 1.0}


def sparse_inference(
    model: nn.Module,
    masks: MaskSet,
    example_input: torch.Tensor,
    *,
    choose: str = "time",
    repeats: int = 5,
    check: bool = True,
) -> nn.Module:
    """An eval-mode copy of ``model`` whose masked Conv2d/Linear layers compute only with active weights.

    ``example_input``: a batch the model takes, of the size it will serve (the kernels are timed on it).
    ``choose``: ``"time"`` (default) or one kernel name for every layer that supports it. With ``"time"``,
    each layer takes the fastest of the dense, CSR and (constant fan-in layers) condensed kernels on its
    own input; then the whole converted model is timed in the contiguous and channels-last layouts against
    the all-dense folded model in both, and the fastest of the four is returned (so the result is never
    slower than the best dense model at this batch size; ``sparse_report["layout"]`` says which won).
    """
    if choose != "time" and choose not in KERNELS:
        raise ValueError(f"unknown choose={choose!r}; choose 'time' or one of {list(KERNELS)}")
    if masks.model is not model:
        raise ValueError("masks belong to another model")
    dtypes = sorted({str(layer.module.weight.dtype).removeprefix("torch.") for layer in masks} - {"float32"})
    if dtypes:
        raise ValueError(f"sparse_inference takes float32 models; this one has {', '.join(dtypes)} weights: convert "
                         f"it with model.float() first (the sparse kernels compute in float32), or keep it dense")
    original = model
    model = copy.deepcopy(model).eval()
    example_input = example_input.detach()
    was_training = original.training
    with torch.inference_mode():
        reference = original.eval()(example_input) if check else None
    original.train(was_training)
    folded = fold_batchnorm(model, example_input)
    reasons: dict[str, str] = {}
    for layer in masks:
        module = model.get_submodule(layer.name)
        if layer.param != "weight" or type(module) not in (nn.Conv2d, nn.Linear):
            reasons[layer.name] = f"{type(module).__name__}.{layer.param}: no sparse kernel for this layer type"
        elif (why := unsupported(module)) is not None:
            reasons[layer.name] = why
    names = [layer.name for layer in masks if layer.name not in reasons]
    inputs = _capture_inputs(model, names, example_input)
    kernels: dict[str, str] = {}
    report: dict[str, Any] = {"folded": folded, "layers": {}, "backend": native_build.backend().as_dict()}
    for name in names:
        module = model.get_submodule(name)
        if name not in inputs:
            reasons[name] = "the forward pass of example_input never reached it"
            continue
        mask = module.weight_mask
        wrapper = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
        candidates = wrapper.candidates(module, mask)
        if choose != "time":
            candidates = [k for k in candidates if k == choose] or ["dense"]
        timings = {}
        if len(candidates) > 1:
            layers = {kernel: wrapper(module, mask, kernel) for kernel in candidates}
            with torch.inference_mode():
                timings = time_alternating({k: (lambda layer=layer, x=inputs[name]: layer(x)) for k, layer in layers.items()},
                                           repeats)
        kernels[name] = min(timings, key=timings.get) if timings else candidates[0]
        report["layers"][name] = {"kernel": kernels[name], "ms": {k: round(v * 1e3, 4) for k, v in timings.items()},
                                  "density": float(mask.float().mean())}
    report["kept_dense"] = list(reasons)
    report["kept_dense_reasons"] = reasons
    names = list(kernels)
    layouts = (False, True) if choose == "time" and example_input.dim() == 4 else (False,)
    options = [("sparse", cl) for cl in layouts] + ([("dense", cl) for cl in layouts] if choose == "time" else [])
    built, fusion = {}, {}
    for kind, cl in options:
        net, fusion[kind] = _convert(model, masks, names, kernels if kind == "sparse" else dict.fromkeys(names, "dense"))
        built[(kind, cl)] = SparseModel(net, cl)
    if len(built) > 1:
        with torch.inference_mode():
            seconds = time_alternating({key: (lambda m=m: m(example_input)) for key, m in built.items()}, 2 * repeats + 1,
                                       min_seconds=0.25, warmup_seconds=0.25)
        report["whole_model_ms"] = {f"{k}{'_channels_last' if cl else ''}": round(t * 1e3, 4)
                                    for (k, cl), t in seconds.items()}
    else:
        seconds = {options[0]: 0.0}
    kind, channels_last = min(seconds, key=seconds.get)
    result = built[(kind, channels_last)]
    if kind == "dense":  # the per-layer wins did not add up against the best dense model: run dense
        for layer in report["layers"].values():
            layer["kernel"] = "dense"
    report["layout"] = "channels_last" if channels_last else "contiguous"
    report["fusion"] = fusion[kind]
    report["weight_memory"] = _weight_memory(result, masks)
    if check:
        with torch.inference_mode():
            out = result(example_input)
        diff = float((out - reference).abs().max())
        report["max_abs_diff"] = diff
        if not diff <= 1e-4 * max(1.0, float(reference.abs().max())):
            raise RuntimeError(
                f"sparse_inference changed the model's output by up to {diff:.3g} on example_input; a BatchNorm was "
                f"folded into a layer whose output is also used elsewhere, or a layer computes outside its module. "
                f"Folded: {folded}"
            )
    result.sparse_report = report
    return result
