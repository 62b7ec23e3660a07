"""Move the work that follows a direct sparse layer into the layer's epilogue (``torch.fx``).

In a folded ResNet every convolution is followed by a ReLU, or by a residual add and a ReLU. Run as
separate torch ops they read and write the whole activation once more each; the compiled kernel does
them in registers before its store. Three rewrites of the traced graph, each only where it keeps the
model's meaning:

* ``relu(layer(x))`` -> ``layer(x)`` with ``layer.relu = True``;
* ``layer(x) + other`` (then maybe a ReLU) -> ``layer(x, other)``, the residual added in the epilogue;
* a layer whose every user is a direct convolution of stride 1 and one padding ``p`` writes its
  output inside a zero border of ``p`` (``out_padding``), which those convolutions read in place,
  so the per-layer padding copy disappears;
* an ``nn.MaxPool2d`` that reads a direct layer's output runs on the compiled kernel
  (:class:`NativeMaxPool2d`): torch's NCHW max pooling is 8x slower here.

A layer called at more than one place, or a model ``torch.fx`` cannot trace (data-dependent control
flow), is left as it is; the report says why.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .kernels import NativeMaxPool2d, SparseConv2d, SparseLinear

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (SparseConv2d, SparseLinear)) or super().is_leaf_module(m, qualname)


def _runs_direct(module: nn.Module | None) -> bool:
    return isinstance(module, (SparseConv2d, SparseLinear)) and module.kernel == "direct"


def _direct(modules: dict[str, nn.Module], node: fx.Node) -> nn.Module | None:
    """The module ``node`` calls, if it runs the direct kernel."""
    module = modules.get(node.target) if node.op == "call_module" else None
    return module if _runs_direct(module) else None


def _is_relu(node: fx.Node, modules: dict[str, nn.Module], source: fx.Node) -> bool:
    if node.args[:1] != (source,) or len(node.args) > 1 and node.args[1] not in (False, True):
        return False
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return set(node.kwargs) <= {"inplace"}
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return not node.kwargs
    return node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU


def _residual(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand of ``source + other``, if ``node`` is that add."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS or
              node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is source else a if b is source else None
    return other if isinstance(other, fx.Node) and other is not source else None


def fuse_epilogues(net: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """``(net or its fused GraphModule, report)``: what was moved into which layer's epilogue."""
    if not any(_runs_direct(m) for m in net.modules()):
        return net, {"fused": {}, "note": "no layer runs the direct kernel"}
    try:
        graph = _Tracer().trace(net)
    except Exception as e:  # any tracing failure: the model runs unfused, as it is
        return net, {"fused": {}, "note": f"not fused: torch.fx cannot trace the model ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''})"}
    modules = dict(net.named_modules())
    for node in list(graph.nodes):  # folded BatchNorms are nn.Identity: out of the way of the patterns
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    fused: dict[str, list[str]] = {}
    for node in list(graph.nodes):
        module = _direct(modules, node)
        if module is None or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        done = fused.setdefault(node.target, [])
        users = list(node.users)
        other = _residual(users[0], node) if len(users) == 1 else None
        if other is not None:
            add = users[0]
            add.prepend(node)  # after `other` exists: the add was after both, and node's input is older still
            node.args = (node.args[0], other)
            add.replace_all_uses_with(node)
            graph.erase_node(add)
            done.append("residual")
            users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], modules, node):
            relu = users[0]
            relu.replace_all_uses_with(node)
            graph.erase_node(relu)
            module.relu = True
            done.append("relu")
    for node in graph.nodes:  # max pooling of the NCHW activations the direct kernel writes
        pool = modules.get(node.target) if node.op == "call_module" else None
        source = node.args[0] if node.args else None
        if (pool is not None and NativeMaxPool2d.supports(pool) and isinstance(source, fx.Node)
                and _direct(modules, source) is not None):
            net.set_submodule(node.target, NativeMaxPool2d(pool))
            modules[node.target] = net.get_submodule(node.target)
            fused.setdefault(node.target, []).append("native max pool")
    for node in graph.nodes:  # padded outputs, once the graph's uses are final
        module = _direct(modules, node)
        if not isinstance(module, SparseConv2d) or calls[node.target] != 1 or not node.users:
            continue
        readers = [_direct(modules, user) for user in node.users]
        if not all(isinstance(r, SparseConv2d) for r in readers):
            continue
        # readers of stride 1 read the padded buffer in place when their padding is its border; readers of
        # a larger stride split the input into phases anyway, and read the view as cheaply as a tensor
        unit = {r.padding for r, user in zip(readers, node.users) if user.args[0] is node and r.stride == (1, 1)}
        if len(unit) == 1 and next(iter(unit)) not in ("valid", (0, 0)):
            module.out_padding = next(iter(unit))
            fused.setdefault(node.target, []).append(f"out_padding={module.out_padding[0]}")
    graph.lint()
    gm = fx.GraphModule(net, graph, class_name=type(net).__name__)
    return gm, {"fused": {k: v for k, v in fused.items() if v}}
