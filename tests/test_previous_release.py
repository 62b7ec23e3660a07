"""Run folders, configs and sweep files of earlier versions still load, resume, report and export (issue 28).

tests/fixtures/previous_release holds two run folders written by the release before the typed run spec
(with the old key names renorm and growth_grad): one completed, one stopped in its second epoch.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import sparseopt
from sparseopt.analysis.report import report
from sparseopt.cli.main import main
from sparseopt.runs import RunFolder
from sparseopt.sweep import grid
from sparseopt.train.config import make_config
from sparseopt.train.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "previous_release"


def copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_a_stopped_run_of_the_previous_release_resumes_to_the_same_end(tmp_path, capsys):
    stopped = copy("interrupted", tmp_path)
    assert RunFolder(stopped).checkpoint()["epoch"] == 1  # the fixture's checkpoint (*.pt files are git-ignored)
    assert main(["train", "--config", str(stopped / "config.yaml"), "--out", str(stopped), "--resume", "--quiet"]) == 0
    assert f"resumed from {stopped / 'checkpoint.pt'} at epoch 1" in capsys.readouterr().out
    resumed, finished = RunFolder(stopped).results(), RunFolder(FIXTURES / "completed").results()
    assert resumed["status"] == "completed"
    # the same numbers as the run the previous release trained without a stop
    assert resumed["final"]["test_acc"] == finished["final"]["test_acc"]
    assert resumed["final"]["train_loss"] == pytest.approx(finished["final"]["train_loss"], rel=1e-6)
    assert resumed["topology_updates"] == finished["topology_updates"]
    config = RunFolder(stopped).config()
    assert config["max_grad_norm"] == 1.0 and config["growth_gradient"] == "corrected" and "renorm" not in config


def test_the_previous_release_s_runs_report_and_export(tmp_path):
    completed = copy("completed", tmp_path)
    stopped = copy("interrupted", tmp_path)
    assert main(["train", "--config", str(stopped / "config.yaml"), "--out", str(stopped), "--resume", "--quiet"]) == 0
    report([tmp_path], tmp_path / "report")
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["groups"]
    assert len(rows) == 1 and rows[0]["n_seeds"] == 2  # one method: the old folder and the resumed one group together
    assert rows[0]["max_grad_norm"] == 1.0 and rows[0]["growth_gradient"] == "corrected"
    assert main(["export", str(completed)]) == 0
    model = sparseopt.load_sparse(completed / "model.sparse.pt")
    state = RunFolder(completed).checkpoint()
    x = torch.randn(4, 1, 28, 28)
    reference = sparseopt.deploy.run.load_run(completed)[0]
    torch.testing.assert_close(model(x), reference(x))
    assert state["config"]["renorm"] == 1.0  # the checkpoint itself still says what it said


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_builds_a_checked_run_spec(path):
    cfg = make_config(path).validate()
    spec = RunSpec.from_config(cfg)
    assert spec.model.name == cfg.model and (spec.masks is None) == (cfg.dst == "dense")


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_expands_to_checked_runs(path, tmp_path):
    runs = grid.expand(grid.load_sweep(path), tmp_path)
    assert runs and all(RunSpec.from_config(r.config, check=False).model.name == r.config.model for r in runs)


def test_this_version_trains_the_previous_release_s_run_to_the_same_numbers(tmp_path):
    """The refactors of issue 28 change no number: the same config trains to the same losses and accuracy."""
    completed = FIXTURES / "completed"
    assert main(["train", "--config", str(completed / "config.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    new, old = RunFolder(tmp_path / "again"), RunFolder(completed)
    for ours, theirs in zip(new.metrics(), old.metrics(), strict=True):
        assert (ours["train_loss"], ours["test_loss"], ours["test_acc"]) == (
            theirs["train_loss"], theirs["test_loss"], theirs["test_acc"])
    assert new.results()["final"] == old.results()["final"]
