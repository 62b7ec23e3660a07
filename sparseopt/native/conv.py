"""Direct sparse convolution and sparse linear through the compiled kernels (``csrc/sparse_conv.c``).

:class:`DirectWeight` holds a masked weight as CSR rows by output channel: the active values (fp32),
their column in the flattened ``(C, kh, kw)`` weight (int16 where it fits) and the row pointers.
For each input geometry it derives once the offsets of those weights into the zero-padded,
stride-phase-split copy of an image that the kernel reads (:func:`pack`), and keeps the last one.

:func:`conv2d` and :func:`linear` compute ``F.conv2d`` / ``F.linear`` of the masked weight, with the
bias, an optional residual added and an optional ReLU applied in the kernel's epilogue.
They need the library (``build.load()``); callers check ``available()`` first.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from . import build

MAX_OFFSET = 2**31 - 1


def available() -> bool:
    return build.load()[1] is not None


class _Args(ctypes.Structure):
    """Mirror of ``sconv_args`` in csrc/sparse_conv.c (all integers int64, all pointers void*)."""

    _fields_ = [("x", ctypes.c_void_p), ("x_n", ctypes.c_int64),
                ("val", ctypes.c_void_p), ("off", ctypes.c_void_p), ("rowptr", ctypes.c_void_p),
                ("bias", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("O", ctypes.c_int64),
                ("Ho", ctypes.c_int64), ("Wo", ctypes.c_int64), ("Wq", ctypes.c_int64),
                ("y", ctypes.c_void_p), ("y_n", ctypes.c_int64), ("y_c", ctypes.c_int64), ("y_row", ctypes.c_int64),
                ("r", ctypes.c_void_p), ("r_n", ctypes.c_int64), ("r_c", ctypes.c_int64), ("r_row", ctypes.c_int64),
                ("relu", ctypes.c_int64), ("threads", ctypes.c_int64)]


@dataclass(frozen=True)
class Geometry:
    """Where one image's input sits in the packed buffer, and the output grid it gives."""

    C: int
    H: int
    W: int
    pad: tuple[int, int]
    stride: tuple[int, int]
    phases: tuple[int, int]  # (PA, PB): phase planes packed along rows and columns
    Hq: int
    Wq: int
    Ho: int
    Wo: int

    @property
    def image(self) -> int:
        return self.phases[0] * self.phases[1] * self.C * self.Hq * self.Wq


class DirectWeight:
    """A masked ``(O, C, kh, kw)`` (or ``(O, C)``) weight as the compiled kernels read it."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor):
        weight = weight.detach().float()
        self.shape = tuple(weight.shape)
        rows = weight.reshape(weight.shape[0], -1)
        active = mask.reshape(mask.shape[0], -1).to(torch.bool).cpu()
        position = active.nonzero()  # row-major: sorted by output channel, then column
        counts = active.sum(1)
        self.values = rows.cpu()[active].contiguous()
        columns = position[:, 1]
        self.columns = columns.to(torch.int16 if rows.shape[1] <= 2**15 else torch.int32).contiguous()
        self.rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).contiguous()
        self._offsets: tuple[object, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the weight keeps: values, columns and row pointers (the offsets of the last geometry too)."""
        own = sum(t.numel() * t.element_size() for t in (self.values, self.columns, self.rowptr))
        return own + (self._offsets[1].numel() * 4 if self._offsets is not None else 0)

    def offsets(self, key: object, make) -> torch.Tensor:
        if self._offsets is None or self._offsets[0] != key:
            off = make(self.columns.to(torch.int64))
            if off.numel() and int(off.max()) > MAX_OFFSET:
                raise ValueError(f"an image of {key} is too large for the kernel's 32-bit offsets")
            self._offsets = (key, off.to(torch.int32).contiguous())
        return self._offsets[1]


def geometry(x_shape, kernel, stride, padding) -> Geometry:
    _, C, H, W = x_shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    Hp, Wp = H + 2 * ph, W + 2 * pw
    Ho, Wo = (Hp - kh) // sh + 1, (Wp - kw) // sw + 1
    return Geometry(C, H, W, (ph, pw), (sh, sw), (min(sh, kh), min(sw, kw)), -(-Hp // sh), -(-Wp // sw), Ho, Wo)


def _conv_offsets(g: Geometry, kernel):
    kh, kw = kernel

    def make(columns: torch.Tensor) -> torch.Tensor:
        c, k = columns // (kh * kw), columns % (kh * kw)
        r, s = k // kw, k % kw
        phase = (r % g.stride[0]) * g.phases[1] + s % g.stride[1]
        plane = g.Hq * g.Wq
        return (phase * g.C + c) * plane + (r // g.stride[0]) * g.Wq + s // g.stride[1]
    return make


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


_local = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A float buffer of at least ``numel``, reused by every call of this thread.

    The packed input lives only during one kernel call. A fresh allocation per call would be
    returned to the system and page-faulted in again (about 0.2 ms for a 56x56x64 image here,
    as long as the kernel itself), whenever the allocator's state changes between calls.
    """
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _local.buffer = torch.empty(max(numel, 1), dtype=torch.float32)
    return buffer[:numel]


def pack(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The zero-padded, phase-split copy of ``x`` that the kernel reads: ``(N, image)`` floats.

    Written into this thread's workspace: valid until the next ``pack`` of the thread.
    """
    _, lib = build.load()
    out = _workspace(x.shape[0] * g.image).view(x.shape[0], g.image)
    lib.sparseopt_pack(x.data_ptr(), x.shape[0], g.C, g.H, g.W, *x.stride(), g.pad[0], g.pad[1], g.stride[0],
                       g.phases[0], g.phases[1], g.Hq, g.Wq, out.data_ptr(), _threads())
    return out


def _run(args: _Args) -> None:
    backend, lib = build.load()
    if lib.sparseopt_sconv(ctypes.byref(args), build.path_number(backend.path)) != 0:
        raise RuntimeError(f"the compiled kernel refused path {backend.path}")


PADDED = "_sparseopt_padding"  # attribute of an output view that lies inside a zero-padded buffer


def _padded_image(x: torch.Tensor, g: Geometry) -> int | None:
    """The address of ``x``'s zero-padded buffer, if ``x`` is a view into one that fits ``g`` (else None)."""
    if getattr(x, PADDED, None) != g.pad or g.stride != (1, 1):
        return None
    (ph, pw), Wp = g.pad, g.Wq
    if x.stride() != (g.C * g.Hq * Wp, g.Hq * Wp, Wp, 1) or (g.Hq, Wp) != (g.H + 2 * ph, g.W + 2 * pw):
        return None
    return x.data_ptr() - (ph * Wp + pw) * x.element_size()


def _output(shape: tuple[int, int, int, int], padding: tuple[int, int]) -> torch.Tensor:
    """An output of ``shape``, or a view of one inside a zero-padded buffer (a border of ``padding``)."""
    if padding == (0, 0):
        return torch.empty(shape, dtype=torch.float32)
    (n, c, h, w), (ph, pw) = shape, padding
    buffer = torch.empty((n, c, h + 2 * ph, w + 2 * pw), dtype=torch.float32)
    build.load()[1].sparseopt_zero_border(buffer.data_ptr(), n * c, h + 2 * ph, w + 2 * pw, ph, pw, h, w,
                                          _threads())
    y = buffer[:, :, ph:ph + h, pw:pw + w]
    setattr(y, PADDED, padding)
    return y


def conv2d(x: torch.Tensor, weight: DirectWeight, bias: torch.Tensor | None, kernel, stride, padding,
           residual: torch.Tensor | None = None, relu: bool = False, out_padding=(0, 0)) -> torch.Tensor:
    """``F.conv2d(x, W * mask, bias, stride, padding)`` (+ ``residual``) (ReLU), fp32, dilation 1, groups 1.

    ``out_padding``: return a view into a buffer with that many zero rows and columns around it,
    which the next direct convolution of stride 1 and that padding reads without copying.
    """
    if x.dtype != torch.float32 or x.dim() != 4:
        raise ValueError(f"the direct sparse convolution takes 4-D float32 input, got {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    g = geometry(x.shape, kernel, stride, padding)
    if g.Ho <= 0 or g.Wo <= 0:
        raise ValueError(f"input {tuple(x.shape)} is smaller than the kernel {tuple(kernel)}")
    image = _padded_image(x, g)
    if image is None:
        if g.pad == (0, 0) and g.stride == (1, 1) and x.is_contiguous():
            image = x.data_ptr()  # already the layout the kernel reads
        else:
            image = pack(x, g).data_ptr()
    off = weight.offsets(g, _conv_offsets(g, kernel))
    y = _output((x.shape[0], weight.shape[0], g.Ho, g.Wo), tuple(out_padding))
    args = _Args(image, g.image, weight.values.data_ptr(), off.data_ptr(), weight.rowptr.data_ptr(),
                 _ptr(bias), x.shape[0], weight.shape[0], g.Ho, g.Wo, g.Wq,
                 y.data_ptr(), *y.stride()[:3], None, 0, 0, 0, int(relu), _threads())
    if residual is not None:
        residual = residual.float()
        if residual.shape != y.shape or residual.stride(3) != 1:
            residual = residual.expand(y.shape).contiguous()
        args.r, (args.r_n, args.r_c, args.r_row) = residual.data_ptr(), residual.stride()[:3]
    _run(args)
    return y


def linear(x: torch.Tensor, weight: DirectWeight, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``F.linear(x, W * mask, bias)`` (ReLU) for ``x`` of shape ``(..., in)``, fp32.

    The batch is the vector dimension: ``x`` is transposed to ``(in, N)`` (one image of ``in`` planes
    of ``N`` pixels, a 1x1 convolution), the kernel writes ``(out, N)``, returned transposed.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"the sparse linear kernel takes float32 input, got {x.dtype}")
    lead, features = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, features)
    n = rows.shape[0]
    packed = rows.t().contiguous() if n > 1 else rows.contiguous()
    off = weight.offsets(("linear", n), lambda columns: columns * n)
    y = torch.empty((weight.shape[0], n), dtype=torch.float32)
    args = _Args(packed.data_ptr(), 0, weight.values.data_ptr(), off.data_ptr(), weight.rowptr.data_ptr(),
                 _ptr(bias), 1, weight.shape[0], 1, n, n, y.data_ptr(), 0, n, 0, None, 0, 0, 0, int(relu), _threads())
    _run(args)
    return y.t().reshape(*lead, weight.shape[0])
