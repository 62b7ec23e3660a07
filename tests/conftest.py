"""Shared fixtures: small models, seeded batches, the optional real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

# The shared data folder sits beside the checkout (../shared/data); CI gets a copy there too.
DATA_DIR = Path(os.environ.get("SPARSEOPT_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


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
