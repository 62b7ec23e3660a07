"""From a config to the run's train and test loaders, and the number of classes the model needs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..data import (
    CLASS_NAMES,
    DATASETS,
    FOLDER_DATASETS,
    DatasetError,
    DeviceLoader,
    download_dataset,
    imagefolder_loader,
    load_tensors,
    subset,
)
from .config import TrainConfig
from .distributed import DistEnv

IMAGENET_CLASSES = 1000


@dataclass
class RunData:
    train: object
    test: object
    num_classes: int
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None  # label index -> name, where known


def default_workers(env: DistEnv) -> int:
    """Decoding workers per rank when ``--workers`` is not given: the CPUs shared by the local ranks, at most 8."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local_ranks) - 1))


def image_sizes(cfg: TrainConfig) -> tuple[int, int]:
    """(crop size, resize size) of a folder dataset: 224 / 256 unless given; the resize keeps ImageNet's 256/224."""
    size = cfg.image_size or 224
    return size, cfg.resize_size or round(size * 256 / 224)


def num_classes(cfg: TrainConfig, found: int | None = None) -> int:
    """The model's output count: the dataset's, or the training folder's; ``--num-classes`` overrides, checked."""
    known = found if found is not None else DATASETS[cfg.dataset].num_classes
    if cfg.num_classes is None:
        return known
    if cfg.num_classes < known:
        raise ValueError(f"--num-classes {cfg.num_classes} is fewer than the {known} classes of the {cfg.dataset} "
                         "training data: labels would fall outside the model's outputs")
    return cfg.num_classes


def make_loaders(cfg: TrainConfig, device: torch.device, env: DistEnv) -> RunData:
    info = DATASETS[cfg.dataset]
    batch = cfg.batch_size // env.world_size
    common = dict(mean=info.mean, std=info.std, seed=cfg.seed, device=device, rank=env.rank,
                  world_size=env.world_size, channels_last=cfg.channels_last)
    if cfg.dataset in FOLDER_DATASETS:
        return _folder_loaders(cfg, batch, common, env)
    if cfg.download and env.is_main:
        download_dataset(cfg.dataset, cfg.data_dir)
    if env.enabled:
        torch.distributed.barrier()
    xtr, ytr = subset(*load_tensors(cfg.dataset, cfg.data_dir, train=True), cfg.train_subset)
    xte, yte = subset(*load_tensors(cfg.dataset, cfg.data_dir, train=False), cfg.test_subset)
    train = DeviceLoader(xtr, ytr, batch, train=True, augment=info.augment, **common)
    test = DeviceLoader(xte, yte, cfg.eval_batch_size, train=False, **common)
    if len(train) == 0:
        raise ValueError(f"the training set has {train.num_samples} examples per rank, fewer than one batch of {batch}")
    return RunData(train, test, num_classes(cfg), class_names=CLASS_NAMES.get(cfg.dataset))


def _folder_loaders(cfg: TrainConfig, batch: int, common: dict, env: DistEnv) -> RunData:
    size, resize = image_sizes(cfg)
    workers = cfg.workers if cfg.workers is not None else default_workers(env)
    kw = dict(workers=workers, image_size=size, resize=resize, name=cfg.dataset, **common)
    train = imagefolder_loader(cfg.data_dir, True, batch, subset=cfg.train_subset, **kw)
    classes = train.dataset.class_to_idx  # one map, from the training folder; val uses it
    if cfg.dataset == "imagenet" and len(classes) != IMAGENET_CLASSES:
        raise DatasetError(f"imagenet: {cfg.data_dir}/train has {len(classes)} class folders, ImageNet has "
                           f"{IMAGENET_CLASSES}; use --dataset imagefolder for other folder datasets")
    test = imagefolder_loader(cfg.data_dir, False, cfg.eval_batch_size, subset=cfg.test_subset, class_to_idx=classes, **kw)
    notes = [f"{cfg.dataset}: {len(classes)} classes from {cfg.data_dir}/train, images {size}px (resize {resize}), "
             f"{workers} decoding workers"]
    missing = test.dataset.missing_classes
    if missing:
        notes.append(f"WARNING: {len(missing)} training classes have no validation folder "
                     f"({missing[:5]}{' ...' if len(missing) > 5 else ''}); their labels are unchanged")
    if len(train) == 0:
        raise ValueError(f"the training set has {train.num_samples} examples per rank, fewer than one batch of {batch}")
    return RunData(train, test, num_classes(cfg, len(classes)), notes, class_names=list(train.dataset.classes))
