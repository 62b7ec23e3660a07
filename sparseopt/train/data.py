"""From a config to the run's train and test loaders, and the number of classes the model needs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

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
from ..data.augment import AUGMENTS, Normalize, pixel_statistics
from ..data.imagefolder import shared_image_size
from ..messages import plural
from .config import TrainConfig
from .distributed import DistEnv
from .spec import DataSection

IMAGENET_CLASSES = 1000


@dataclass
class RunData:
    train: object
    test: object
    num_classes: int
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None  # label index -> name, where known
    facts: dict[str, Any] = field(default_factory=dict)  # augmentation and normalization, recorded in env.json

    def __post_init__(self):
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            self.class_names = None  # --num-classes added outputs that have no name


def default_workers(env: DistEnv) -> int:
    """Decoding workers per rank when ``--workers`` is not given: the CPUs shared by the local ranks, at most 8."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local_ranks) - 1))


DEFAULT_IMAGE_SIZE = 224


def with_folder_image_size(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """A folder dataset without ``--image-size`` trains at its images' own size when they share one below 224.

    Upscaling 28-pixel characters to 224 built a 38.6M-weight MLP and ran ImageNet's augmentation on them
    (85.5% where their own size gave 89.6%, issue 28). The size is resolved into the config, so config.yaml
    records it and a resume sees the same.
    """
    if cfg.image_size is not None or cfg.dataset not in FOLDER_DATASETS or cfg.data_dir is None:
        return cfg, []
    shared = shared_image_size(cfg.data_dir)
    if shared is None or max(shared) >= DEFAULT_IMAGE_SIZE:
        return cfg, []
    size = max(shared)
    return replace(cfg, image_size=size), [f"{cfg.dataset}: the training images are {shared[0]}x{shared[1]}: trained at "
                                           f"their own size, {size}px, not {DEFAULT_IMAGE_SIZE} (--image-size to change)"]


def image_sizes(data: DataSection) -> tuple[int, int]:
    """(crop size, resize size) of a folder dataset: 224 / 256 unless given; the resize keeps ImageNet's 256/224."""
    size = data.image_size or DEFAULT_IMAGE_SIZE
    return size, data.resize_size or round(size * 256 / 224)


def num_classes(data: DataSection, found: int | None = None) -> int:
    """The model's output count: the dataset's, or the training folder's; ``--num-classes`` overrides, checked."""
    known = found if found is not None else DATASETS[data.dataset].num_classes
    if data.num_classes is None:
        return known
    if data.num_classes < known:
        raise ValueError(f"--num-classes {data.num_classes} is fewer than the {known} classes of the {data.dataset} "
                         "training data: labels would fall outside the model's outputs")
    return data.num_classes


# Below this crop size a folder's images are small (digits, characters, CIFAR-like): ImageNet's recipe is
# not theirs, and neither is CIFAR's flip for characters. Measured on MNIST as a folder (MLP, RigL 90%, 8 epochs,
# 2 seeds; scripts/folder_augmentation.sh): none 93.5%, imagenet 93.0%, crop_flip 84.9%: small images get none.
SMALL_IMAGES = 96


def augment_preset(data: DataSection) -> str:
    """The ``--augment`` preset of the run (``auto``: the dataset's own; folders: ImageNet's, or none when small)."""
    if data.augment != "auto":
        return data.augment
    known = DATASETS[data.dataset].augment
    return known if known is not None else ("imagenet" if image_sizes(data)[0] >= SMALL_IMAGES else "none")


def normalize_mode(data: DataSection) -> str:
    """``--normalize`` (``auto``: the named dataset's statistics; a generic folder's own, computed)."""
    if data.normalize != "auto":
        return data.normalize
    return "computed" if data.dataset == "imagefolder" else "dataset"


def statistics_note(data: DataSection, mean, std) -> str | None:
    """A warning when data read as a named dataset does not have its statistics (another dataset in its format)."""
    info = DATASETS[data.dataset]
    # A mean 0.02 away (MNIST 0.131, KMNIST 0.19) or a std 8% away; two datasets of one format differ by more.
    off = max(max(abs(a - b) for a, b in zip(mean, info.mean)), max(abs(a - b) / b for a, b in zip(std, info.std)) / 4)
    if off < 0.02:
        return None
    fmt = lambda v: "/".join(f"{x:.3f}" for x in v)  # noqa: E731
    return (f"WARNING: the {data.dataset} training images in {data.data_dir} have mean {fmt(mean)} and std {fmt(std)}, "
            f"{data.dataset}'s are {fmt(info.mean)} and {fmt(info.std)}: they look like another dataset in the same "
            "format, normalised here with the wrong statistics; --normalize computed uses their own")


def subset_note(data: DataSection, found: int) -> str | None:
    if data.train_subset is not None and data.train_subset > found:
        return (f"--train-subset {data.train_subset} is more than the {found} training examples of {data.dataset}: "
                f"all {found} are used")
    return None


def normalization(data: DataSection, measured) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, Any]]:
    """(mean, std, record) that the run normalises with; ``measured()`` gives the training data's own."""
    info, mode = DATASETS[data.dataset], normalize_mode(data)
    if mode == "dataset":
        mean, std = info.mean, info.std
        record = {"normalize": mode, "mean": list(mean), "std": list(std)}
    elif mode == "none":
        mean, std = (0.0,) * len(info.mean), (1.0,) * len(info.std)
        record = {"normalize": mode}
    else:
        mean, std, count = measured()
        record = {"normalize": mode, "mean": list(mean), "std": list(std), "computed_from_images": count}
    return tuple(mean), tuple(std), record


def describe(data: DataSection, augment: str, record: dict[str, Any]) -> str:
    """The log line saying which augmentation and normalization the run uses."""
    stats = "" if "mean" not in record else " (mean {}, std {})".format(
        "/".join(f"{v:.4f}" for v in record["mean"]), "/".join(f"{v:.4f}" for v in record["std"]))
    source = {"dataset": f"{data.dataset}'s statistics", "computed": "computed from the training images",
              "none": "pixels / 255 only"}[record["normalize"]]
    return f"data: augmentation {augment} ({AUGMENTS[augment]}); normalization {source}{stats}"


def make_loaders(data: DataSection, device: torch.device, env: DistEnv) -> RunData:
    batch = data.batch_size // env.world_size
    common = dict(seed=data.seed, device=device, rank=env.rank, world_size=env.world_size, channels_last=data.channels_last)
    if data.dataset in FOLDER_DATASETS:
        return _folder_loaders(data, batch, common, env)
    if data.download and env.is_main:
        download_dataset(data.dataset, data.data_dir)
    if env.enabled:
        torch.distributed.barrier()
    images, labels = load_tensors(data.dataset, data.data_dir, train=True)
    notes = [n for n in (subset_note(data, len(labels)),
                         statistics_note(data, *pixel_statistics(images)[:2]) if data.dataset != "bundled_mnist" else None) if n]
    xtr, ytr = subset(images, labels, data.train_subset)
    xte, yte = subset(*load_tensors(data.dataset, data.data_dir, train=False), data.test_subset)
    mean, std, record = normalization(data, lambda: pixel_statistics(xtr))
    augment = augment_preset(data)
    train = DeviceLoader(xtr, ytr, batch, train=True, augment=augment, mean=mean, std=std, **common)
    test = DeviceLoader(xte, yte, data.eval_batch_size, train=False, mean=mean, std=std, **common)
    if len(train) == 0:
        raise ValueError(f"the training set has {train.num_samples} examples per rank, fewer than one batch of {batch}")
    return RunData(train, test, num_classes(data), [describe(data, augment, record), *notes],
                   class_names=CLASS_NAMES.get(data.dataset), facts={"augment": augment, **record})


def _folder_loaders(data: DataSection, batch: int, common: dict, env: DistEnv) -> RunData:
    size, resize = image_sizes(data)
    workers = data.workers if data.workers is not None else default_workers(env)
    augment = augment_preset(data)
    kw = dict(workers=workers, image_size=size, resize=resize, name=data.dataset, augment=augment, **common)
    info = DATASETS[data.dataset]
    train = imagefolder_loader(data.data_dir, True, batch, subset=data.train_subset, mean=info.mean, std=info.std, **kw)
    mean, std, record = normalization(data, train.dataset.pixel_statistics)
    train.normalize = Normalize(mean, std, train.device, data.channels_last)
    classes = train.dataset.class_to_idx  # one map, from the training folder; val uses it
    if data.dataset == "imagenet" and len(classes) != IMAGENET_CLASSES:
        raise DatasetError(f"imagenet: {data.data_dir}/train has {len(classes)} class folders, ImageNet has "
                           f"{IMAGENET_CLASSES}; use --dataset imagefolder for other folder datasets")
    test = imagefolder_loader(data.data_dir, False, data.eval_batch_size, subset=data.test_subset, class_to_idx=classes,
                              mean=mean, std=std, **kw)
    notes = [f"{data.dataset}: {plural(len(classes), 'class')} from {data.data_dir}/train, images {size}px "
             f"(resize {resize}), {plural(workers, 'decoding worker')}", describe(data, augment, record)]
    notes += [n for n in (subset_note(data, train.dataset.total),) if n]
    missing = test.dataset.missing_classes
    if missing:
        notes.append(f"WARNING: {plural(len(missing), 'training class', 'training classes')} "
                     f"{'has' if len(missing) == 1 else 'have'} no validation folder "
                     f"({missing[:5]}{' ...' if len(missing) > 5 else ''}); their labels are unchanged")
    if len(train) == 0:
        raise ValueError(f"the training set has {train.num_samples} examples per rank, fewer than one batch of {batch}")
    return RunData(train, test, num_classes(data, len(classes)), notes, class_names=list(train.dataset.classes),
                   facts={"augment": augment, **record})
