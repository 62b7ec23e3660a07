"""Base class for optimizers that wrap another ``torch.optim.Optimizer``.

The wrapper *is* a ``torch.optim.Optimizer`` (so LR schedulers, GradScaler and
hooks accept it) but owns no parameters: ``param_groups`` and ``state`` are the
base optimizer's own objects. A scheduler that edits ``group["lr"]`` edits the
base optimizer's learning rate, and GradScaler unscales the gradients the base
optimizer will read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer


class OptimizerWrapper(Optimizer):
    """An optimizer around ``base``; subclasses implement :meth:`step` and their own state."""

    def __init__(self, base: Optimizer):
        if not isinstance(base, Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        self.base = base
        # Not calling Optimizer.__init__: it would copy the param groups into new
        # dicts, and a scheduler would then change a learning rate nobody reads.
        # Optimizer.__setstate__ is what unpickling calls: it creates whatever hook registries the
        # installed torch has and makes step() run the step hooks, without naming torch's private
        # attributes (tests/test_sparseopt.py checks every kind of hook on the wrapper).
        Optimizer.__setstate__(self, {})

    # The base optimizer's objects, not copies.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.base.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, value) -> None:
        self.base.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.base.defaults = value

    def innermost(self) -> Optimizer:
        """The torch optimizer at the bottom of a chain of wrappers."""
        opt = self.base
        while isinstance(opt, OptimizerWrapper):
            opt = opt.base
        return opt

    @staticmethod
    def _evaluate(closure):
        """torch.optim's closure convention: re-evaluate the loss with gradients enabled."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    # -- checkpoints: {"base": base.state_dict(), "wrapper": own state} ------------
    def wrapper_state(self) -> dict[str, Any]:
        return {}

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        # torch.optim's hook contract: pre hooks see the optimizer, post hooks may replace the dict.
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {"base": self.base.state_dict(), "wrapper": {"type": type(self).__name__, **self.wrapper_state()}}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -- copy and pickle like a torch optimizer (torch.optim.Optimizer keeps only defaults, state, groups) --------
    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        Optimizer.__setstate__(self, state)

    def _load(self, state_dict: dict[str, Any]) -> None:
        if "base" not in state_dict or "wrapper" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict expects {{'base': ..., 'wrapper': ...}} "
                f"as written by its state_dict(), got keys {sorted(state_dict)}"
            )
        kind = state_dict["wrapper"].get("type")
        if kind != type(self).__name__:
            raise ValueError(f"state dict was written by {kind}, cannot load it into {type(self).__name__}")
        self.base.load_state_dict(state_dict["base"])
        self.load_wrapper_state(state_dict["wrapper"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"


def grads_of(params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(params, grads) of the params that have a gradient."""
    ps = [p for p in params if p.grad is not None]
    return ps, [p.grad for p in ps]


def use_foreach(tensors: list[torch.Tensor], foreach: bool | None) -> bool:
    """torch.optim's rule: ``foreach=None`` uses the multi-tensor kernels when every tensor is on a CUDA device."""
    if foreach is not None:
        return foreach
    return bool(tensors) and all(t.device.type == "cuda" for t in tensors)


def foreach_mul_(tensors: list[torch.Tensor], factors: list[torch.Tensor], foreach: bool | None = None) -> None:
    """``t *= f`` for each pair; one multi-tensor kernel or one kernel per tensor (``use_foreach``)."""
    if use_foreach(tensors, foreach):
        torch._foreach_mul_(tensors, factors)
    else:
        for t, f in zip(tensors, factors):
            t.mul_(f)


def foreach_add_(tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float, foreach: bool | None = None) -> None:
    """``t += alpha * o`` for each pair, as :func:`foreach_mul_` decides the kernels."""
    if use_foreach(tensors, foreach):
        torch._foreach_add_(tensors, others, alpha=alpha)
    else:
        for t, o in zip(tensors, others):
            t.add_(o, alpha=alpha)
