"""Build sparseopt/data/bundled/mnist_subset.npz from the real MNIST IDX files.

    python scripts/make_bundled_mnist.py ../shared/data/mnist

Takes the first 8,000 training and first 2,000 test images (original order),
stored as compressed uint8.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparseopt.data.mnist import load_mnist  # noqa: E402

N_TRAIN, N_TEST = 8000, 2000

root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mnist")
xtr, ytr = load_mnist(root, "mnist", train=True)
xte, yte = load_mnist(root, "mnist", train=False)
out = Path(__file__).resolve().parents[1] / "sparseopt" / "data" / "bundled" / "mnist_subset.npz"
np.savez_compressed(
    out,
    train_images=xtr[:N_TRAIN, 0].numpy(),
    train_labels=ytr[:N_TRAIN].numpy().astype(np.uint8),
    test_images=xte[:N_TEST, 0].numpy(),
    test_labels=yte[:N_TEST].numpy().astype(np.uint8),
)
print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MB)")
