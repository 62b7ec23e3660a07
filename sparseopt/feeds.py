"""Which normalization layer each layer feeds: found by watching forward passes, for any model, without tracing.

A layer *feeds* a normalization when the very tensor it returns is that normalization's
input (``conv -> bn``; not ``conv -> relu -> bn``, nor a sum of two branches). SparseOpt
asks this to know which gradients BatchNorm skews; deployment asks it to fold a BatchNorm
into the convolution before it. One watcher answers both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Feed:
    """One layer's output going straight into one normalization."""

    layer: str
    norm: str
    module: nn.Module
    shape: torch.Size  # the layer's output shape on that pass


class FeedWatcher:
    """Hooks that record every (layer, normalization) feed of the forward passes until :meth:`close`.

    ``layers``: name -> module of the layers to watch; ``norm_types``: the normalization types that count.
    :attr:`feeds` lists the feeds in the order they happened; :meth:`first_norms` gives each layer's first.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], norm_types: tuple[type[nn.Module], ...]):
        self.feeds: list[Feed] = []
        self._outputs: dict[int, tuple[str, torch.Tensor]] = {}
        self._handles = []
        for name, module in layers.items():
            self._handles.append(module.register_forward_hook(self._record(name)))
        for name, module in model.named_modules():
            if isinstance(module, norm_types):
                self._handles.append(module.register_forward_pre_hook(self._check(name)))

    @property
    def seen(self) -> bool:
        """Whether a watched layer has run since the watcher started."""
        return bool(self._outputs) or bool(self.feeds)

    def _record(self, name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self._outputs[id(output)] = (name, output)
        return hook

    def _check(self, norm_name: str):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                hit = self._outputs.get(id(args[0]))
                if hit is not None and hit[1] is args[0]:  # the same tensor, not a reused id
                    self.feeds.append(Feed(hit[0], norm_name, module, args[0].shape))
        return hook

    def first_norms(self) -> dict[str, Feed]:
        """layer name -> the first normalization it fed."""
        found: dict[str, Feed] = {}
        for feed in self.feeds:
            found.setdefault(feed.layer, feed)
        return found

    def close(self) -> None:
        """Remove the hooks and drop the recorded outputs (the feeds stay)."""
        self._outputs.clear()
        for handle in self._handles:
            handle.remove()
        self._handles = []
