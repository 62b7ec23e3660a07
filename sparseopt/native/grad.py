"""The backward of the direct sparse convolution and of the sparse linear: what sparse training runs.

For a masked weight ``W`` (zeros off the mask) and the forward ``y = conv(x, W)`` of
:func:`~sparseopt.native.conv.conv2d`:

* the input gradient is a convolution of the output gradient with the transposed, spatially
  flipped weight, run by the same compiled kernel (:class:`TrainingWeight` keeps that CSR too).
  Stride 1: ``conv(dy, W^T flipped, padding k - 1 - p)``. Stride s > 1: ``dy`` is first spread
  over a zero grid (``s - 1`` zeros between its pixels) and padded on each side, a stride-1
  convolution of that grid; this spends ``s^2`` times the useful multiply-adds on the stride-2
  layers, which are 2 of ResNet-20's 19 convolutions.
* the weight gradient at the active positions only is one dot product per active weight
  (``csrc/sparse_grad.c``), the masked dense gradient's values there; the inactive positions get 0.

:class:`TrainingWeight` is built once per mask (after each topology update) and gathers the
current values from the dense parameter at each step: the parameter stays a dense tensor with
zeros, so optimizers, DST updates, checkpoints and DDP see what they see in masked training.
"""

from __future__ import annotations

import ctypes

import torch

from . import build
from .conv import (
    MAX_PLANS,
    DirectWeight,
    _check_input,
    _conv_offsets,
    _workspace,
    conv2d,
    geometry,
    linear,
    pack,
)


class _WgradArgs(ctypes.Structure):
    """Mirror of ``wgrad_args`` in csrc/sparse_grad.c."""

    _fields_ = [("x", ctypes.c_void_p), ("x_n", ctypes.c_int64),
                ("dy", ctypes.c_void_p), ("dy_n", ctypes.c_int64), ("dy_c", ctypes.c_int64),
                ("off", ctypes.c_void_p), ("rowptr", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("O", ctypes.c_int64), ("L", ctypes.c_int64),
                ("dval", ctypes.c_void_p), ("work", ctypes.c_void_p), ("threads", ctypes.c_int64)]


GROUPS = 16  # partial sums kept by the kernel (csrc/sparse_grad.c)


def _weight_grad(x: int, x_n: int, dy: int, dy_n: int, plane: int, n: int, offsets: torch.Tensor,
                 rowptr: torch.Tensor, length: int) -> torch.Tensor:
    """The gradient of the active weights: ``dval[j] = sum_n sum_{p < length} dy[n, o, p] * x[n, off[j] + p]``.

    ``x``: address of image 0 of the packed input, ``x_n`` floats apart; ``dy``: address of the output
    gradient on the grid, plane ``(n, o)`` at ``n * dy_n + o * plane`` floats.
    """
    nnz = int(rowptr[-1])
    out = torch.empty(nnz, dtype=torch.float32)
    work = torch.empty(max(GROUPS * nnz, 1), dtype=torch.float32)
    args = _WgradArgs(x, x_n, dy, dy_n, plane, offsets.data_ptr(), rowptr.data_ptr(), n, rowptr.numel() - 1, length,
                      out.data_ptr(), work.data_ptr(), torch.get_num_threads())
    backend, lib = build.load()
    if lib.sparseopt_wgrad(ctypes.byref(args), build.path_number(backend.path)) != 0:
        raise RuntimeError(f"the compiled kernel refused path {backend.path}")
    return out


class TrainingWeight:
    """A mask's forward and transposed CSR, and where their values sit in the dense weight.

    ``forward``: rows by output channel, as :class:`~sparseopt.native.conv.DirectWeight`;
    ``transposed``: rows by input channel of ``W^T`` with the kernel flipped (the input gradient's
    weight). ``gather`` / ``gather_t``: flat positions in the dense weight of each CSR value.
    """

    def __init__(self, mask: torch.Tensor):
        mask = mask.detach().to("cpu", torch.bool)
        self.shape = tuple(mask.shape)
        index = torch.arange(mask.numel()).view(self.shape)
        self.forward = DirectWeight(None, mask)
        self.gather = index[mask]  # row-major: the CSR order
        flipped = tuple(range(2, mask.dim()))
        transposed = mask.transpose(0, 1).flip(flipped) if flipped else mask.t()
        self.transposed = DirectWeight(None, transposed)
        index_t = index.transpose(0, 1).flip(flipped) if flipped else index.t()
        self.gather_t = index_t[transposed]
        self.offsets: dict[tuple, torch.Tensor] = {}  # weight-gradient offsets per input geometry or batch
        self._free: list[torch.Tensor] = []  # packed-input buffers, reused from step to step

    def buffer(self, numel: int) -> torch.Tensor:
        """A float buffer for one forward's packed input, kept until its backward gives it back.

        Reused from step to step: a fresh one per step is page-faulted in again (as long as a pack
        itself); two forwards before one backward each get their own.
        """
        for i, buffer in enumerate(self._free):
            if buffer.numel() == numel:
                return self._free.pop(i)
        return torch.empty(numel, dtype=torch.float32)

    def release(self, buffer: torch.Tensor | None) -> None:
        if buffer is not None and len(self._free) < 2:
            self._free.append(buffer)

    def refresh(self, weight: torch.Tensor) -> None:
        """Copy the current values of the dense ``weight`` into the forward CSR (in place: plans hold its address)."""
        torch.index_select(weight.detach().reshape(-1), 0, self.gather, out=self.forward.values)

    def refresh_transposed(self, weight: torch.Tensor) -> None:
        torch.index_select(weight.detach().reshape(-1), 0, self.gather_t, out=self.transposed.values)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The dense gradient with ``values`` at the active positions and zeros elsewhere."""
        grad = torch.zeros(self.shape, dtype=torch.float32)
        grad.view(-1).index_copy_(0, self.gather, values)
        return grad

    def weight_grad_offsets(self, key: tuple, make) -> torch.Tensor:
        """The int32 offsets of the active weights into one input of ``key`` (a few kept, as the forward's plans)."""
        offsets = self.offsets.get(key)
        if offsets is None:
            if len(self.offsets) >= MAX_PLANS:
                self.offsets.pop(next(iter(self.offsets)))
            offsets = self.offsets[key] = make().to(torch.int32).contiguous()
        return offsets


def packed_input(x: torch.Tensor, tw: TrainingWeight, kernel, stride, padding) -> torch.Tensor | None:
    """``x`` packed for the forward into a buffer of ``tw``'s (kept for the weight gradient), or None when the
    kernel reads ``x`` as it is (a 1x1 convolution of stride 1 without padding)."""
    g = geometry(x.shape, kernel, stride, padding)
    if g.pad == (0, 0) and g.stride == (1, 1) and x.is_contiguous():
        return None
    return pack(x, g, out=tw.buffer(x.shape[0] * g.image).view(x.shape[0], g.image))


def conv2d_backward(x: torch.Tensor, dy: torch.Tensor, tw: TrainingWeight, kernel, stride, padding,
                    packed: torch.Tensor | None, need_input: bool, need_weight: bool):
    """``(dx, dval)``: the input gradient (``tw.transposed`` must hold current values) and the gradient of the
    active weights in CSR order, each None when not needed. ``packed``: from :func:`packed_input`."""
    _check_input(dy, "the sparse convolution's backward", 4)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    qh, qw = kh - 1 - ph, kw - 1 - pw  # the transposed convolution's padding
    g = geometry(x.shape, kernel, stride, padding)
    n, o = dy.shape[:2]
    _, lib = build.load()
    dx = dval = None
    shared = (sh, sw) == (1, 1) and (qh, qw) == (ph, pw)  # "same" convolutions: one padded dy serves both
    dyp = None
    if need_input and (sh, sw) == (1, 1):
        gd = geometry(dy.shape, kernel, (1, 1), (qh, qw))
        dyp = pack(dy, gd, slot=1)
    if need_weight:
        length = (g.Ho - 1) * g.Wq + g.Wo
        image = x.data_ptr() if packed is None else packed.data_ptr()
        if shared and dyp is not None:  # dy's rows sit inside its zero border, which has the forward's pitch
            plane = gd.Hq * gd.Wq
            grid = dyp.data_ptr() + (ph * gd.Wq + pw) * 4
        else:  # dy on the forward's output grid (pitch Wq): the columns past Wo are zeros
            plane = g.Ho * g.Wq
            buffer = _workspace(n * o * plane, slot=2)
            lib.sparseopt_pack(dy.data_ptr(), n, o, g.Ho, g.Wo, *dy.stride(), 0, 0, 1, 1, 1, g.Ho, g.Wq,
                               buffer.data_ptr(), torch.get_num_threads())
            grid = buffer.data_ptr()
        if packed is None:  # the kernel reads x itself
            _check_input(x, "the sparse weight gradient", 4)
        offsets = tw.weight_grad_offsets((g, tuple(kernel)), lambda: _conv_offsets(tw.forward.columns, g, kernel))
        dval = _weight_grad(image, g.image, grid, o * plane, plane, n, offsets, tw.forward.rowptr, length)
    if need_input:
        if dyp is not None:
            dx = conv2d(dy, tw.transposed, None, kernel, (1, 1), (qh, qw), packed=dyp)
        else:  # stride > 1: dy spread over a zero grid, padded so that the output is x's size
            _, _, H, W = x.shape
            ho, wo = dy.shape[2:]
            # the rows/columns of the input that no output reads (the stride's remainder) add zeros below/right
            eh, ew = H - ((ho - 1) * sh - 2 * ph + kh), W - ((wo - 1) * sw - 2 * pw + kw)
            shape = (n, o, (ho - 1) * sh + 1 + 2 * qh + eh, (wo - 1) * sw + 1 + 2 * qw + ew)
            spread = _workspace(n * o * shape[2] * shape[3], slot=3).view(shape).zero_()
            spread[:, :, qh:qh + (ho - 1) * sh + 1:sh, qw:qw + (wo - 1) * sw + 1:sw] = dy
            dx = conv2d(spread, tw.transposed, None, kernel, (1, 1), (0, 0))
    return dx, dval


def linear_weight_grad(x: torch.Tensor, dy: torch.Tensor, tw: TrainingWeight) -> torch.Tensor:
    """The gradient of ``x @ W.t()`` with respect to the active values of ``W``, for 2-D ``x`` and ``dy``."""
    _check_input(x, "the sparse weight gradient", 2)
    n = x.shape[0]
    xt = x.t().contiguous()  # (in, N): the batch is the vector dimension, as in the forward
    dyt = dy.t().contiguous()
    offsets = tw.weight_grad_offsets(("linear", n), lambda: tw.forward.columns.to(torch.int64) * n)
    return _weight_grad(xt.data_ptr(), 0, dyt.data_ptr(), 0, n, 1, offsets, tw.forward.rowptr, n)


def linear_input_grad(dy: torch.Tensor, tw: TrainingWeight) -> torch.Tensor:
    return linear(dy, tw.transposed, None)
