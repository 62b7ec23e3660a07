"""CPU kernels for a masked layer at inference, and the modules that run them.

* ``dense``: the folded dense weight through ``F.conv2d`` / ``F.linear`` (oneDNN/MKL):
  the reference every other kernel must beat to be chosen;
* ``csr``: the weight as ``torch.sparse_csr`` (MKL's sparse BLAS where torch has it),
  times the input lowered to a matrix: ``(in, N)`` for Linear, the ``unfold``-ed
  patches ``(C * kh * kw, B * L)`` for Conv2d (no copy for a 1x1 stride-1 conv);
* ``condensed``: for constant fan-in layers (every neuron ``k`` inputs), the weight as
  dense ``(out, k)`` values and input indices; the output is a gather of ``k`` input
  rows per neuron and a weighted sum (the condensed layer of SRigL, Lasby et al. 2024);
* ``direct``: the compiled direct sparse convolution of :mod:`sparseopt.native` (no patch
  matrix; bias, residual add and ReLU in its epilogue), where the kernels could be built.

:func:`unsupported` says why a layer cannot run sparse at all (it then stays dense).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..native import conv as native

KERNELS = ("dense", "csr", "condensed", "direct")


def patches(x: torch.Tensor, kernel, stride, padding, dilation) -> tuple[torch.Tensor, int, int]:
    """``(cols, h, w)``: the convolution's input patches as one ``(C * kh * kw, B * h * w)`` matrix.

    ``F.unfold``'s patches with the batch moved next to the positions, so that one sparse product
    serves the whole batch. Built as a strided view of the padded input copied once: 3-12x faster than
    ``F.unfold`` on this machine (ResNet shapes, torch 2.13 CPU), whose cost made the sparse kernels
    lose on large feature maps; and one product over the batch instead of one per sample.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
    batch, channels, height, width = x.shape
    h, w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = x.stride()
    view = x.as_strided((channels, kh, kw, batch, h, w), (s1, dh * s2, dw * s3, s0, sh * s2, sw * s3), x.storage_offset())
    return view.reshape(channels * kh * kw, batch * h * w), h, w


def _condensed(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, index)``, each ``(out, k)``: the active weights of each row and their input positions."""
    rows, active = weight.reshape(weight.shape[0], -1), mask.reshape(mask.shape[0], -1)
    k = int(active[0].sum())
    index = active.nonzero()[:, 1].reshape(rows.shape[0], k)
    return rows.gather(1, index).contiguous(), index.contiguous()


def _constant_fan_in(mask: torch.Tensor) -> bool:
    """Every neuron the same nonzero fan-in (SRigL's ablated neurons have none: they rule the condensed form out)."""
    counts = mask.reshape(mask.shape[0], -1).sum(1)
    return bool(counts[0] > 0) and bool((counts == counts[0]).all())


def unsupported(module: nn.Module) -> str | None:
    """Why ``module`` must stay dense, or None when the sparse kernels take it (float32 is checked per model)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return (f"grouped convolution (groups={module.groups}): "
                    f"{'depthwise layers have' if module.groups == module.in_channels else 'each group has'} "
                    f"too few inputs per output for a sparse kernel to pay; kept dense")
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: only zero padding is supported"
    return None


class _SparseLayer(nn.Module):
    """Holds one representation of a folded masked weight (dense, CSR, condensed or direct) and its bias.

    ``relu`` and a ``residual`` argument of ``forward`` form the epilogue that
    :func:`sparseopt.deploy.fusion.fuse_epilogues` moves into the layer: ``relu(layer(x) + residual)``.
    """

    def __init__(self, module: nn.Module, mask: torch.Tensor, kernel: str):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {list(KERNELS)}")
        weight = (module.weight.detach() * mask).contiguous()
        self.kernel = kernel
        self.out_features = weight.shape[0]
        self.relu = False
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().clone())
        if kernel == "direct":
            self.direct = native.DirectWeight(weight, mask)
            for name in ("values", "columns", "rowptr"):  # buffers, so .to() and state_dict see them
                self.register_buffer(name, getattr(self.direct, name))
        elif kernel == "dense":
            self.register_buffer("weight", weight)
        elif kernel == "csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are tested
                warnings.simplefilter("ignore", UserWarning)
                self.register_buffer("weight", weight.reshape(weight.shape[0], -1).to_sparse_csr())
        else:
            values, index = _condensed(weight, mask)
            self.register_buffer("values", values)
            self.register_buffer("index", index)

    @classmethod
    def candidates(cls, module: nn.Module, mask: torch.Tensor) -> list[str]:
        return ["dense", "csr", *(["condensed"] if _constant_fan_in(mask) else []),
                *(["direct"] if native.available() else [])]

    @property
    def weight_bytes(self) -> int:
        """Bytes of this layer's weight representation (values and positions; the bias not counted)."""
        if self.kernel == "direct":
            return self.direct.nbytes
        if self.kernel == "condensed":
            return self.values.numel() * 4 + self.index.numel() * self.index.element_size()
        if self.kernel == "csr":
            w = self.weight
            return sum(t.numel() * t.element_size() for t in (w.values(), w.col_indices(), w.crow_indices()))
        return self.weight.numel() * self.weight.element_size()

    def _epilogue(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``W @ x`` for ``x`` of shape ``(in, N)``: ``(out, N)``."""
        if self.kernel == "csr":
            return torch.sparse.mm(self.weight, x)
        # condensed: row o of the output is sum_j values[o, j] * x[index[o, j]]
        gathered = x.index_select(0, self.index.reshape(-1)).reshape(*self.index.shape, x.shape[1])
        return torch.einsum("ok,okn->on", self.values, gathered)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, out={self.out_features}" + (", relu" if self.relu else "")


class SparseLinear(_SparseLayer):
    def __init__(self, module: nn.Linear, mask: torch.Tensor, kernel: str):
        super().__init__(module, mask, kernel)
        self.in_features = module.in_features

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel == "direct" and residual is None:  # the ReLU in the kernel's epilogue
            return native.linear(x, self.direct, self.bias, relu=self.relu)
        return self._epilogue(self._forward(x), residual)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dense":
            return F.linear(x, self.weight, self.bias)
        if self.kernel == "direct":
            return native.linear(x, self.direct, self.bias)
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class SparseConv2d(_SparseLayer):
    def __init__(self, module: nn.Conv2d, mask: torch.Tensor, kernel: str):
        super().__init__(module, mask, kernel)
        self.kernel_size, self.stride = module.kernel_size, module.stride
        self.padding, self.dilation = module.padding, module.dilation
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), "valid")
        self.out_padding = (0, 0)  # set by fuse_epilogues: write into the zero-padded layout the next layer reads

    @classmethod
    def candidates(cls, module: nn.Conv2d, mask: torch.Tensor) -> list[str]:
        if isinstance(module.padding, str) and module.padding != "valid":
            return ["dense"]  # "same" padding: the unfold lowering needs explicit pads
        names = super().candidates(module, mask)
        if native.conv_unsupported(module.kernel_size, module.padding, module.dilation, module.groups,
                                   module.padding_mode):
            names = [k for k in names if k != "direct"]
        return names

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel == "direct":
            padding = (0, 0) if self.padding == "valid" else self.padding
            return native.conv2d(x, self.direct, self.bias, self.kernel_size, self.stride, padding,
                                 residual=residual, relu=self.relu, out_padding=self.out_padding)
        return self._epilogue(self._forward(x), residual)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dense":
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        batch = x.shape[0]
        if self.pointwise and batch == 1:
            h, w = x.shape[2], x.shape[3]
            cols = x.contiguous().reshape(x.shape[1], h * w)  # no copy
        else:
            cols, h, w = patches(x, self.kernel_size, self.stride, (0, 0) if self.padding == "valid" else self.padding,
                                 self.dilation)
        y = self._matmul(cols).reshape(self.out_features, batch, h * w).transpose(0, 1)  # (B, out, L)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1)
        return y.reshape(batch, self.out_features, h, w)


class NativeMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` on the compiled kernel, for the NCHW activations the direct kernel writes.

    torch's NCHW max pooling branches on the data and runs 8x slower than this one here (ResNet-50's
    stem: 4.6 ms against 0.56 ms on one thread), more than the sparse convolutions around it.
    """

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        self.kernel_size, self.padding = pair(pool.kernel_size), pair(pool.padding)
        self.stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)

    @staticmethod
    def supports(pool: nn.Module) -> bool:
        return (type(pool) is nn.MaxPool2d and not pool.ceil_mode and not pool.return_indices
                and pool.dilation in (1, (1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 4 or x.device.type != "cpu":
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return native.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
