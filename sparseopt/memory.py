"""Keep freed memory in the process, so that a training step reuses its pages instead of faulting in fresh ones.

glibc's malloc serves a large block (above 128 KB at first, at most 32 MB after it adapts) with its own
``mmap`` and returns it to the system with ``munmap`` when it is freed, and it trims the heap's free top
above a threshold. A CPU training step allocates and frees the same activations every step; ResNet-50 at
batch 32 has activations of 100 MB, so every step maps them afresh and the kernel zero-fills each 4 KB
page on first touch. Measured on a 2-vCPU VM (docs/benchmarks.md): ReLU 540 ms and the residual adds
320 ms of a 3.0 s forward with the defaults, 34 and 30 ms with the memory kept; whole steps, masked and
sparse-kernel alike, 1.37-1.67x faster over two pairs of runs. Elementwise work gains most.

:func:`reuse_freed_memory` turns both off for the rest of the process (``mallopt``: no ``mmap`` for large
blocks, no trimming below 2 GB of free top). The process then keeps its peak memory until it exits, which a
training run reaches within its first step anyway. Process-wide and not undone (glibc cannot go back to its
adaptive thresholds), so the library never calls it on its own: the command line does, for
single-process CPU runs (``--reuse-memory``, on by default), and a library user may. Numbers are
unchanged: only where memory comes from changes. Outside glibc (macOS, musl) it does nothing and says
so by returning False.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt's parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
KEEP_FREE_TOP = 2**31 - 1  # bytes of free heap top kept before trimming (mallopt takes an int)
TOP_PAD = 64 << 20  # grow the heap 64 MB at a time: fewer brk calls while the first step finds its peak

_applied = False


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse for the rest of the process; True if it now does."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; large blocks now come from the heap, and the heap is not trimmed
    _applied = all(mallopt(param, value) == 1 for param, value in
                   ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_FREE_TOP), (M_TOP_PAD, TOP_PAD)))
    return _applied


def describe(reused: bool) -> str:
    """How a benchmark's memory was served, for its printed header."""
    return "freed memory reused" if reused else "the C library's malloc defaults"
