"""A loader for datasets held whole on the training device as uint8 tensors.

Each epoch's order and augmentation come from generators seeded with
``(seed, epoch)``, so an epoch is the same whether or not the run was resumed.
In a distributed run each rank takes every ``world_size``-th index of the same
permutation (a disjoint shard of equal size).
"""

from __future__ import annotations

import torch

from .augment import Normalize, crop_and_flip, draw_crop_flip, random_crop_flip


class DeviceLoader:
    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        augment: str | bool = "none",
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        channels_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        preset = {True: "crop_flip", False: "none"}.get(augment, augment) if isinstance(augment, bool) else augment
        self.padding, self.flip = crop_and_flip(preset)  # --augment: none, flip, crop, crop_flip
        self.augment = train and preset != "none"
        self.seed = seed
        self.train = train
        self.rank, self.world_size = rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.normalize = Normalize(mean, std, self.device, channels_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order = order[self.rank :: self.world_size]
        if self.train:  # equal shard sizes keep the ranks' step counts in lockstep
            order = order[: n // self.world_size]
        # evaluation: disjoint shards covering every example once (sums are reduced over ranks)
        return order.to(self.device)

    @property
    def num_samples(self) -> int:
        """This rank's examples per epoch (the size of ``_indices()``, without drawing a permutation)."""
        n = self.images.shape[0]
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self._indices()
        if self.augment:  # the epoch's random numbers in one host-to-device copy, not one per batch
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919)
            offsets, flips = draw_crop_flip(len(order), g, device=self.device)  # the same draws for every preset
            if not self.padding:
                offsets.zero_()
        for i in range(len(self)):
            batch = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[batch]
            x = self.images[idx].float()
            if self.augment:  # on raw pixels, so the padding is black as in the standard recipe
                x = random_crop_flip(x, padding=self.padding, flip=self.flip, draws=(offsets[:, batch], flips[batch]))
            x = self.normalize(x)
            yield x, self.labels[idx]
