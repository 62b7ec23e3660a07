"""Direct sparse convolution and sparse linear through the compiled kernels (``csrc/sparse_conv.c``).

:class:`DirectWeight` holds a masked weight as CSR rows by output channel: the active values (fp32),
their column in the flattened ``(C, kh, kw)`` weight (int16 where it fits) and the row pointers.

:func:`conv2d` and :func:`linear` compute ``F.conv2d`` / ``F.linear`` of the masked weight, with the
bias, an optional residual added and an optional ReLU applied in the kernel's epilogue. Everything
that depends only on the call's shapes (the input geometry, the weights' offsets into the packed
input, the argument block) is worked out once per shape and kept in a :class:`_Plan` on the weight:
the per-call cost is then a dictionary look-up, an output allocation and one foreign call, which
matters for small layers (ResNet-20 at batch 1: about 5 us of compute a layer).

They need the library (``build.load()``); callers check ``available()`` first.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from . import build

MAX_OFFSET = 2**31 - 1
MAX_PLANS = 4  # shapes remembered per layer (each keeps one int32 offset per active weight)


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
                ("y_ph", ctypes.c_int64), ("y_pw", ctypes.c_int64),
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


def geometry(x_shape, kernel, stride, padding) -> Geometry:
    _, C, H, W = x_shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    Hp, Wp = H + 2 * ph, W + 2 * pw
    Ho, Wo = (Hp - kh) // sh + 1, (Wp - kw) // sw + 1
    return Geometry(C, H, W, (ph, pw), (sh, sw), (min(sh, kh), min(sw, kw)), -(-Hp // sh), -(-Wp // sw), Ho, Wo)


class DirectWeight:
    """A masked ``(O, C, kh, kw)`` (or ``(O, C)``) weight as the compiled kernels read it."""

    def __init__(self, weight: torch.Tensor | None, mask: torch.Tensor):
        """``weight=None``: the structure only, with zero values (a training layer gathers them per step)."""
        self.shape = tuple(mask.shape)
        active = mask.reshape(mask.shape[0], -1).to(torch.bool).cpu()
        position = active.nonzero()  # row-major: sorted by output channel, then column
        if weight is None:
            self.values = torch.zeros(len(position), dtype=torch.float32)
        else:
            self.values = weight.detach().float().reshape(mask.shape[0], -1).cpu()[active].contiguous()
        self.columns = position[:, 1].to(torch.int16 if active.shape[1] <= 2**15 else torch.int32).contiguous()
        counts = active.sum(1)
        self.rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).contiguous()
        self.plans: dict[tuple, _Plan] = {}

    @property
    def nbytes(self) -> int:
        """Bytes the weight keeps: values, columns, row pointers and the offsets of the shapes it has seen."""
        own = sum(t.numel() * t.element_size() for t in (self.values, self.columns, self.rowptr))
        return own + sum(plan.offsets.numel() * 4 for plan in self.plans.values())

    def plan(self, key: tuple, make) -> _Plan:
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= MAX_PLANS:
                self.plans.pop(next(iter(self.plans)))
            plan = self.plans[key] = make()
        return plan


class _Plan:
    """One shape's call: the argument block with every shape-dependent field filled in."""

    def __init__(self, weight: DirectWeight, offsets: torch.Tensor, bias: torch.Tensor | None, n: int,
                 out_shape: tuple[int, ...], grid: tuple[int, int, int], image: int, relu: bool,
                 out_padding: tuple[int, int] = (0, 0), geometry: Geometry | None = None, mode: str = "as_is"):
        if offsets.numel() and int(offsets.max()) > MAX_OFFSET:
            raise ValueError(f"an input of {image} floats per image is too large for the kernel's 32-bit offsets")
        self.offsets = offsets.to(torch.int32).contiguous()
        self.bias = bias  # kept alive: the block holds its address
        self.out_shape, self.out_padding = out_shape, out_padding
        self.geometry, self.mode = geometry, mode  # how the input is read: see _image_mode
        Ho, Wo, Wq = grid
        self.args = _Args(None, image, weight.values.data_ptr(), self.offsets.data_ptr(), weight.rowptr.data_ptr(),
                          None if bias is None else bias.data_ptr(), n, weight.shape[0], Ho, Wo, Wq)
        self.args.relu, self.args.y_ph, self.args.y_pw = int(relu), *out_padding

    def run(self, image: int, y: torch.Tensor, residual: torch.Tensor | None) -> None:
        # a copy per call: ctypes releases the GIL during the call, so two threads running one model at
        # once must not share the block (about 1 us)
        args = _Args.from_buffer_copy(self.args)
        args.x, args.y = image, y.data_ptr()
        args.y_n, args.y_c, args.y_row = y.stride()[:3]
        if residual is None:
            args.r = None
        else:
            args.r = residual.data_ptr()
            args.r_n, args.r_c, args.r_row = residual.stride()[:3]
        args.threads = torch.get_num_threads()
        backend, lib = build.load()
        if lib.sparseopt_sconv(ctypes.byref(args), build.path_number(backend.path)) != 0:
            raise RuntimeError(f"the compiled kernel refused path {backend.path}")


_local = threading.local()


def _workspace(numel: int, slot: int = 0) -> torch.Tensor:
    """A float buffer of at least ``numel``, reused by every call of this thread that names ``slot``.

    The packed input lives only during one kernel call. A fresh allocation per call would be
    returned to the system and page-faulted in again (about 0.2 ms for a 56x56x64 image here,
    as long as the kernel itself), whenever the allocator's state changes between calls.
    Slots: 0 the convolution's packed input; in the backward (``grad.py``) 1 the padded output gradient,
    2 the output gradient on the forward's grid, 3 the zero-spread output gradient of a strided layer.
    """
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buffer = buffers.get(slot)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[slot] = torch.empty(max(numel, 1), dtype=torch.float32)
    return buffer[:numel]


def pack(x: torch.Tensor, g: Geometry, slot: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The zero-padded, phase-split copy of ``x`` that the kernel reads: ``(N, image)`` floats.

    Written into ``out`` when given, else into this thread's workspace ``slot`` (valid until the next
    ``pack`` into that slot).
    """
    _, lib = build.load()
    if out is None:
        out = _workspace(x.shape[0] * g.image, slot).view(x.shape[0], g.image)
    lib.sparseopt_pack(x.data_ptr(), x.shape[0], g.C, g.H, g.W, *x.stride(), g.pad[0], g.pad[1], g.stride[0],
                       g.phases[0], g.phases[1], g.Hq, g.Wq, out.data_ptr(), torch.get_num_threads())
    return out


def conv_unsupported(kernel_size, padding, dilation, groups: int, padding_mode: str) -> str | None:
    """Why the direct kernel cannot run a Conv2d of these settings, or None when it can."""
    if groups != 1:
        return f"grouped convolution (groups={groups})"
    if padding_mode != "zeros":
        return f"padding_mode={padding_mode!r}: only zero padding is supported"
    if tuple(dilation) != (1, 1):
        return f"dilation={tuple(dilation)}: the direct kernel takes dilation 1"
    if not 1 <= max(kernel_size) <= 7:
        return f"kernel {tuple(kernel_size)}: the direct kernel takes kernels of 1 to 7"
    if isinstance(padding, str) and padding != "valid":
        return f"padding={padding!r}: the direct kernel needs explicit padding"
    return None


def _check_input(x: torch.Tensor, what: str, dim: int | None = None) -> None:
    """The kernels read raw CPU float32 memory: anything else is one clear error, never a bad pointer."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or (dim is not None and x.dim() != dim):
        raise ValueError(f"{what} takes {f'{dim}-D ' if dim else ''}float32 CPU tensors, got {x.dtype} of shape "
                         f"{tuple(x.shape)} on {x.device}; run the sparse model on the CPU in float32")


PADDED = "_sparseopt_padding"  # attribute of an output view that lies inside a zero-padded buffer


def _conv_offsets(columns: torch.Tensor, g: Geometry, kernel) -> torch.Tensor:
    """Where each active weight's input sits in one packed image (phase, channel, row, column)."""
    kh, kw = kernel
    columns = columns.to(torch.int64)
    c, k = columns // (kh * kw), columns % (kh * kw)
    r, s = k // kw, k % kw
    phase = (r % g.stride[0]) * g.phases[1] + s % g.stride[1]
    return (phase * g.C + c) * (g.Hq * g.Wq) + (r // g.stride[0]) * g.Wq + s // g.stride[1]


def _image_mode(x: torch.Tensor, g: Geometry) -> str:
    """How the kernel reads ``x``: in place inside its zero border, as it is, or from a packed copy."""
    if g.stride == (1, 1) and getattr(x, PADDED, None) == g.pad:
        (ph, pw), Wp = g.pad, g.Wq
        if x.stride() == (g.C * g.Hq * Wp, g.Hq * Wp, Wp, 1) and (g.Hq, Wp) == (g.H + 2 * ph, g.W + 2 * pw):
            return "padded"
    if g.pad == (0, 0) and g.stride == (1, 1) and x.is_contiguous():
        return "as_is"
    return "pack"


def conv2d(x: torch.Tensor, weight: DirectWeight, bias: torch.Tensor | None, kernel, stride, padding,
           residual: torch.Tensor | None = None, relu: bool = False, out_padding=(0, 0),
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, W * mask, bias, stride, padding)`` (+ ``residual``) (ReLU), fp32, dilation 1, groups 1.

    ``out_padding``: return a view into a buffer with that many zero rows and columns around it,
    which the next direct convolution of stride 1 and that padding reads without copying.
    ``packed``: ``x`` already packed for this geometry (:func:`pack`); ``x`` then gives the shape only.
    """
    _check_input(x, "the direct sparse convolution", 4)
    out_padding = tuple(out_padding)
    key = (tuple(x.shape), x.stride(), getattr(x, PADDED, None), tuple(kernel), tuple(stride), tuple(padding),
           relu, out_padding, None if bias is None else bias.data_ptr())

    def make() -> _Plan:
        g = geometry(x.shape, kernel, stride, padding)
        if g.Ho <= 0 or g.Wo <= 0:
            raise ValueError(f"input {tuple(x.shape)} is smaller than the kernel {tuple(kernel)}")
        return _Plan(weight, _conv_offsets(weight.columns, g, kernel), bias, x.shape[0],
                     (x.shape[0], weight.shape[0], g.Ho, g.Wo), (g.Ho, g.Wo, g.Wq), g.image, relu, out_padding,
                     g, _image_mode(x, g))

    plan = weight.plan(key, make)
    g = plan.geometry
    if packed is not None:
        image = packed.data_ptr()
    elif plan.mode == "padded":
        image = x.data_ptr() - (g.pad[0] * g.Wq + g.pad[1]) * 4
    elif plan.mode == "as_is":
        image = x.data_ptr()
    else:
        image = pack(x, g).data_ptr()
    n, c, h, w = plan.out_shape
    if out_padding == (0, 0):
        y = torch.empty(plan.out_shape, dtype=torch.float32)
    else:  # the kernel zeroes the border around what it writes
        ph, pw = out_padding
        y = torch.empty((n, c, h + 2 * ph, w + 2 * pw), dtype=torch.float32)[:, :, ph:ph + h, pw:pw + w]
        setattr(y, PADDED, out_padding)
    if residual is not None and (residual.dtype != torch.float32 or residual.shape != y.shape
                                 or residual.stride(3) != 1):
        residual = residual.float().expand(y.shape).contiguous()
    plan.run(image, y, residual)
    return y


def linear(x: torch.Tensor, weight: DirectWeight, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``F.linear(x, W * mask, bias)`` (ReLU) for ``x`` of shape ``(..., in)``, fp32.

    The batch is the vector dimension: ``x`` is transposed to ``(in, N)`` (one image of ``in`` planes
    of ``N`` pixels, a 1x1 convolution), the kernel writes ``(out, N)``, returned transposed.
    """
    _check_input(x, "the sparse linear kernel")
    lead, features = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, features)
    n = rows.shape[0]
    plan = weight.plan(("linear", n, relu, None if bias is None else bias.data_ptr()),
                       lambda: _Plan(weight, weight.columns.to(torch.int64) * n, bias, 1, (1, weight.shape[0], 1, n),
                                     (1, n, n), 0, relu))
    packed = rows.t().contiguous() if n > 1 else rows.contiguous()
    y = torch.empty((1, weight.shape[0], 1, n), dtype=torch.float32)
    plan.run(packed.data_ptr(), y, None)
    return y.reshape(weight.shape[0], n).t().reshape(*lead, weight.shape[0])


def max_pool2d(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """``F.max_pool2d(x, kernel, stride, padding)`` of a float32 NCHW tensor (any strides), dilation 1, floor mode."""
    _check_input(x, "the compiled max pool", 4)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = torch.empty((n, c, ho, wo), dtype=torch.float32)
    build.load()[1].sparseopt_maxpool(x.data_ptr(), n, c, h, w, *x.stride(), kh, kw, sh, sw, ph, pw, y.data_ptr(),
                                      ho, wo, torch.get_num_threads())
    return y
