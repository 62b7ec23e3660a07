import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import data_path, write_cifar_archive

from sparseopt.cli.main import main
from sparseopt.train import records as records_mod
from sparseopt.train import trainer as trainer_mod
from sparseopt.train.config import make_config

REPO = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "2", "--quiet"]


def read_jsonl(path):
    """The per-epoch records of a metrics.jsonl (update records carry an "event" key)."""
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if "event" not in r]


def test_embedded_default_job(tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["demo", *FAST, "--out", str(out)]) == 0
    for variant in ("sgd", "sparseopt"):
        run = out / variant
        assert {"config.yaml", "env.json", "metrics.jsonl", "results.json", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
        results = json.loads((run / "results.json").read_text())
        assert results["status"] == "completed" and results["method"]["optimizer"] == variant
        assert results["final"]["test_acc"] > 50  # real MNIST digits, 2 epochs
        assert yaml.safe_load((run / "config.yaml").read_text())["dataset"] == "bundled_mnist"
    # the layers that feed a BatchNorm (the default); the classifier "7" feeds none
    assert json.loads((out / "sparseopt" / "results.json").read_text())["preconditioned_layers"] == ["1", "4"]
    assert json.loads((out / "sgd" / "results.json").read_text())["preconditioned_layers"] == []
    table = (out / "comparison.md").read_text()
    assert "sgd test acc" in table and "sparseopt test acc" in table and table.count("\n| ") == 3
    assert (out / "comparison.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| 2 |" in printed


def test_cifar10_run_folder(tmp_path):
    write_cifar_archive(tmp_path / "data", "cifar10", n_train=100, n_test=40)
    out = tmp_path / "run"
    code = main(["train", "--config", str(REPO / "configs/cifar10_resnet20.yaml"), "--data-dir", str(tmp_path / "data"),
                 "--batch-size", "20", "--eval-batch-size", "40", "--delta-t", "2", *FAST, "--out", str(out)])
    assert code == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["step"] == 10
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "lr", "itop", "density",
                "epoch_seconds", "images_per_s", "density/conv1", "neuron_sparsity/fc/std", "topology_updates",
                "neurons/dead", "weight_norm/fan_in_slope", "bn_sigma/fan_in_slope"):
        assert key in metrics[-1], key
    assert metrics[-1]["density"] == pytest.approx(0.1, abs=1e-4)
    env = json.loads((out / "env.json").read_text())
    assert env["seed"] == 0 and env["torch"] == torch.__version__ and env["topology"]["method"] == "RigL"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and "conv1.weight_mask" in ckpt["model"]


def test_real_cifar10_subset_run(tmp_path):
    root = data_path("cifar-10-python.tar.gz").parent
    out = tmp_path / "real"
    assert main(["train", "--config", str(REPO / "configs/cifar10_resnet20.yaml"), "--data-dir", str(root),
                 "--train-subset", "256", "--test-subset", "200", "--batch-size", "64", "--epochs", "1",
                 "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["final"]["epoch"] == 1
    (epoch,) = read_jsonl(out / "metrics.jsonl")
    assert epoch["step"] == 4  # 256 real training images, batch 64
    correct = results["final"]["test_acc"] * 200 / 100  # evaluated on exactly the 200-image subset
    assert correct == pytest.approx(round(correct), abs=1e-9)
    assert 1.0 < epoch["train_loss"] < 4.0  # real 10-class images from ln(10) = 2.3, not a degenerate batch


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    args = ["train", "--epochs", "3", "--quiet", "--no-compare-optimizers", "--delta-t", "7"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0

    real_save = records_mod.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # the run is killed after its first checkpoint

    monkeypatch.setattr(records_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(records_mod, "save_checkpoint", real_save)
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 2  # existing folder refused
    assert main([*args, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    a = torch.load(tmp_path / "straight/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [m["epoch"] for m in read_jsonl(tmp_path / "resumed/metrics.jsonl")] == [1, 2, 3]
    assert main([*args, "--out", str(tmp_path / "resumed"), "--resume", "--sparsity", "0.5"]) == 2  # other config


def test_resume_refuses_a_checkpoint_whose_auto_settings_resolved_otherwise(tmp_path, monkeypatch, capsys):
    """A later version that resolves --prune-score auto differently must not switch method in the middle of a run."""
    args = ["train", "--epochs", "2", "--quiet", "--no-compare-optimizers", "--optimizer", "sparseopt",
            "--out", str(tmp_path / "run")]
    real_save = records_mod.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        raise KeyboardInterrupt  # killed after the first epoch's checkpoint

    monkeypatch.setattr(records_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(records_mod, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["resolved"]["prune_score"] == "scaled"
    from sparseopt.optim.presets import OPTIMIZER_PRESETS

    changed = dataclasses.replace(OPTIMIZER_PRESETS["sparseopt"], prune_score="magnitude")
    monkeypatch.setitem(OPTIMIZER_PRESETS._items, "sparseopt", changed)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "trained with prune_score='scaled' (now 'magnitude')" in capsys.readouterr().err
    assert main([*args, "--resume", "--prune-score", "scaled"]) == 0  # the method it was trained with, named
    assert json.loads((tmp_path / "run/results.json").read_text())["resolved"]["prune_score"] == "scaled"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_setup = trainer_mod.Trainer.setup

    def setup(self):
        real_setup(self)
        criterion = self.criterion
        self.criterion = lambda out, y: criterion(out, y) * (float("nan") if self.epoch >= 1 else 1.0)

    monkeypatch.setattr(trainer_mod.Trainer, "setup", setup)
    out = tmp_path / "nan"
    assert main(["train", "--epochs", "3", "--quiet", "--no-compare-optimizers", "--out", str(out)]) == 1
    assert "non-finite training loss at epoch 2" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert json.loads((out / "results.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "-1"], "epochs must be >= 1, got -1"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--sparsity", "1.0"], "sparsity must be in [0, 1) (1.0 would remove every weight), got 1.0"),  # sparsify's words
        (["--dst", "magic"], "dst must be one of ['dense', 'static', 'set', 'rigl'], got 'magic'\n"),
        (["--dst", "rigel"], "dst must be one of ['dense', 'static', 'set', 'rigl'], got 'rigel' (did you mean 'rigl'?)"),
        (["--epochs", "two"], "config key 'epochs' expects int, got 'two'"),
        (["--colour", "red"], "unknown option '--colour'; `sparseopt train --help` lists them"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "cifar-10-batches-py"),
    ],
)
def test_bad_input_rejected_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["train", *args, "--no-compare-optimizers", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_data_dir_message(tmp_path, capsys):
    main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-compare-optimizers", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "train-images-idx3-ubyte" in err and "--download" in err


def test_yaml_config_unknown_key_and_all_shipped_configs_valid(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsity: 0.9\nsparsty: 0.8\n")
    with pytest.raises(ValueError, match=r"unknown config key 'sparsty' \(did you mean 'sparsity'\?\)"):
        make_config(bad)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = make_config(path).validate()
        assert cfg.epochs >= 1, path
    assert make_config(REPO / "configs/imagenet_resnet50.yaml").label_smoothing == 0.1


def test_dense_and_static_and_set_runs(tmp_path):
    for dst, opt in (("dense", "sgd"), ("static", "sparseopt"), ("set", "sparseopt")):
        out = tmp_path / dst
        assert main(["train", "--epochs", "1", "--quiet", "--no-compare-optimizers", "--dst", dst, "--optimizer", opt,
                     "--train-subset", "1000", "--out", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["method"]["dst"] == dst and results["final"]["test_acc"] > 20


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "sparseopt", "train", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--sparsity" in out.stdout and "--growth-gradient" in out.stdout and "--growth-grad " in out.stdout


def test_optional_logger_missing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    out = tmp_path / "tb"
    assert main(["train", "--tensorboard", "--no-compare-optimizers", "--out", str(out)]) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert main(["train", "--wandb", "--no-compare-optimizers", "--out", str(out)]) == 2
    assert not out.exists()


def test_atomic_write_keeps_old_file_on_failure_and_sets_permissions(tmp_path):
    import os

    from sparseopt.files import atomic_write, write_json

    path = write_json(tmp_path / "r.json", {"a": 1})
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_current_umask())

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def _current_umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
