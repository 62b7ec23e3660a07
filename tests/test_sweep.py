import json
from pathlib import Path

import pytest
import yaml

from sparseopt.analysis.report import report
from sparseopt.cli.main import main
from sparseopt.sweep import expand, load_sweep, plan, run_sweep
from sparseopt.train.spec import resolve_method

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path, **extra):
    spec = {
        "name": "tiny",
        "fixed": {"dataset": "bundled_mnist", "model": "mlp", "mlp_hidden": [32], "dst": "rigl", "epochs": 1,
                  "train_subset": 512, "test_subset": 200, "delta_t": 2, "batch_size": 64},
        "grid": {"sparsity": [0.8, 0.9]},
        "variants": [{"optimizer": "sgd"}, {"optimizer": "sparseopt"}],
        "seeds": [0, 1],
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_expansion_and_stable_names(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, grid={"sparsity": [0.8, 0.9], "lr": [0.1, 0.05]}))
    runs = expand(spec, tmp_path / "out")
    assert len(runs) == 2 * 2 * 2 * 2
    names = [r.name for r in runs]
    assert names[0] == "bundled_mnist-mlp-rigl-sgd-s0.8-e1-seed0-lr0.1"
    assert "bundled_mnist-mlp-rigl-sparseopt-s0.9-e1-seed1-lr0.05" in names
    assert [r.name for r in expand(spec, tmp_path / "out")] == names  # stable
    assert runs[0].config.out == str(tmp_path / "out" / names[0])
    assert {r.config.seed for r in runs} == {0, 1} and all(not r.config.compare_optimizers for r in runs)


def test_shipped_sweeps_expand():
    counts = {}
    for path in sorted((REPO / "configs/sweeps").glob("*.yaml")):
        counts[path.stem] = len(expand(load_sweep(path), "/tmp/unused"))
    assert counts["cifar100_table2"] == 108 and counts["cifar100_table3_ham"] == 144 and counts["imagenet_table1"] == 36
    assert counts["cifar100_set"] == 108
    # The paper-table grids run the paper's method (what the report sets beside the paper's numbers).
    for name in ("cifar100_table2", "cifar100_table3_ham", "cifar100_set", "imagenet_table1"):
        methods = {r.config.optimizer for r in expand(load_sweep(REPO / f"configs/sweeps/{name}.yaml"), "/tmp/unused")}
        assert {"sgd", "sparseopt_paper"} <= methods, name
    assert counts["rigl98_cpu_proxy"] == 8 and counts["rigl98_cpu_hypotheses"] == 24
    assert counts["gpu_rigl_cifar10"] == 13  # 4 pairs x 3 seeds + one paper run with its own seed list
    assert counts["gpu_rigl_cifar10_seeds34"] == 4 and counts["gpu_rigl_cifar10_bn_stats"] == 14
    assert counts["rigl_cpu_followup"] == 20 and counts["cpu_bn_stats_generality"] == 16
    assert counts["rigl98_cpu_sigma"] == 8 and counts["gpu_set_static_cifar10"] == 12
    assert counts["rigl98_cpu_slow_updates"] == 8 and counts["rigl98_cpu_longer"] == 12
    assert counts["rigl98_cpu_longer_seeds34"] == 6
    # The study files reproduce what docs/results.md reports: the paper's magnitude pruning where it ran,
    # whatever the default "auto" resolves to today.
    for name in ("rigl98_cpu_proxy", "rigl98_cpu_hypotheses"):
        resolved = {resolve_method(r.config)["prune_score"] for r in expand(load_sweep(REPO / f"configs/sweeps/{name}.yaml"), "/tmp/unused")
                    if r.config.optimizer != "sgd" and "prune_score" not in r.name}
        assert resolved == {"magnitude"}, name
    # ... and the fan-in scale they ran with, now that the default scale is bn_stats.
    historic = ("gpu_rigl_cifar10", "gpu_rigl_cifar10_seeds34", "rigl98_cpu_hypotheses", "rigl98_cpu_longer",
                "rigl98_cpu_longer_seeds34", "rigl98_cpu_proxy", "rigl98_cpu_sigma", "rigl_cpu_followup",
                "study_cifar10_resnet20", "study_itop_mnist", "study_mnist_mlp")
    for name in historic:
        for r in expand(load_sweep(REPO / f"configs/sweeps/{name}.yaml"), "/tmp/unused"):
            assert resolve_method(r.config)["scale_source"] == ("bn_stats" if "bn_stats" in r.name else "fan_in"), r.name


def test_variant_seeds_and_device_slots():
    from sparseopt.sweep.runner import device_slots, threads_per_run

    spec = load_sweep(REPO / "configs/sweeps/gpu_rigl_cifar10.yaml")
    runs = expand(spec, "/tmp/unused")
    paper = [r for r in runs if r.config.prune_score == "magnitude" and r.config.optimizer == "sparseopt"]
    assert [r.config.seed for r in paper] == [0]
    assert sorted({r.config.seed for r in runs}) == [0, 1, 2]
    # N runs per GPU, GPUs round-robin; CPU threads shared out
    assert device_slots(gpus=["0", "1"], per_device=3) == ["0", "1", "0", "1", "0", "1"]
    assert device_slots(parallel=2) == [None, None]
    assert threads_per_run(6, cpus=16) == 2 and threads_per_run(32, cpus=16) == 1
    with pytest.raises(ValueError, match="per_device must be >= 1"):
        device_slots(gpus=["0"], per_device=0)


def test_bad_sweep_files(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'sparsty'"):
        load_sweep(write_sweep(tmp_path, grid={"sparsty": [0.9]}))
    with pytest.raises(ValueError, match="unknown keys \\['gird'\\]"):
        load_sweep(write_sweep(tmp_path, gird={}))
    spec = load_sweep(write_sweep(tmp_path, variants=[{"momentum": 0.9}, {"momentum": 0.9}]))
    with pytest.raises(ValueError, match="identical names"):
        expand(spec, tmp_path)


def test_local_sweep_idempotent_skip_and_resume(tmp_path, capsys):
    sweep = write_sweep(tmp_path)
    out = tmp_path / "sweep"
    assert main(["sweep", str(sweep), "--out", str(out), "--parallel", "2"]) == 0
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert len(runs) == 8
    for name in runs:
        assert json.loads((out / name / "results.json").read_text())["status"] == "completed"
    # A stopped run (checkpoint, no results) resumes; a diverged one is left alone; the rest are skipped.
    (out / runs[0] / "results.json").unlink()
    (out / runs[1] / "results.json").write_text(json.dumps({"status": "diverged"}))
    actions = {r.name: a for r, a in plan(expand(load_sweep(sweep), out))}
    assert actions[runs[0]] == "resume" and actions[runs[1]] == "failed"
    assert sum(a == "skip" for a in actions.values()) == 6
    capsys.readouterr()
    result = run_sweep(load_sweep(sweep), out)
    assert list(result["codes"]) == [runs[0]] and result["codes"][runs[0]] == 0
    assert json.loads((out / runs[0] / "results.json").read_text())["status"] == "completed"
    assert "1 to resume" in capsys.readouterr().out
    again = run_sweep(load_sweep(sweep), out)
    assert again["codes"] == {}  # nothing left to do
    summary = report([out], tmp_path / "report")  # report reads the sweep folder directly
    assert len(summary["groups"]) == 4 and [r["status"] for r in summary["not_completed"]] == ["diverged"]
    # The sweep file changed under the same folder: its finished runs must not be skipped and reported as the new ones.
    edited = write_sweep(tmp_path, seeds=[0, 1, 2], fixed={**yaml.safe_load(sweep.read_text())["fixed"], "lr": 0.05})
    with pytest.raises(ValueError, match=r"8 run folder\(s\) of this sweep were made with another configuration") as err:
        plan(expand(load_sweep(edited), out))
    assert "lr: saved 0.1, now 0.05" in str(err.value)
    capsys.readouterr()
    assert main(["sweep", str(edited), "--out", str(out), "--dry-run"]) == 2
    assert "another configuration" in capsys.readouterr().err
    # Adding seeds (new folders) keeps the old runs valid.
    more = write_sweep(tmp_path, seeds=[0, 1, 2])
    assert sum(a == "start" for _, a in plan(expand(load_sweep(more), out))) == 4


def test_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit", reason="submitit is an optional dependency (pip install submitit)")
    sweep = write_sweep(tmp_path, grid={"sparsity": [0.9]}, variants=[{"optimizer": "sparseopt"}], seeds=[0, 1],
                        slurm={"timeout_min": 10})
    out = tmp_path / "sub"
    result = run_sweep(load_sweep(sweep), out, launcher="submitit", cluster="local")
    assert result["codes"] == {name: 0 for name in result["runs"]}
    for name in result["runs"]:
        assert json.loads((out / name / "results.json").read_text())["status"] == "completed"
    assert (out / ".sweep" / "submitit").is_dir()


def test_submitit_packs_runs_per_gpu(tmp_path):
    pytest.importorskip("submitit", reason="submitit is an optional dependency (pip install submitit)")
    sweep = write_sweep(tmp_path, grid={"sparsity": [0.9]}, variants=[{"optimizer": "sgd"}, {"optimizer": "sparseopt"}],
                        seeds=[0], slurm={"timeout_min": 10, "cpus_per_task": 2})
    out = tmp_path / "packed"
    result = run_sweep(load_sweep(sweep), out, launcher="submitit", cluster="local", per_device=2)
    assert result["codes"] == {name: 0 for name in result["runs"]}
    jobs = [p for p in (out / ".sweep" / "submitit").iterdir() if p.name != "%j"]
    assert len(jobs) == 1  # one job holds both runs
    for name in result["runs"]:
        assert json.loads((out / name / "results.json").read_text())["status"] == "completed"
