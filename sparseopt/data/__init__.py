"""Datasets of the paper's recipes, loaded from the formats users already have."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cifar import load_cifar
from .device_loader import DeviceLoader
from .download import download_dataset
from .errors import DatasetError
from .imagefolder import imagefolder_loader
from .mnist import load_mnist

BUNDLED = Path(__file__).resolve().parent / "bundled" / "mnist_subset.npz"


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int | None  # None: read from the training folder (imagefolder)
    in_shape: tuple[int, int, int]  # (C, H, W); folder datasets: H, W = --image-size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str | None  # the --augment preset of --augment auto (None: by image size, for any folder)


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(10, (1, 28, 28), (0.1307,), (0.3081,), "none"),
    "bundled_mnist": DatasetInfo(10, (1, 28, 28), (0.1307,), (0.3081,), "none"),
    "fashion_mnist": DatasetInfo(10, (1, 28, 28), (0.2860,), (0.3530,), "none"),
    "cifar10": DatasetInfo(10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip"),
    "cifar100": DatasetInfo(100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip"),
    "imagenet": DatasetInfo(1000, (3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet"),
    # Any folder in ImageNet's layout: classes from train/; statistics computed from its own images by default
    # (--normalize auto), ImageNet's with --normalize dataset.
    "imagefolder": DatasetInfo(None, (3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None),
}
FOLDER_DATASETS = ("imagenet", "imagefolder")
_DIGITS = [str(i) for i in range(10)]
# Label index -> name, for the datasets whose names are fixed (folder datasets: the class folders, sorted).
CLASS_NAMES: dict[str, list[str]] = {
    "mnist": _DIGITS, "bundled_mnist": _DIGITS,
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def load_bundled_mnist(train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The small real MNIST subset shipped inside the package (see bundled/README.md)."""
    with np.load(BUNDLED) as d:
        prefix = "train" if train else "test"
        return torch.from_numpy(d[f"{prefix}_images"]).unsqueeze(1), torch.from_numpy(d[f"{prefix}_labels"].astype(np.int64))


def load_tensors(name: str, data_dir: str | Path | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole dataset split as ``(uint8 images (N, C, H, W), int64 labels)``."""
    if name == "bundled_mnist":
        return load_bundled_mnist(train)
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} needs --data-dir (the folder holding its files), or --download with --data-dir")
    if name in ("mnist", "fashion_mnist"):
        return load_mnist(data_dir, name, train)
    if name in ("cifar10", "cifar100"):
        return load_cifar(data_dir, name, train)
    raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")


def subset(images: torch.Tensor, labels: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of ``n`` examples (the same for every run seed)."""
    if n is None or n >= len(labels):
        return images, labels
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return images[keep], labels[keep]


__all__ = [
    "BUNDLED", "DATASETS", "FOLDER_DATASETS", "DatasetError", "DatasetInfo", "DeviceLoader", "download_dataset",
    "imagefolder_loader",
    "load_bundled_mnist", "load_cifar", "load_mnist", "load_tensors", "subset",
]
