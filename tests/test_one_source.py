"""One place for each decision (issue 19): config metadata, presets, naming, grouping, clipping, the norm finder."""

from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

import sparseopt
from sparseopt.analysis import report as report_mod
from sparseopt.cli.main import main
from sparseopt.optim import sparseopt as sparseopt_mod
from sparseopt.optim.clip import ClipGradNorm
from sparseopt.optim.presets import OPTIMIZER_PRESETS
from sparseopt.sweep import grid
from sparseopt.train import naming
from sparseopt.train.build import build_run
from sparseopt.train.config import (
    NON_METHOD_KEYS,
    RESUMABLE_KEYS,
    TrainConfig,
    field_choices,
    field_docs,
    make_config,
)
from sparseopt.train.spec import resolve_method

QUICK = ["--epochs", "1", "--train-subset", "256", "--test-subset", "128", "--quiet", "--no-compare-optimizers"]


def test_every_key_has_help_and_a_role_and_the_key_sets_agree():
    docs = field_docs()
    assert all(docs[f.name] for f in fields(TrainConfig)), [f.name for f in fields(TrainConfig) if not docs[f.name]]
    assert RESUMABLE_KEYS < NON_METHOD_KEYS and NON_METHOD_KEYS - RESUMABLE_KEYS == {"seed"}
    assert report_mod.RUNTIME_KEYS is NON_METHOD_KEYS
    # the keys a report groups by are exactly the method keys; the GPU speed options are runtime for both
    assert {"bf16", "channels_last", "compile", "compile_mode", "cudnn_benchmark", "sync_bn"} <= RESUMABLE_KEYS
    assert "optimizer" in docs and all(p in docs["optimizer"] for p in OPTIMIZER_PRESETS.names())


def test_choices_come_from_the_modules_that_define_them():
    from sparseopt.masks.maskset import INITS
    from sparseopt.models.resnet_cifar import SHORTCUTS
    from sparseopt.optim.sparseopt import LAYER_CHOICES
    from sparseopt.topology.updaters import GROWTH_GRADIENTS

    choices = field_choices()
    assert choices["init"] == list(INITS) and choices["shortcut"] == list(SHORTCUTS)
    assert choices["growth_gradient"] == list(GROWTH_GRADIENTS) and choices["precondition_layers"] == ["auto", *LAYER_CHOICES]
    assert choices["optimizer"] == OPTIMIZER_PRESETS.names()


def test_run_names_and_sweep_names_read_one_table():
    cfg = make_config(None, {"structure": "constant_fan_in", "sparsity": 0.9, "ham": True}).validate()
    assert naming.run_name(cfg) == "bundled_mnist-mlp-rigl-sparseopt-s0.9-cfi-ham-e100-seed0"
    assert naming.method_keys(cfg) == {k: getattr(cfg, k) for k in naming.NAMED_KEYS}
    # a swept key that the name already shows is not added twice (structure was, before)
    spec = grid.SweepSpec("s", None, {}, {"structure": ["unstructured", "constant_fan_in"]}, [{}], [0], {}, 1, None)
    names = [r.name for r in grid.expand(spec, "/tmp/unused")]
    assert names == ["bundled_mnist-mlp-rigl-sparseopt-s0.9-e100-seed0", "bundled_mnist-mlp-rigl-sparseopt-s0.9-cfi-e100-seed0"]


def test_presets_resolve_auto_once():
    for name, preset in OPTIMIZER_PRESETS.items():
        assert resolve_method(make_config(None, {"optimizer": name})) == preset.resolved()
    explicit = resolve_method(make_config(None, {"optimizer": "sparseopt", "prune_score": "magnitude"}))
    assert explicit["prune_score"] == "magnitude" and explicit["scale_source"] == "bn_stats"


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer": "sgd", "scale_source": "bn_stats"}, "optimizer=sgd does not precondition, so scale_source='bn_stats'"),
    ({"optimizer": "sgd", "scale_ema": 0.9, "undamped_growth": True}, "scale_ema=0.9, undamped_growth=True would do nothing"),
    ({"optimizer": "sgd", "precondition_layers": "all"}, "precondition_layers='all' would do nothing"),
    ({"dst": "set", "growth_gradient": "corrected"}, "dst=set does not grow by a gradient"),
    ({"dst": "dense", "optimizer": "sparseopt"}, "dst=dense has no masks to precondition"),
])
def test_options_a_method_would_ignore_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(None, overrides).validate()


def test_baseline_accepts_the_settings_its_preset_records():
    # the historical study sweeps pin scale_source: fan_in on their sgd variants too
    assert make_config(None, {"optimizer": "sgd", "scale_source": "fan_in"}).validate().scale_source == "fan_in"


def test_dense_runs_with_the_default_optimizer(tmp_path):
    cfg = make_config(None, {"dst": "dense"}).validate()
    assert cfg.optimizer == "sgd"
    assert main(["train", "--dst", "dense", *QUICK, "--out", str(tmp_path / "dense")]) == 0


def test_dense_gradient_clipping_is_the_optimizers_not_the_loops():
    cfg = make_config(None, {"dst": "dense", "max_grad_norm": 0.01, "weight_decay": 0.0, "momentum": 0.0}).validate()
    model = sparseopt.models.MLP(hidden=[16], in_features=10, num_classes=3)
    run = build_run(cfg, model, total_steps=10, peak_lr=1.0)
    assert isinstance(run.optimizer, ClipGradNorm)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(torch.randn(16, 10)), torch.randint(0, 3, (16,))).backward()
    run.optimizer.step()
    moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    assert abs(moved.norm().item() - 0.01) < 1e-5  # lr 1 x a gradient clipped to norm 0.01
    import inspect

    from sparseopt.train import trainer

    assert "clip_grad" not in inspect.getsource(trainer)


def test_one_normalization_finder_per_run(tmp_path, monkeypatch):
    made = []
    real = sparseopt_mod.NormalizedLayerFinder.__init__

    def counting(self, model, *args, **kwargs):
        if type(model) is not nn.Sequential:  # not the probe on which RunSpec checks the options
            made.append(self)
        real(self, model, *args, **kwargs)

    monkeypatch.setattr(sparseopt_mod.NormalizedLayerFinder, "__init__", counting)
    for optimizer in ("sgd", "sparseopt"):
        made.clear()
        out = tmp_path / optimizer
        assert main(["train", "--optimizer", optimizer, *QUICK, "--out", str(out)]) == 0
        assert len(made) == 1, optimizer
        import json

        last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        assert "bn_sigma/fan_in_slope" in last  # the monitoring read the finder's norms


def test_report_labels_are_the_same_in_tables_and_figures(tmp_path):
    import json

    import yaml

    for name, optimizer, metrics in (("a", "sgd", True), ("b", "sparseopt", False), ("c", "sparseopt", True)):
        run = tmp_path / name
        run.mkdir()
        cfg = make_config(None, {"optimizer": optimizer, "seed": ord(name)}).to_dict()
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "results.json").write_text(json.dumps({"status": "completed", "final": {"test_acc": 50.0},
                                                       "best_test_acc": 50.0}))
        if metrics:
            (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 50.0}) + "\n")
    records = [report_mod.load_run(p) for p in sorted(tmp_path.iterdir())]
    table = {row["method"]: row["n_seeds"] for row in report_mod.aggregate(records)}
    figure = {label.split(": ")[1].rsplit(" ", 2)[0]: len(runs) for label, runs in report_mod.labelled_groups(records)}
    assert table == {"Baseline": 1, "Ours": 2} and figure == {"Baseline": 1, "Ours": 1}


def test_a_single_process_cpu_run_keeps_freed_memory_unless_told_not_to(monkeypatch):
    from sparseopt.train import runtime
    from sparseopt.train.config import TrainConfig

    calls = []
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: calls.append(1) or True)
    cpu = torch.device("cpu")
    for cfg, distributed, expected in ((TrainConfig(), False, 1), (TrainConfig(reuse_memory=False), False, 0),
                                       (TrainConfig(), True, 0)):  # CPU DDP keeps the C library's defaults
        calls.clear()
        with runtime.backend_flags(cpu, cfg, distributed):
            pass
        assert len(calls) == expected, (cfg.reuse_memory, distributed)
    calls.clear()
    with runtime.backend_flags(torch.device("cuda"), TrainConfig()):  # a GPU run: only torch's flags
        pass
    assert not calls


def test_backend_flags_are_set_for_a_cuda_run_and_restored_afterwards():
    from sparseopt.train.config import TrainConfig
    from sparseopt.train.runtime import backend_flags

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32)
    cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = False, False, False  # a library user's own settings
    try:
        with backend_flags(torch.device("cuda"), TrainConfig(cudnn_benchmark=True)):  # only flags: no GPU is touched
            assert (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32) == (True, True, True)
        assert (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32) == (False, False, False)
        with pytest.raises(RuntimeError), backend_flags(torch.device("cuda"), TrainConfig(cudnn_benchmark=True)):
            raise RuntimeError("a run that fails")
        assert (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32) == (False, False, False)
        with backend_flags(torch.device("cpu"), TrainConfig(cudnn_benchmark=True)):  # a CPU run sets no torch flag
            assert not cudnn.benchmark
    finally:
        cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_the_training_loop_module_reads_in_150_lines():
    import inspect

    from sparseopt.train.trainer import Trainer

    assert len(inspect.getsource(Trainer).splitlines()) <= 150


def test_renamed_keys_still_work_in_configs_flags_sweeps_and_old_run_folders(tmp_path, caplog):
    """renorm is max_grad_norm and growth_grad is growth_gradient now (issue 28); the old names keep working."""
    import logging

    import yaml

    from sparseopt.train.config import with_defaults

    (tmp_path / "old.yaml").write_text("renorm: 0.5\ngrowth_grad: corrected\n")
    with caplog.at_level(logging.WARNING, logger="sparseopt"):
        cfg = make_config(tmp_path / "old.yaml")
    assert (cfg.max_grad_norm, cfg.growth_gradient) == (0.5, "corrected")
    assert sum("is renamed" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(ValueError, match="sets both 'renorm' and its new name 'max_grad_norm'"):
        make_config(None, {"renorm": 1.0, "max_grad_norm": 1.0})
    assert with_defaults({"renorm": 0.25})["max_grad_norm"] == 0.25 and "renorm" not in with_defaults({})
    caplog.clear()
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sparseopt"):
        assert main(["train", *QUICK, "--renorm", "2.0", "--out", str(out)]) == 0
    assert "--renorm is renamed --max-grad-norm" in caplog.text
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_grad_norm"] == 2.0 and "renorm" not in saved
    # a run folder of an earlier version, with the old key in config.yaml, resumes as the same run
    saved["renorm"] = saved.pop("max_grad_norm")
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", *QUICK, "--max-grad-norm", "2.0", "--out", str(out), "--resume"]) == 0
    assert main(["train", *QUICK, "--max-grad-norm", "3.0", "--out", str(out), "--resume"]) == 2  # another run
    (tmp_path / "sweep.yaml").write_text("fixed: {epochs: 1}\ngrid: {renorm: [0.5]}\n")
    (run,) = grid.expand(grid.load_sweep(tmp_path / "sweep.yaml"), tmp_path / "sweep")
    assert run.config.max_grad_norm == 0.5 and Path(run.config.out).name.endswith("renorm0.5-e1-seed0")
