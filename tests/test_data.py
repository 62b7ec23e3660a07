import gzip
import hashlib
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from conftest import data_path, write_cifar_archive

from sparseopt.data import (
    DatasetError,
    DeviceLoader,
    load_bundled_mnist,
    load_cifar,
    load_mnist,
    subset,
)
from sparseopt.data.augment import random_crop_flip
from sparseopt.data.imagefolder import ImageFolder, random_resized_crop_box
from sparseopt.data.mnist import read_idx
from sparseopt.data.safe_pickle import safe_loads


# -- the real data in ../shared/data --------------------------------------------------
def test_real_mnist_idx():
    root = data_path("mnist")
    x, y = load_mnist(root.parent, "mnist", train=True)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert hashlib.sha256(x[0].numpy().tobytes()).hexdigest().startswith("23ceaef5eb61f0e7")
    xt, yt = load_mnist(root, "mnist", train=False)  # the folder itself works too
    assert xt.shape == (10000, 1, 28, 28) and int(yt.min()) == 0 and int(yt.max()) == 9


def test_real_cifar10_archive():
    root = data_path("cifar-10-python.tar.gz").parent
    x, y = load_cifar(root, "cifar10", train=True)
    assert x.shape == (50000, 3, 32, 32) and x.dtype == torch.uint8
    assert y.bincount().tolist() == [5000] * 10
    assert hashlib.sha256(x[0].numpy().tobytes()).hexdigest() == "adc620a782bb56f9a900a4d8066d0788d21c3072208422c0caa815d0c525daac"
    xt, yt = load_cifar(root, "cifar10", train=False)
    assert xt.shape == (10000, 3, 32, 32) and yt.bincount().tolist() == [1000] * 10


def test_bundled_mnist_is_real_mnist():
    x, y = load_bundled_mnist(train=True)
    assert x.shape == (8000, 1, 28, 28) and y[:5].tolist() == [5, 0, 4, 1, 9]
    assert hashlib.sha256(x[0].numpy().tobytes()).hexdigest().startswith("23ceaef5eb61f0e7")
    xt, yt = load_bundled_mnist(train=False)
    assert xt.shape == (2000, 1, 28, 28)


# -- CIFAR reader on archives written by the test -------------------------------------------
@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar100_reader_official_layout(tmp_path, str_keys):
    write_cifar_archive(tmp_path, "cifar100", n_train=60, n_test=20, str_keys=str_keys)
    x, y = load_cifar(tmp_path, "cifar100", train=True)
    assert x.shape == (60, 3, 32, 32) and y.dtype == torch.int64 and int(y.max()) < 100
    assert load_cifar(tmp_path, "cifar100", train=False)[0].shape == (20, 3, 32, 32)


def test_cifar_extracted_folder_and_chw_order(tmp_path):
    path = write_cifar_archive(tmp_path, "cifar10", n_train=10, n_test=5)
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "ex", filter="data")
        raw = safe_loads(tar.extractfile("cifar-10-batches-py/data_batch_1").read())
    x, _ = load_cifar(tmp_path / "ex", "cifar10", train=True)
    assert torch.equal(x[0, 1].reshape(-1), torch.from_numpy(raw[b"data"][0, 1024:2048]))  # green plane


def test_cifar_errors(tmp_path):
    with pytest.raises(DatasetError, match="cifar10 not found.*--download"):
        load_cifar(tmp_path, "cifar10")
    path = write_cifar_archive(tmp_path, "cifar10")
    path.write_bytes(path.read_bytes()[:300])  # truncated
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_cifar(tmp_path, "cifar10")
    bad = tmp_path / "bad"
    (bad / "cifar-10-batches-py").mkdir(parents=True)
    for m in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad / "cifar-10-batches-py" / m).write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"\(N, 3072\)"):
        load_cifar(bad, "cifar10")
    for m in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad / "cifar-10-batches-py" / m).write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(DatasetError, match="2 images but 1 labels"):
        load_cifar(bad, "cifar10")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_refuses_arbitrary_globals():
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        safe_loads(pickle.dumps({"data": _Evil()}))


# -- MNIST IDX -------------------------------------------------------------------------
def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root, n=12, gz=True, n_labels=None):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)), "train-labels-idx1-ubyte": rng.integers(0, 10, n_labels or n),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28)), "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4),
    }
    for name, arr in files.items():
        data = _idx(arr)
        (root / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    return files


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_raw_and_gz(tmp_path, gz):
    files = _write_mnist(tmp_path / "fashion_mnist", gz=gz)
    x, y = load_mnist(tmp_path, "fashion_mnist", train=True)
    assert x.shape == (12, 1, 28, 28)
    assert torch.equal(x[:, 0], torch.from_numpy(files["train-images-idx3-ubyte"].astype(np.uint8)))
    assert y.tolist() == files["train-labels-idx1-ubyte"].tolist()


def test_mnist_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found.*--download"):
        load_mnist(tmp_path, "mnist")
    _write_mnist(tmp_path / "mnist", n_labels=11)
    with pytest.raises(DatasetError, match="12 images but .* 11 labels"):
        load_mnist(tmp_path, "mnist")
    path = tmp_path / "trunc-idx1-ubyte"
    path.write_bytes(_idx(np.arange(10))[:-3])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(path)


def test_fashion_mnist_files_read_as_mnist_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    # a training set with Fashion-MNIST's mean pixel (0.286): sparse bright pixels on black
    images = (rng.random((100, 28, 28)) < 0.286).astype(np.uint8) * 255
    root = tmp_path / "mnist"
    root.mkdir()
    for name, arr in {"train-images-idx3-ubyte": images, "train-labels-idx1-ubyte": rng.integers(0, 10, 100)}.items():
        (root / name).write_bytes(_idx(arr))
    with pytest.raises(DatasetError, match="looks like fashion_mnist .* use --dataset fashion_mnist"):
        load_mnist(tmp_path, "mnist", train=True)
    (tmp_path / "mnist").rename(tmp_path / "fashion_mnist")
    x, _ = load_mnist(tmp_path, "fashion_mnist", train=True)  # its own name: accepted
    assert x.shape == (100, 1, 28, 28)


def test_real_mnist_passes_the_variant_check_and_skew_fashion_needs_its_files(tmp_path, capsys):
    from sparseopt.cli.main import main

    x, _ = load_mnist(data_path("mnist"), "mnist", train=True)
    assert x.float().mean().item() / 255 == pytest.approx(0.1307, abs=0.002)
    with pytest.raises(SystemExit) as stop:
        main(["skew", "--dataset", "fashion_mnist", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "--dataset fashion_mnist needs --data-dir" in capsys.readouterr().err


# -- augmentation and the device loader ---------------------------------------------------------
def test_random_crop_flip_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        windows += [w.flip(2) for w in windows]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_rate_and_determinism():
    x = torch.randn(2000, 1, 4, 4)
    a = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    b = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    assert torch.equal(a, b)
    flipped = (~(a == x).flatten(1).all(1)).float().mean().item()
    assert flipped == pytest.approx(0.5, abs=0.05)


def test_device_loader_epochs_shards_and_normalisation():
    images = torch.randint(0, 256, (103, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(103)
    kw = dict(mean=(0.5,), std=(0.25,), train=True, seed=3)
    loader = DeviceLoader(images, labels, 10, **kw)
    first = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    second = torch.cat([y for _, y in loader])
    assert len(first) == 100 and not torch.equal(first, second)  # drop_last, reshuffled per epoch
    loader.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in loader]), first)  # same epoch, same order
    x, y = next(iter(loader))
    torch.testing.assert_close(x, (images[y].float() / 255 - 0.5) / 0.25)
    shards = [torch.cat([y for _, y in DeviceLoader(images, labels, 10, rank=r, world_size=2, **kw)]) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50 and not set(shards[0].tolist()) & set(shards[1].tolist())
    test = [torch.cat([y for _, y in DeviceLoader(images, labels, 10, mean=(0.5,), std=(0.25,), train=False, rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(torch.cat(test).tolist()) == list(range(103))  # evaluation sees every example once


def test_subset_is_fixed():
    x, y = torch.arange(100)[:, None], torch.arange(100)
    a, b = subset(x, y, 10), subset(x, y, 10)
    assert torch.equal(a[1], b[1]) and len(a[1]) == 10


# -- image folders (ImageNet's layout) ---------------------------------------------------------------
def _image_folder(root, splits, size=(60, 80)):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                arr = rng.integers(0, 256, (size[0] + 10 * i, size[1], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"img{i}.JPEG")
    return root


def test_image_folder_splits_share_the_training_class_map(tmp_path):
    _image_folder(tmp_path, {"train": ["n01", "n02", "n03"], "val": ["n01", "n03"]}, size=(300, 400))
    train = ImageFolder(tmp_path, "train", train=True)
    assert train.classes == ["n01", "n02", "n03"] and len(train) == 6
    x, label = train[3]
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8 and label == 1
    # val lacks n02: n03 keeps label 2 (numbering val's own folders would have made it 1)
    val = ImageFolder(tmp_path, "val", train=False, class_to_idx=train.class_to_idx)
    assert sorted({label for _, label in val.samples}) == [0, 2] and val.missing_classes == ["n02"]
    v, _ = val[0]
    assert v.shape == (3, 224, 224)
    small = ImageFolder(tmp_path, "val", train=False, image_size=32, resize=40, class_to_idx=train.class_to_idx)
    assert small[0][0].shape == (3, 32, 32)
    (tmp_path / "val" / "n99").mkdir()
    (tmp_path / "val" / "n01" / "img0.JPEG").rename(tmp_path / "val" / "n99" / "img0.JPEG")
    with pytest.raises(DatasetError, match=r"class folders the training split does not have: \['n99'\]"):
        ImageFolder(tmp_path, "val", train=False, class_to_idx=train.class_to_idx)
    with pytest.raises(DatasetError, match="train/<class>/\\*.JPEG"):
        ImageFolder(tmp_path / "nothing", "train", train=True)


def test_folder_dataset_run_counts_its_classes(tmp_path, capsys):
    from sparseopt.cli.main import main

    _image_folder(tmp_path / "data", {"train": [f"c{i}" for i in range(10)], "val": [f"c{i}" for i in range(9)]})
    common = ["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--model", "resnet20",
              "--image-size", "32", "--batch-size", "4", "--eval-batch-size", "8", "--epochs", "1", "--quiet",
              "--no-compare-optimizers", "--workers", "0", "--dst", "static", "--sparsity", "0.5"]
    assert main([*common, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "imagefolder: 10 classes from" in out and "WARNING: 1 training class has no validation folder" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["num_classes"] == 10 and results["run_name"].startswith("imagefolder-resnet20")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["model"]["fc.weight"].shape[0] == 10  # not a 1000-way head
    assert main([*common, "--num-classes", "12", "--out", str(tmp_path / "wide")]) == 0
    assert torch.load(tmp_path / "wide" / "checkpoint.pt", weights_only=True)["model"]["fc.weight"].shape[0] == 12
    assert main([*common, "--num-classes", "5", "--out", str(tmp_path / "narrow")]) == 2
    assert "--num-classes 5 is fewer than the 10 classes" in capsys.readouterr().err
    assert main([*common, "--dataset", "imagenet", "--out", str(tmp_path / "inet")]) == 2
    assert "has 10 class folders, ImageNet has 1000; use --dataset imagefolder" in capsys.readouterr().err


def test_random_resized_crop_box_bounds():
    import random

    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(500, 375, rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 500 * 375 * 0.99 <= w * h or (w, h) == (500, 375)
