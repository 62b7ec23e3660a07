"""Batched augmentation on the training device (whole batches, not image by image)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Training augmentation presets (--augment): what each does to a training image.
AUGMENTS = {
    "none": "no augmentation",
    "flip": "horizontal flip with probability 1/2",
    "crop": "zero-pad by 4 pixels and crop back at a random offset",
    "crop_flip": "pad-4 random crop and horizontal flip (the CIFAR recipe)",
    "imagenet": "random-resized crop (scale 0.08-1, aspect 3/4-4/3) and horizontal flip (the ImageNet recipe; folders only)",
}


def crop_and_flip(preset: str) -> tuple[int, bool]:
    """(padding, flip) of a preset for datasets held as tensors (``imagenet`` needs decoded images)."""
    if preset not in AUGMENTS or preset == "imagenet":
        raise ValueError(f"augment {preset!r} is not one of the tensor presets {[a for a in AUGMENTS if a != 'imagenet']}")
    return (4 if "crop" in preset else 0), ("flip" in preset)


def draw_crop_flip(n: int, generator: torch.Generator, padding: int = 4, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop offsets ``(2, n)`` and flip flags ``(n,)`` from a CPU generator (device-independent results)."""
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets.to(device), flips.to(device)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4, flip: bool = True,
                     draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Standard CIFAR augmentation for a batch ``(N, C, H, W)``: zero-pad by
    ``padding``, crop back to ``H x W`` at a random offset per image, and flip
    horizontally with probability 1/2. The random numbers are ``draws`` (from
    :func:`draw_crop_flip`, e.g. drawn once per epoch) or drawn from ``generator``."""
    n, c, h, w = x.shape
    offsets, flips = draws if draws is not None else draw_crop_flip(n, generator, padding, x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    if flip:
        out = torch.where(flips[:, None, None, None], out.flip(3), out)
    return out


def pixel_statistics(images: torch.Tensor, n: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per-channel (mean, std) in [0, 1] of the first ``n`` images of a uint8 (N, C, H, W) tensor, and the count."""
    x = images[:n].double() / 255.0
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist()), x.shape[0]


class Normalize:
    """uint8-range pixels -> ``(x / 255 - mean) / std`` on the device, optionally channels-last.

    Shared by the on-device loader and the ImageNet loader, so both feed the model the same way.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device, channels_last: bool = False):
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=device).reshape(shape) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).reshape(shape) * 255.0)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) * self.inv_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
