"""CIFAR-10 / CIFAR-100 from the official python archives (``.tar.gz`` or extracted).

Layout (Krizhevsky 2009):
* ``cifar-10-python.tar.gz`` -> ``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``,
  key ``labels``;
* ``cifar-100-python.tar.gz`` -> ``cifar-100-python/train, test, meta``, keys
  ``fine_labels`` / ``coarse_labels``.
Each pickle holds ``data``: uint8 ``(N, 3072)`` in CHW order.
"""

from __future__ import annotations

import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError
from .safe_pickle import safe_loads

SPECS = {
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "classes": 10,
        "sizes": (50000, 10000),
    },
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "classes": 100,
        "sizes": (50000, 10000),
    },
}


def _layout(name: str) -> str:
    s = SPECS[name]
    return f"{s['archive']} (or its extracted folder {s['folder']}/ with {', '.join(s['train'] + s['test'])})"


def _read_members(root: Path, name: str, members: list[str]) -> list[bytes]:
    spec = SPECS[name]
    folder = root / spec["folder"]
    if folder.is_dir():
        out = []
        for m in members:
            path = folder / m
            if not path.is_file():
                raise DatasetError(f"{name}: missing file {path}; expected layout: {_layout(name)}")
            out.append(path.read_bytes())
        return out
    archive = root / spec["archive"]
    if not archive.is_file():
        raise DatasetError(
            f"{name} not found in {root}: looked for {archive} and {folder}/. Expected: {_layout(name)}. "
            f"Pass --data-dir to the folder that holds it, or add --download to fetch it."
        )
    try:
        with tarfile.open(archive, "r:gz") as tar:
            out = []
            for m in members:
                try:
                    f = tar.extractfile(f"{spec['folder']}/{m}")
                except KeyError:
                    raise DatasetError(f"{archive} has no member {spec['folder']}/{m}: not a {name} archive?") from None
                out.append(f.read())
            return out
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{archive} is corrupt or truncated ({e}); delete it and download again (--download)") from None


def _parse(blob: bytes, name: str, member: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = safe_loads(blob)
        # Python-2 pickles decode to bytes keys; archives re-written by Python 3 have str keys.
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        data, labels = d["data"], d[label_key]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{name}/{member} is not a valid CIFAR pickle ({type(e).__name__}: {e})") from None
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{name}/{member}: images must be uint8 of shape (N, 3072) (3x32x32), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{name}/{member}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data, labels


def load_cifar(root: str | Path, name: str = "cifar10", train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``."""
    if name not in SPECS:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose one of {sorted(SPECS)}")
    spec = SPECS[name]
    root = Path(root).expanduser()
    members = spec["train"] if train else spec["test"]
    parts = [_parse(b, name, m, spec["label_key"]) for b, m in zip(_read_members(root, name, members), members)]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() >= spec["classes"]:
        raise DatasetError(f"{name}: labels must be in [0, {spec['classes']}), got range [{labels.min()}, {labels.max()}]")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)
