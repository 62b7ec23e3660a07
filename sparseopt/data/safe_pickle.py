"""A restricted unpickler for the CIFAR python archives.

The archives are pickles of dicts of lists, bytes and numpy arrays. Only the
handful of globals needed to rebuild those are allowed; anything else (which
could run arbitrary code) is refused.
"""

from __future__ import annotations

import codecs
import io
import pickle

import numpy as np

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: not part of a CIFAR archive"
            ) from None


def safe_loads(data: bytes):
    """Unpickle ``data`` (python-2 pickles decoded with ``encoding='bytes'``) with the restricted unpickler."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
