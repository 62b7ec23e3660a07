"""``sparse_inference``: a masked model that computes only with its active weights, on the CPU.

What it does to a copy of the model (the original is left as it is):

1. eval mode; every BatchNorm whose input is the output of a Conv2d/Linear is folded
   into that layer (``W'_i = W_i * gamma_i / sqrt(var_i + eps)``, a per-row scale, so
   the sparsity pattern is kept) and replaced by ``nn.Identity``;
2. each masked Conv2d/Linear becomes a :class:`SparseConv2d` / :class:`SparseLinear`
   that runs one of the kernels of :mod:`sparseopt.deploy.kernels`, chosen per layer by
   timing them all, the dense one included, on that layer's input from
   ``example_input`` (``choose="time"``), so that no layer is slower than dense at that
   batch size; or forced (``choose="csr"`` etc., for tests and benchmarks);
3. the whole converted model is timed in the contiguous and channels-last layouts,
   against the all-dense folded model in both, and the fastest is kept;
4. the outputs of the copy and the original on ``example_input`` are compared; a
   difference beyond float rounding is an error (a BatchNorm folded although the layer's
   output is used elsewhere, say), never a silently different model.

The result carries ``model.sparse_report``: per layer the kernel chosen and the timings,
and the measured ``max_abs_diff``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..masks.maskset import MaskSet
from .kernels import KERNELS, SparseConv2d, SparseLinear, time_alternating

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
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: outputs.__setitem__(id(out), (name, out))))
        elif isinstance(module, FOLDABLE_NORMS):
            def check(m, args):
                hit = outputs.get(id(args[0])) if args else None
                if hit is not None and hit[1] is args[0]:
                    pairs.setdefault(names[id(m)], hit[0])
            handles.append(module.register_forward_pre_hook(check))
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
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


def _convert(model: nn.Module, masks: MaskSet, names: list[str], kernels: dict[str, str]) -> nn.Module:
    """A copy of the folded ``model`` with each named layer replaced by its sparse module running ``kernels[name]``.

    A layer whose kernel is ``dense`` stays the folded ``nn.Conv2d`` / ``nn.Linear`` itself: no wrapper's call overhead.
    """
    model = copy.deepcopy(model)
    for name in (n for n in names if kernels[n] != "dense"):
        module = model.get_submodule(name)
        wrapper = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
        parent, attr = _parent(model, name)
        setattr(parent, attr, wrapper(module, module.weight_mask, kernels[name]))
    return model


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
    original = model
    model = copy.deepcopy(model).eval()
    example_input = example_input.detach()
    was_training = original.training
    with torch.inference_mode():
        reference = original.eval()(example_input) if check else None
    original.train(was_training)
    folded = fold_batchnorm(model, example_input)
    names = [layer.name for layer in masks
             if layer.param == "weight" and type(layer.module) in (nn.Conv2d, nn.Linear)
             and getattr(layer.module, "groups", 1) == 1 and getattr(layer.module, "padding_mode", "zeros") == "zeros"]
    inputs = _capture_inputs(model, names, example_input)
    report: dict[str, Any] = {"folded": folded, "layers": {}, "kept_dense": [
        layer.name for layer in masks if layer.name not in names]}
    kernels: dict[str, str] = {}
    for name in names:
        module = model.get_submodule(name)
        if name not in inputs:  # a layer the forward pass never reached
            report["kept_dense"].append(name)
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
    names = list(kernels)
    layouts = (False, True) if choose == "time" and example_input.dim() == 4 else (False,)
    options = [("sparse", cl) for cl in layouts] + ([("dense", cl) for cl in layouts] if choose == "time" else [])
    built = {(kind, cl): SparseModel(_convert(model, masks, names, kernels if kind == "sparse" else
                                               dict.fromkeys(names, "dense")), cl) for kind, cl in options}
    if len(built) > 1:
        with torch.inference_mode():
            seconds = time_alternating({key: (lambda m=m: m(example_input)) for key, m in built.items()}, 2 * repeats + 1,
                                       min_seconds=0.25)
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
