import gzip
import json
import math

import pytest
import yaml
from conftest import data_path

from sparseopt.analysis.direction import run_direction
from sparseopt.analysis.report import report
from sparseopt.analysis.skew import mnist_inputs, run_skew
from sparseopt.analysis.toy_ham import ToySetup, drift, train_toy
from sparseopt.cli.main import main
from sparseopt.data import load_mnist
from sparseopt.train.config import make_config


@pytest.fixture(scope="module")
def real_mnist():
    root = data_path("mnist")
    images, labels = load_mnist(root, "mnist", train=True)
    return mnist_inputs(images), labels


def test_skew_on_real_mnist(real_mnist, tmp_path):
    inputs, labels = real_mnist
    s = run_skew(inputs, labels, tmp_path, norms=("batchnorm", "none", "layernorm"), sparsities=(0.9,), inits=3)
    by_norm = {r["norm"]: r for r in s["ratios"]}
    assert by_norm["batchnorm"]["ratio_mean"] == pytest.approx(3.16, rel=0.10)
    assert by_norm["none"]["ratio_mean"] == pytest.approx(1.0, rel=0.10)
    # LayerNorm under uniform sparsity: one factor for every neuron, of size 1/sqrt(1 - s)
    assert by_norm["layernorm"]["norm_factor_cv"] < 1e-9
    assert by_norm["layernorm"]["norm_factor_mean"] == pytest.approx(3.16, rel=0.10)
    assert by_norm["batchnorm"]["norm_factor_cv"] > 0.05  # BN's factor is per neuron
    # per neuron, BatchNorm: ratio ~ (1 - s_i)^-1/2 before, no trend after SparseOpt's scaling
    slope = s["per_neuron_slope"]
    assert slope["batchnorm"]["before"] == pytest.approx(-0.5, abs=0.1)
    assert abs(slope["batchnorm"]["sparseopt"]) < 0.1 and abs(slope["batchnorm"]["paper_c"]) < 0.1
    # LayerNorm has no per-neuron skew; the paper's c_i would create one (+0.5), SparseOpt leaves it alone
    assert abs(slope["layernorm"]["before"]) < 0.1 and abs(slope["layernorm"]["sparseopt"]) < 0.1
    assert slope["layernorm"]["paper_c"] == pytest.approx(0.5, abs=0.1)
    assert abs(slope["none"]["sparseopt"]) < 0.1
    assert len((tmp_path / "skew.csv").read_text().splitlines()) == 1 + 3  # header + one row per norm
    assert len((tmp_path / "per_neuron.csv").read_text().splitlines()) == 1 + 3 * 3 * 64  # 3 norms x 3 inits x 64
    assert (tmp_path / "skew.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skew_cli_on_bundled_subset(tmp_path, capsys):
    assert main(["skew", "--sparsities", "0.0", "0.8", "--inits", "1", "--batches", "20", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "skew.json").read_text())["ratios"]
    assert [r["sparsity"] for r in rows] == [0.0, 0.8, 0.0, 0.8]
    assert rows[0]["ratio_mean"] == pytest.approx(1.0)  # s = 0: sparse == dense exactly
    assert "per-neuron slope" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["skew", "--sparsities", "1.0", "--out", str(tmp_path)])
    assert "--sparsities must be in [0, 1), got 1.0" in capsys.readouterr().err


def test_toy_ham_invariants_and_sign_flip():
    setup = ToySetup()
    gd = train_toy(setup, "gd", lr=0.002, steps=20000, record_every=100)
    ham = train_toy(setup, "ham", lr=0.002, steps=20000, alpha=1.0, record_every=100)
    assert drift(gd) < 0.01  # a^2 - gamma^2 - b^2 conserved by small-step gradient descent
    assert drift(ham) < 0.01  # F(a) - gamma^2 - b^2 conserved by small-step HAM
    assert gd.a[0][0] < 0 and gd.a[-1][0] < 0  # GD cannot flip the outer weight
    assert ham.a[-1][0] > 0  # HAM flips it and recovers the teacher
    assert ham.loss[-1] < 1e-3 and gd.loss[-1] > 0.1  # GD stays stuck at the wrong sign
    scaled = train_toy(setup, "ham", lr=0.002, steps=20000, alpha=1.0, scaling=True, record_every=100)
    assert drift(scaled) < 0.01 and scaled.a[-1][0] > 0  # the scaling does not touch the invariant


def test_toy_ham_cli_two_neurons(tmp_path):
    assert main(["toy-ham", "--steps", "3000", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "toy_ham.json").read_text())
    assert s["two_neurons"]["HAM"]["sign_flipped"][1] is True and s["two_neurons"]["GD"]["sign_flipped"] == [False, False]
    assert (tmp_path / "toy_ham_two_neurons.png").stat().st_size > 10_000


def test_direction_records_ordinary_and_across_steps(tmp_path):
    cfg = make_config(overrides={"epochs": 2, "train_subset": 1024, "delta_t": 5, "compare_optimizers": False}).validate()
    s = run_direction(cfg, tmp_path)
    steps = 2 * (1024 // 128)  # 16 steps, t_end = 12: updates at t = 5, 10
    for method in ("sgd", "sparseopt"):
        upd = s[method]["update"]
        assert upd["across_pairs"] == 2 * 2  # two topology updates x two masked layers (784-64-10 MLP)
        assert upd["ordinary_pairs"] + upd["across_pairs"] == (steps - 2 - 1) * 2  # 2 skipped steps, first has no predecessor
        # SGD with momentum 0.9: consecutive updates point nearly the same way on ordinary steps
        assert upd["ordinary_mean_cosine"] > 0.8
        # a mask update turns the direction: pruned weights leave the update and new ones enter at zero momentum
        assert upd["across_update_mean_cosine"] < upd["ordinary_mean_cosine"]
    assert (tmp_path / "direction.png").stat().st_size > 10_000


def _fake_run(root, name, acc, *, seed, sparsity=0.9, optimizer="sgd", epochs=100, status="completed", itop=0.3,
              dataset="cifar100", model="resnet20", dst="rigl", neurons=None):
    d = root / name
    d.mkdir(parents=True)
    cfg = make_config(overrides={"dataset": dataset, "model": model, "dst": dst, "optimizer": optimizer,
                                 "sparsity": sparsity, "epochs": epochs, "seed": seed}).to_dict()
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = [{"epoch": e + 1, "train_acc": acc - 5 + e, "test_acc": acc - 1 + e, "itop": itop, **(neurons or {})}
               for e in range(2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if status is not None:
        (d / "results.json").write_text(json.dumps({"status": status, "final": {"test_acc": acc, "itop": itop},
                                                    "best_test_acc": acc + 0.5}))
    return d


def test_report_exact_means_stds_and_missing_runs(tmp_path):
    runs = tmp_path / "runs"
    for seed, acc in enumerate([60.0, 61.0, 65.0]):
        _fake_run(runs, f"ours-s{seed}", acc, seed=seed, optimizer="sparseopt_paper")
    for seed, acc in enumerate([59.0, 60.0]):
        _fake_run(runs, f"base-s{seed}", acc, seed=seed)
    _fake_run(runs, "base-s2", 10.0, seed=2, status=None)  # stopped: no results.json
    _fake_run(runs, "base-s3", 10.0, seed=3, status="diverged")
    (runs / "sweep.json").write_text(json.dumps({"runs": ["ours-s0", "ours-s1", "ours-s2", "ours-s4"]}))
    summary = report([runs], tmp_path / "report")
    groups = {g["optimizer"]: g for g in summary["groups"]}
    groups["sparseopt"] = groups["sparseopt_paper"]
    assert groups["sparseopt"]["test_acc_mean"] == pytest.approx(62.0, abs=1e-12)
    assert groups["sparseopt"]["test_acc_std"] == pytest.approx(math.sqrt(7.0), abs=1e-12)  # sample std of 60, 61, 65
    assert groups["sgd"]["test_acc_mean"] == pytest.approx(59.5) and groups["sgd"]["test_acc_std"] == pytest.approx(math.sqrt(0.5))
    assert groups["sgd"]["n_seeds"] == 2 and groups["sparseopt"]["seeds"] == [0, 1, 2]
    assert groups["sparseopt"]["paper_test_acc"] == 61.34 and groups["sgd"]["paper_test_acc"] == 60.66
    assert sorted(r["status"] for r in summary["not_completed"]) == ["diverged", "incomplete"]
    assert summary["missing"] == [str(runs / "ours-s4")]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "62.00 +- 2.65 (3) [paper 61.34]" in md and "59.50 +- 0.71 (2) [paper 60.66]" in md
    assert "base-s2: incomplete" in md and "ours-s4" in md
    summary_rows = (tmp_path / "report" / "summary.csv").read_text().splitlines()
    assert len(summary_rows) == 1 + 2 and "test_acc_mean" in summary_rows[0]
    assert len((tmp_path / "report" / "runs.csv").read_text().splitlines()) == 1 + 7
    for name in ("accuracy_vs_budget.png", "curves.png", "itop_vs_sparsity.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no such run or sweep folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


def test_report_groups_by_full_method_config_and_flags_duplicate_seeds(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "lr01-s0", 60.0, seed=0)
    _fake_run(runs, "lr01-s0-again", 62.0, seed=0)  # the same run twice
    d = _fake_run(runs, "lr02-s0", 50.0, seed=0)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg.update(lr=0.2, out="elsewhere", quiet=True)  # lr changes the method; out and quiet do not
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = report([runs], tmp_path / "report")
    groups = sorted(summary["groups"], key=lambda g: g["test_acc_mean"])
    assert [g["n_seeds"] for g in groups] == [1, 2]  # lr=0.2 is not averaged in as a seed
    assert groups[0]["differs"] == {"lr": 0.2} and groups[1]["differs"] == {}
    assert groups[0]["method"] == "Baseline (lr=0.2)" and groups[1]["method"] == "Baseline"
    assert groups[1]["duplicate_seeds"] == [0] and groups[0]["duplicate_seeds"] == []
    assert groups[0]["paper_test_acc"] is None  # not the paper's setting: no paper number beside it
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Groups with duplicate seeds" in md and "seeds [0] appear more than once" in md


def test_report_groups_auto_settings_by_what_they_resolved_to(tmp_path):
    """config.yaml says prune_score: auto for both; the versions that trained them made different methods of it."""
    runs = tmp_path / "runs"
    for name, seed, acc, score in (("a0", 0, 60.0, "scaled"), ("a1", 1, 62.0, "scaled"), ("b0", 0, 50.0, "magnitude")):
        d = _fake_run(runs, name, acc, seed=seed, optimizer="sparseopt")
        results = json.loads((d / "results.json").read_text())
        results["resolved"] = {"precondition": True, "precondition_layers": "normalized", "prune_score": score}
        (d / "results.json").write_text(json.dumps(results))
    summary = report([runs], tmp_path / "report")
    groups = sorted(summary["groups"], key=lambda g: g["test_acc_mean"])
    assert [g["n_seeds"] for g in groups] == [1, 2] and groups[1]["test_acc_mean"] == pytest.approx(61.0)
    assert groups[0]["differs"] == {"prune_score": "magnitude"} and groups[1]["differs"] == {"prune_score": "scaled"}


def test_neuron_table_and_figure_keep_settings_apart(tmp_path):
    runs = tmp_path / "runs"
    for dst, dead, sigma in (("set", 3, 0.41), ("static", 9, 0.47)):
        for seed in (0, 1):
            neurons = {"neurons/dead": dead + seed, "fan_in/cv": 0.3, "weight_norm/fan_in_slope": 0.4,
                       "bn_sigma/fan_in_slope": sigma}
            _fake_run(runs, f"{dst}-s{seed}", 50.0, seed=seed, dst=dst, neurons=neurons)
    summary = report([runs], tmp_path / "report", curves=tmp_path / "curves.jsonl")
    curves = [json.loads(line) for line in (tmp_path / "curves.jsonl").read_text().splitlines()]
    assert {c["epochs"][-1]["bn_sigma/fan_in_slope"] for c in curves} == {0.41, 0.47}
    assert {c["group"].split(":")[0] for c in curves} == {"set", "static"}  # figure labels name the DST method
    report([runs], tmp_path / "report", curves=tmp_path / "curves.jsonl.gz")  # compressed when the name says so
    assert gzip.decompress((tmp_path / "curves.jsonl.gz").read_bytes()).decode() == (tmp_path / "curves.jsonl").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| cifar100 / resnet20 /")]
    assert [row.split(" | ")[0] for row in rows] == ["| cifar100 / resnet20 / set", "| cifar100 / resnet20 / static"]
    assert "| 3.500 |" in rows[0] and "| 0.410 |" in rows[0] and "| 9.500 |" in rows[1] and "| 0.470 |" in rows[1]
    assert len(summary["groups"]) == 2
    assert (tmp_path / "report" / "neurons.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
