"""Image-folder datasets (ImageNet's layout), decoded by parallel DataLoader workers.

Layout: ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG``
(``imagefolder``; ``imagenet`` is its preset with ILSVRC-2012's 1000 classes).
The class-to-index map comes from the training folder alone and the validation
split uses it, so a class missing from ``val`` cannot shift the labels of the
others; hidden folders (``.ipynb_checkpoints``) are not classes, and a training
class folder without images is refused. Training with ``augment="imagenet"``:
random-resized-crop ``image_size`` (scale 0.08-1, aspect 3/4-4/3) + horizontal
flip, evaluation: resize the shorter side to ``resize`` + centre crop
``image_size`` (224 / 256 for ImageNet). Any other preset (``none``, ``flip``,
``crop``, ``crop_flip``: for small images) resizes to ``image_size`` and, in
training, pads by 4 and crops back and/or flips. Workers return uint8 CHW
tensors; normalisation happens on the device.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .augment import Normalize, pixel_statistics
from .errors import DatasetError

EXTENSIONS = (".jpeg", ".jpg", ".png")


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        raise DatasetError("reading ImageNet needs Pillow: pip install pillow") from None
    return Image


def shared_image_size(root: str | Path, sample: int = 64) -> tuple[int, int] | None:
    """The (width, height) that a sample of the training images all have, or None when they differ.

    Reads only the headers of up to ``sample`` images, taken in turn from every class folder.
    """
    folder = Path(root).expanduser() / "train"
    if not folder.is_dir():
        return None  # the loader says what is missing
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [iter(sorted(p for p in c.iterdir() if p.suffix.lower() in EXTENSIONS)) for c in classes]
    paths: list[Path] = []
    while per_class and len(paths) < sample:
        for it in list(per_class):
            path = next(it, None)
            if path is None:
                per_class.remove(it)
            elif len(paths) < sample:
                paths.append(path)
    Image, sizes = _pil(), set()
    for path in paths:
        try:
            with Image.open(path) as im:
                sizes.add(im.size)
        except (OSError, ValueError):
            return None  # the loader names the file it cannot decode
    return sizes.pop() if len(sizes) == 1 else None


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
    """One split of an image folder. ``class_to_idx``: the training split's map (for ``val``); None builds it.

    ``missing_classes``: training classes with no folder in this split (a warning for the caller).
    """

    def __init__(self, root: str | Path, split: str, train: bool, image_size: int = 224, resize: int = 256,
                 subset: int | None = None, class_to_idx: dict[str, int] | None = None, name: str = "imagefolder",
                 augment: str = "imagenet"):
        folder = Path(root).expanduser() / split
        if not folder.is_dir():
            raise DatasetError(
                f"{name}: {folder} not found. Expected {Path(root) / 'train'}/<class>/*.JPEG and "
                f"{Path(root) / 'val'}/<class>/*.JPEG (val sorted into class folders); pass --data-dir to that folder"
            )
        found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise DatasetError(f"{name}: {folder} has no class folders (expected {folder}/<class>/*.JPEG)")
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(found)}
        unknown = [c for c in found if c not in class_to_idx]
        if unknown:
            raise DatasetError(f"{name}: {folder} has class folders the training split does not have: "
                               f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        self.class_to_idx = class_to_idx
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        self.missing_classes = [c for c in self.classes if c not in set(found)]
        images = {c: [p for p in sorted((folder / c).iterdir()) if p.suffix.lower() in EXTENSIONS] for c in found}
        empty = [c for c in found if not images[c]]
        if empty and split == "train":
            raise DatasetError(f"{name}: class folder {folder / empty[0]} has no images ({', '.join(EXTENSIONS)})"
                               f"{f' (nor do {len(empty) - 1} more: {empty[1:4]})' if len(empty) > 1 else ''}; "
                               "remove it or put its images in it")
        self.samples = [(p, class_to_idx[c]) for c in found for p in images[c]]
        if not self.samples:
            raise DatasetError(f"{name}: no images ({', '.join(EXTENSIONS)}) under {folder}")
        self.total = len(self.samples)  # before --train-subset
        if subset is not None:
            keep = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(0))[:subset]
            self.samples = [self.samples[i] for i in sorted(keep.tolist())]
        self.train, self.image_size, self.resize, self.augment = train, image_size, resize, augment
        self.rng = random.Random(0)  # re-seeded per worker by _seed_worker

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        Image = _pil()
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError) as e:  # truncated, not an image, or an unknown format
            raise DatasetError(f"cannot decode image {path} ({e}); remove or replace it") from None
        size = self.image_size
        if self.augment == "imagenet":
            if self.train:
                left, top, w, h = random_resized_crop_box(img.width, img.height, self.rng)
                img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
            else:
                s = self.resize / min(img.width, img.height)
                img = img.resize((max(self.resize, round(img.width * s)), max(self.resize, round(img.height * s))),
                                 Image.BILINEAR)
                left, top = (img.width - size) // 2, (img.height - size) // 2
                img = img.crop((left, top, left + size, top + size))
        elif img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        if self.train and "crop" in self.augment and self.augment != "imagenet":  # pad 4 (black) and crop back
            dx, dy = self.rng.randint(0, 8), self.rng.randint(0, 8)
            padded = Image.new("RGB", (size + 8, size + 8))
            padded.paste(img, (4, 4))
            img = padded.crop((dx, dy, dx + size, dy + size))
        if self.train and "flip" in self.augment and self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), label

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed random sample of ``n`` images (uint8, unaugmented) and their labels."""
        train, self.train = self.train, False
        try:
            pick = sorted(torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(0))[:n].tolist())
            pairs = [self[i] for i in pick]
        finally:
            self.train = train
        return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])

    def pixel_statistics(self, n: int = 512) -> tuple[tuple[float, ...], tuple[float, ...], int]:
        """Per-channel (mean, std) in [0, 1] over a fixed random sample of ``n`` images, unaugmented; and the count."""
        return pixel_statistics(self.sample(n)[0], n)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.rng.seed(info.seed)


class HostLoader:
    """Wraps a DataLoader of uint8 images: moves batches to the device and normalises them there."""

    def __init__(self, loader: DataLoader, sampler, device, mean, std, channels_last: bool = False, seed: int = 0):
        self.loader, self.sampler, self.device, self.seed = loader, sampler, torch.device(device), seed
        self.dataset = loader.dataset
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
        try:
            for x, y in self.loader:
                yield self.normalize(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
        except DatasetError as e:  # raised in a worker: DataLoader wraps it in the worker's traceback
            raise DatasetError(str(e).strip().splitlines()[-1].removeprefix("sparseopt.data.errors.DatasetError: ")
                               .removeprefix("DatasetError: ")) from None


def imagefolder_loader(root, train: bool, batch_size: int, *, workers: int, device, mean, std, seed: int,
                       rank: int = 0, world_size: int = 1, subset: int | None = None, channels_last: bool = False,
                       image_size: int = 224, resize: int = 256, class_to_idx: dict[str, int] | None = None,
                       name: str = "imagefolder", augment: str = "imagenet") -> HostLoader:
    """A loader over ``root/train`` or ``root/val``; its ``dataset`` has ``classes`` and ``class_to_idx``."""
    dataset = ImageFolder(root, "train" if train else "val", train, image_size=image_size, resize=resize, subset=subset,
                          class_to_idx=class_to_idx, name=name, augment=augment)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", drop_last=train, worker_init_fn=_seed_worker,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
    )
    return HostLoader(loader, sampler, device, mean, std, channels_last, seed)
