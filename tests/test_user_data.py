"""Data and the command line as users have them (issue 20): augmentation and normalization they choose,
folders with hidden or empty classes and broken images, other datasets in a known format, flags on the
default job, sweeps that are stopped, one-line messages."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseopt.cli.main import main
from sparseopt.data import DeviceLoader
from sparseopt.data.imagefolder import ImageFolder

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--epochs", "1", "--quiet", "--no-compare-optimizers", "--batch-size", "8", "--eval-batch-size", "16"]


def png_folder(root: Path, classes: dict[str, int], size: int = 28, seed: int = 0, splits=("train", "val")) -> Path:
    """Small grayscale-looking images (white strokes on black, as KMNIST), ``classes[name]`` per class and split."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(seed)
    for split in splits:
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                arr = np.zeros((size, size), dtype=np.uint8)
                arr[rng.integers(0, size, 40), rng.integers(0, size, 40)] = 255
                Image.fromarray(arr).convert("RGB").save(root / split / name / f"{i}.png")
    return root


def run_json(folder: Path, name: str):
    return json.loads((folder / name).read_text())


# -- 4: --augment and --normalize ------------------------------------------------------------------------------
def test_tensor_presets_do_what_they_say():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6) % 97
    labels = torch.tensor([0, 1])

    def epoch(augment):
        loader = DeviceLoader(images, labels, 2, mean=(0.0,), std=(1 / 255,), train=True, augment=augment, seed=3)
        return next(iter(loader))[0]

    plain = epoch("none")
    order = next(iter(DeviceLoader(images, labels, 2, mean=(0.0,), std=(1 / 255,), train=True, seed=3)))[1]
    assert torch.equal(plain, images[order].float())  # none: the images themselves
    flipped = epoch("flip")
    assert all(torch.equal(f, p) or torch.equal(f, p.flip(2)) for f, p in zip(flipped, plain))
    cropped = epoch("crop")
    assert not torch.equal(cropped, plain) and not any(torch.equal(c, p.flip(2)) and not torch.equal(c, p)
                                                       for c, p in zip(cropped, plain))
    assert torch.equal(epoch("crop_flip"), epoch(True))  # the old switch is the CIFAR preset, draw for draw
    with pytest.raises(ValueError, match="not one of the tensor presets"):
        DeviceLoader(images, labels, 2, mean=(0.0,), std=(1.0,), train=True, augment="imagenet")


def test_folder_of_small_images_gets_small_image_defaults_and_computed_statistics(tmp_path, capsys):
    data = png_folder(tmp_path / "kmnist", {str(i): 4 for i in range(3)})
    out = tmp_path / "run"
    args = ["train", "--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "28", "--workers", "0",
            "--model", "mlp", *QUICK, "--out", str(out)]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "data: augmentation none (no augmentation); normalization computed from the training images (mean 0." in said
    facts = run_json(out, "env.json")["data"]
    images = torch.stack([ImageFolder(data, "train", train=False, image_size=28, augment="none")[i][0] for i in range(12)])
    assert facts["normalize"] == "computed" and facts["computed_from_images"] == 12
    assert facts["mean"][0] == pytest.approx(images.double().mean().item() / 255, abs=1e-9)
    # evaluation reads a small image whole (no 256/224 resize-and-crop that cuts its border off)
    val = ImageFolder(data, "val", train=False, image_size=28, augment="crop_flip")  # evaluation: never augmented
    from PIL import Image

    path, _ = val.samples[0]
    assert torch.equal(val[0][0], torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
    for augment, normalize in (("none", "none"), ("crop", "dataset"), ("imagenet", "computed")):
        o = tmp_path / f"{augment}-{normalize}"
        assert main([*args[:-2], "--augment", augment, "--normalize", normalize, "--out", str(o)]) == 0
        facts = run_json(o, "env.json")["data"]
        assert facts["augment"] == augment and facts["normalize"] == normalize
    assert run_json(tmp_path / "crop-dataset", "env.json")["data"]["mean"] == [0.485, 0.456, 0.406]  # ImageNet's


def test_imagenet_augmentation_is_refused_for_tensor_datasets(capsys, tmp_path):
    assert main(["train", "--augment", "imagenet", *QUICK, "--out", str(tmp_path / "r")]) == 2
    assert "augment=imagenet (random-resized crops of decoded images) is for image folders" in capsys.readouterr().err


# -- 5, 6: hidden and empty class folders, corrupt images ---------------------------------------------------------
def test_hidden_folders_are_not_classes_and_empty_classes_are_refused(tmp_path, capsys):
    data = png_folder(tmp_path / "d", {"a": 3, "b": 3})
    (data / "train" / ".ipynb_checkpoints").mkdir()
    (data / "train" / ".ipynb_checkpoints" / "x.png").write_bytes((data / "train" / "a" / "0.png").read_bytes())
    assert ImageFolder(data, "train", train=True).classes == ["a", "b"]
    (data / "train" / "c").mkdir()
    (data / "train" / "c" / "notes.txt").write_text("no images here")
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "28", "--workers", "0",
                 *QUICK, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: imagefolder: class folder {data / 'train' / 'c'} has no images (.jpeg, .jpg, .png); "
                   "remove it or put its images in it"]


def test_a_corrupt_image_is_one_line_and_the_same_command_runs_once_it_is_fixed(tmp_path, capsys):
    data = png_folder(tmp_path / "d", {"a": 8, "b": 8})
    bad = data / "train" / "b" / "3.png"
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    args = ["train", "--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "28", "--workers", "1",
            *QUICK, "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot decode image {bad} (") and "remove or replace it" in err[0]
    bad.write_bytes(good)
    assert main(args) == 0  # the folder of the failed start is accepted again by the same command


# -- 7, 9: another dataset in a known format; a subset larger than the data ---------------------------------------
def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, train: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = "train" if train else "t10k"
    head = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + images.tobytes()))
    head = bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big")
    (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(head + labels.astype(np.uint8).tobytes()))


def test_idx_files_of_another_dataset_are_named_and_a_large_subset_is_reported(tmp_path, capsys):
    rng = np.random.default_rng(0)
    # KMNIST-like: mean pixel about 0.19 and a larger spread than MNIST's
    images = (rng.random((300, 28, 28)) < 0.24).astype(np.uint8) * 200
    write_idx(tmp_path / "k", images, rng.integers(0, 10, 300), True)
    write_idx(tmp_path / "k", images[:100], rng.integers(0, 10, 100), False)
    args = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "k"), *QUICK, "--train-subset", "100000"]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    said = capsys.readouterr().out
    assert f"WARNING: the mnist training images in {tmp_path / 'k'} have mean 0.188 and std 0.3" in said
    assert "mnist's are 0.131 and 0.308: they look like another dataset in the same format" in said
    assert "--train-subset 100000 is more than the 300 training examples of mnist: all 300 are used" in said
    assert not said.count("note: WARNING")  # a warning is printed as a warning, not as a note
    assert main([*args, "--normalize", "computed", "--out", str(tmp_path / "c")]) == 0
    assert run_json(tmp_path / "c", "env.json")["data"]["mean"][0] == pytest.approx(images.mean() / 255, abs=1e-9)


def test_real_mnist_passes_the_statistics_check(capsys, tmp_path):
    from conftest import data_path

    mnist = data_path("mnist")
    assert main(["train", "--dataset", "mnist", "--data-dir", str(mnist), *QUICK, "--train-subset", "256",
                 "--test-subset", "128", "--out", str(tmp_path / "r")]) == 0
    assert "look like another dataset" not in capsys.readouterr().out


# -- 8: class names and map ----------------------------------------------------------------------------------------
def test_class_names_and_map_are_in_results_and_checkpoint(tmp_path):
    data = png_folder(tmp_path / "d", {"cat": 4, "dog": 4})
    out = tmp_path / "r"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "28", "--workers", "0",
                 *QUICK, "--out", str(out)]) == 0
    results = run_json(out, "results.json")
    assert results["class_names"] == ["cat", "dog"] and results["class_to_index"] == {"cat": 0, "dog": 1}
    assert torch.load(out / "checkpoint.pt", weights_only=True)["class_names"] == ["cat", "dog"]


# -- 10: skew on any dataset, with progress lines when piped ------------------------------------------------------
def test_skew_reads_any_dataset_and_prints_progress_when_piped(tmp_path):
    data = png_folder(tmp_path / "d", {str(i): 6 for i in range(3)}, splits=("train",))
    proc = subprocess.run([sys.executable, "-m", "sparseopt", "skew", "--dataset", "imagefolder", "--data-dir", str(data),
                           "--image-size", "12", "--sparsities", "0.5", "--inits", "1", "--batches", "2", "--batch-size",
                           "6", "--norm", "batchnorm", "--out", str(tmp_path / "skew")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "skew: imagefolder, 18 training images of 432 inputs" in lines
    assert "skew: 1/2 (50%)" in lines and "skew: 2/2 (100%)" in lines
    assert json.loads((tmp_path / "skew" / "skew.json").read_text())["ratios"][0]["norm"] == "batchnorm"


# -- 11: the default job, in one sentence ------------------------------------------------------------------------
def test_train_is_one_run_and_demo_is_the_comparison(tmp_path, monkeypatch, capsys):
    """A flags-only `sparseopt train` was one run or two by a list of keys (issue 28). Now `sparseopt train` is
    one run (the pair only with --compare-optimizers) and `sparseopt demo` is the default job's comparison."""
    import argparse

    from sparseopt.cli import main as main_mod
    from sparseopt.cli.train_args import add_config_flags, parse_train_args

    def parsed(*argv):
        parser = argparse.ArgumentParser()
        add_config_flags(parser)
        return parse_train_args(parser, list(argv))

    for flags in ([], ["--epochs", "3", "--seed", "2"], ["--optimizer", "sgd"], ["--dst", "set"]):
        cfg = parsed(*flags)
        assert not cfg.compare_optimizers and cfg.out is None, flags  # one run, in runs/<run name>
    assert parsed("--optimizer", "sgd", "--compare-optimizers").compare_optimizers
    seen = []
    monkeypatch.setattr("sparseopt.train.compare.compare", lambda cfg, argv: seen.append((cfg, argv)))
    assert main_mod.main(["demo", "--epochs", "2"]) == 0
    cfg, argv = seen[0]
    assert cfg.compare_optimizers and cfg.out == "runs/default" and cfg.epochs == 2 and argv[:2] == ["sparseopt", "demo"]
    assert main_mod.main(["demo", "--no-compare-optimizers"]) == 2
    assert "sparseopt demo is the comparison" in capsys.readouterr().err


# -- 12: a sweep stopped by SIGTERM; warnings in the sweep's output -----------------------------------------------
def test_a_stopped_sweep_is_not_failed_and_shows_its_runs_warnings(tmp_path):
    import yaml

    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "fixed": {"epochs": 40, "train_subset": 2048, "quiet": True},
                                     "grid": {"sparsity": [0.8, 0.9]}, "seeds": [0]}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sparseopt", "sweep", str(sweep), "--out", str(tmp_path / "o")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.time()
    while not list((tmp_path / "o").glob("*/checkpoint.pt")) and time.time() - start < 120:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped (resumable)" in out and "FAILED" not in out and "failed" not in out
    assert "[sweep] stopped by SIGTERM: 1 run(s) interrupted with their checkpoints kept, 1 not started" in out
    short = tmp_path / "w.yaml"
    short.write_text(yaml.safe_dump({"name": "w", "fixed": {"epochs": 1, "train_subset": 512, "quiet": True},
                                     "seeds": [0]}))
    proc = subprocess.run([sys.executable, "-m", "sparseopt", "sweep", str(short), "--out", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert "-seed0: WARNING: warmup (" in proc.stdout  # the run's warning, in the sweep's own output


def test_a_folder_of_small_images_trains_at_their_own_size_unless_told(tmp_path, capsys):
    """A folder of 28-pixel images trained at 224 by default (issue 28): now at 28, said in the output."""
    data = png_folder(tmp_path / "chars", {str(i): 4 for i in range(3)}, size=28)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(data), "--workers", "0", "--model", "mlp",
                 *QUICK, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert ("imagefolder: the training images are 28x28: trained at their own size, 28px, not 224 (--image-size to "
            "change)") in said
    assert "images 28px" in said and "augmentation none" in said
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["image_size"] == 28
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    first = next(v for k, v in checkpoint["model"].items() if k.endswith("weight") and v.dim() == 2)
    assert first.shape[1] == 3 * 28 * 28  # the MLP reads 28x28 RGB, not 224x224
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(data), "--workers", "0", "--model", "mlp",
                 *QUICK, "--out", str(out), "--resume"]) == 0  # the resolved size resumes
    capsys.readouterr()
    mixed = png_folder(tmp_path / "mixed", {"a": 4}, size=28)
    png_folder(mixed, {"b": 4}, size=30)
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(mixed), "--workers", "0", "--model", "mlp",
                 *QUICK, "--image-size", "32", "--out", str(tmp_path / "told")]) == 0
    assert "trained at their own size" not in capsys.readouterr().out
    from sparseopt.data.imagefolder import shared_image_size

    assert shared_image_size(mixed) is None and shared_image_size(data) == (28, 28)
