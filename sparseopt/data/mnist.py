"""MNIST and Fashion-MNIST from the standard IDX files (gzipped or raw).

Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``),
directly in the data folder or in a ``mnist/`` / ``fashion_mnist/`` subfolder.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError

FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SUBFOLDERS = {"mnist": ("mnist", "MNIST/raw", "."), "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", ".")}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (magic: 0x0000, dtype 0x08 = uint8, ndim) into a numpy array."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path} is corrupt or truncated ({e}); delete it and download again (--download)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DatasetError(f"{path}: header says shape {dims} ({expected} bytes) but the file has {len(raw)} bytes (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_idx(root: Path, name: str, stem: str) -> Path | None:
    for sub in SUBFOLDERS[name]:
        for suffix in (".gz", ""):
            path = root / sub / (stem + suffix)
            if path.is_file():
                return path
    return None


def load_mnist(root: str | Path, name: str = "mnist", train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``."""
    if name not in SUBFOLDERS:
        raise ValueError(f"unknown MNIST variant {name!r}; choose one of {sorted(SUBFOLDERS)}")
    root = Path(root).expanduser()
    paths = []
    for stem in FILES[train]:
        path = find_idx(root, name, stem)
        if path is None:
            where = ", ".join(str(root / s) for s in SUBFOLDERS[name])
            raise DatasetError(
                f"{name}: {stem}[.gz] not found (looked in {where}). Expected the four IDX files "
                f"{', '.join(FILES[True] + FILES[False])} (optionally .gz). "
                "Pass --data-dir to their folder (sparseopt train can fetch them with --download)."
            )
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{paths[0]}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{paths[0].name} has {images.shape[0]} images but {paths[1].name} has {labels.shape[0]} labels")
    if labels.max() > 9:
        raise DatasetError(f"{paths[1]}: labels must be in [0, 10), got max {labels.max()}")
    check_variant(images, name, paths[0])
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# Mean pixel (0-1) of each variant's training set: the two share file names, not statistics.
MEAN_PIXEL = {"mnist": 0.1307, "fashion_mnist": 0.2860}


def check_variant(images: np.ndarray, name: str, path: Path) -> None:
    """Refuse Fashion-MNIST files read as MNIST and the reverse: each would be normalised with the other's statistics."""
    mean = float(images[:10000].mean()) / 255.0
    closest = min(MEAN_PIXEL, key=lambda k: abs(MEAN_PIXEL[k] - mean))
    if closest != name and abs(MEAN_PIXEL[closest] - mean) < 0.04:
        raise DatasetError(
            f"{path} looks like {closest} (mean pixel {mean:.3f}; {closest} {MEAN_PIXEL[closest]}, {name} "
            f"{MEAN_PIXEL[name]}), not {name}: use --dataset {closest} so that it is normalised with its own statistics"
        )
