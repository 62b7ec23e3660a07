"""ImageNet (ILSVRC-2012) in the usual folder layout, decoded by parallel DataLoader workers.

Layout: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``.
Training: random-resized-crop 224 (scale 0.08-1, aspect 3/4-4/3) + horizontal
flip; evaluation: resize the shorter side to 256 + centre crop 224. Workers
return uint8 CHW tensors; normalisation happens on the device.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .augment import Normalize
from .errors import DatasetError

EXTENSIONS = (".jpeg", ".jpg", ".png")


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        raise DatasetError("reading ImageNet needs Pillow: pip install pillow") from None
    return Image


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, w, h) of a random crop covering ``scale`` of the area with aspect in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the largest centred crop with an aspect ratio inside the range.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageFolder(Dataset):
    def __init__(self, root: str | Path, split: str, train: bool, image_size: int = 224, resize: int = 256, subset: int | None = None):
        folder = Path(root).expanduser() / split
        if not folder.is_dir():
            raise DatasetError(
                f"imagenet: {folder} not found. Expected {Path(root) / 'train'}/<wnid>/*.JPEG and "
                f"{Path(root) / 'val'}/<wnid>/*.JPEG (val sorted into class folders); pass --data-dir to that folder"
            )
        self.classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not self.classes:
            raise DatasetError(f"imagenet: {folder} has no class folders (expected {folder}/<wnid>/*.JPEG)")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [
            (p, index[c]) for c in self.classes for p in sorted((folder / c).iterdir()) if p.suffix.lower() in EXTENSIONS
        ]
        if not self.samples:
            raise DatasetError(f"imagenet: no images ({', '.join(EXTENSIONS)}) under {folder}")
        if subset is not None:
            keep = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(0))[:subset]
            self.samples = [self.samples[i] for i in sorted(keep.tolist())]
        self.train, self.image_size, self.resize = train, image_size, resize
        self.rng = random.Random(0)  # re-seeded per worker by _seed_worker

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        Image = _pil()
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise DatasetError(f"imagenet: cannot decode {path} ({e})") from None
        if self.train:
            left, top, w, h = random_resized_crop_box(img.width, img.height, self.rng)
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if self.rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            s = self.resize / min(img.width, img.height)
            img = img.resize((max(self.resize, round(img.width * s)), max(self.resize, round(img.height * s))), Image.BILINEAR)
            left, top = (img.width - self.image_size) // 2, (img.height - self.image_size) // 2
            img = img.crop((left, top, left + self.image_size, top + self.image_size))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), label


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.rng.seed(info.seed)


class HostLoader:
    """Wraps a DataLoader of uint8 images: moves batches to the device and normalises them there."""

    def __init__(self, loader: DataLoader, sampler, device, mean, std, channels_last: bool = False, seed: int = 0):
        self.loader, self.sampler, self.device, self.seed = loader, sampler, torch.device(device), seed
        self.normalize = Normalize(mean, std, self.device, channels_last)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        gen = getattr(self.loader, "generator", None)
        if gen is not None:
            gen.manual_seed(self.seed * 100_003 + epoch)  # same order for an epoch after a resume

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.loader.dataset)

    def __iter__(self):
        for x, y in self.loader:
            yield self.normalize(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)


def imagenet_loader(root, train: bool, batch_size: int, *, workers: int, device, mean, std, seed: int,
                    rank: int = 0, world_size: int = 1, subset: int | None = None, channels_last: bool = False) -> HostLoader:
    dataset = ImageFolder(root, "train" if train else "val", train, subset=subset)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", drop_last=train, worker_init_fn=_seed_worker,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
    )
    return HostLoader(loader, sampler, device, mean, std, channels_last, seed)
