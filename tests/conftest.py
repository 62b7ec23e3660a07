"""Shared fixtures: small models, seeded batches, the optional real-data folder."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch
from torch import nn

# The shared data folder sits beside the checkout (../shared/data); CI gets a copy there too.
# sparseopt.memory works through glibc's mallopt; elsewhere reuse_freed_memory() returns False
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
DATA_DIR = Path(os.environ.get("SPARSEOPT_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def fresh_backend(monkeypatch):
    """Each test reads the environment it sets; the process's loaded kernel library is restored afterwards."""
    from sparseopt.native import build

    build.reset()
    yield monkeypatch
    monkeypatch.undo()
    build.reset()


@pytest.fixture
def native(fresh_backend):
    """The compiled kernels, or skip with the reason (CI has a compiler, so there they are built and tested)."""
    from sparseopt.native import build

    backend, lib = build.load(warn=False)
    if lib is None:
        pytest.skip(f"compiled kernels unavailable here: {backend.reason}")
    return backend


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's scale (at least 1): fp32 kernels against torch's."""
    y, reference = y.detach(), reference.detach()
    return float((y - reference).abs().max()) / max(1.0, float(reference.abs().max())) if reference.numel() else 0.0


def use_simd_path(monkeypatch, path: str):
    """The kernels capped at ``path`` (SPARSEOPT_SIMD), or skip with the reason; the backend."""
    from sparseopt.native import build

    monkeypatch.setenv("SPARSEOPT_SIMD", path)
    backend, lib = build.load(warn=False)
    if lib is None:
        pytest.skip(f"compiled kernels unavailable here: {backend.reason}")
    return backend


def simd_paths() -> list[str]:
    """The SIMD paths this CPU runs (each kernel test runs on all of them)."""
    from sparseopt.native import build

    build.reset()
    backend, lib = build.load(warn=False)
    build.reset()
    best = backend.best_path if lib is not None else "portable"
    return [p for p in build.PATHS if build.PATHS.index(p) <= build.PATHS.index(best)]


def random_conv_case(g: torch.Generator, density: float | None = None, *, max_stride: int = 2,
                     pad_below_kernel: bool = False):
    """``(weight, mask, x, bias, stride, pad)`` of a random Conv2d case for the kernel tests.

    Kernels 1/3/5/7, strides up to ``max_stride``, paddings 0-3 (below the kernel size with
    ``pad_below_kernel``: what a transposed convolution needs), batches 1-33, widths off the vector
    tile, 1x1 and 7x7 maps, and (for densities strictly between 0 and 1) an empty output row.
    """
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    k = (1, 3, 5, 7)[r(0, 3)]
    stride, pad = r(1, max_stride), r(0, k - 1 if pad_below_kernel else 3)
    c, o, n = r(1, 24), r(1, 40), r(1, 33 if r(0, 3) == 0 else 4)
    low = max(1, k - 2 * pad)
    h, w = r(low, low + 17), r(low, low + 19)  # 1x1 and 7x7 maps among them; widths off the vector tile
    density = float(torch.rand(1, generator=g)) if density is None else density
    weight = torch.randn(o, c, k, k, generator=g)
    mask = torch.rand(o, c, k, k, generator=g) < density
    if o > 2 and density not in (0.0, 1.0):
        mask[r(0, o - 1)] = False  # an empty row: the output is the bias alone
    return weight, mask, torch.randn(n, c, h, w, generator=g), torch.randn(o, generator=g), stride, pad


def data_path(*parts: str) -> Path:
    """Path inside the real-data folder, or skip the test with the reason."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set SPARSEOPT_TEST_DATA to the folder holding mnist/ and cifar-10-python.tar.gz)")
    return path


class SmallConvNet(nn.Module):
    """conv-BN-ReLU x2 + a Linear head: every kind of layer the library treats specially."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return SmallConvNet()


def batches(n: int, batch: int = 16, seed: int = 0, shape=(3, 8, 8), classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch, *shape), generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def write_cifar_archive(root: Path, name: str = "cifar10", n_train: int = 100, n_test: int = 50, seed: int = 0,
                        str_keys: bool = False) -> Path:
    """Write a small archive in the official CIFAR layout (python pickles inside a .tar.gz)."""
    import io
    import pickle
    import tarfile

    import numpy as np

    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n):
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: rng.integers(0, classes, n).tolist()}
        if name == "cifar100":
            d["coarse_labels"] = [x // 5 for x in d[label_key]]
        if not str_keys:  # the official archives are python-2 pickles: keys decode as bytes
            d = {k.encode(): v for k, v in d.items()}
        return pickle.dumps(d, protocol=2)

    members = (
        {f"data_batch_{i}": batch(n_train // 5) for i in range(1, 6)} | {"test_batch": batch(n_test)}
        if name == "cifar10" else {"train": batch(n_train), "test": batch(n_test), "meta": pickle.dumps({})}
    )
    root.mkdir(parents=True, exist_ok=True)
    path = root / ("cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for member, blob in members.items():
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path
