"""Extending sparseopt from outside (issue 19): a real plugin package, and the interfaces it builds on."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import sparseopt
from sparseopt import plugins
from sparseopt.cli.main import main
from sparseopt.models import MODELS
from sparseopt.optim import SCALE_SOURCES
from sparseopt.topology import DST_METHODS
from sparseopt.topology.updaters import DSTUpdater, LayerPlan

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "sparseopt_plugin_example"
QUICK = ["--epochs", "2", "--train-subset", "512", "--test-subset", "256", "--batch-size", "64", "--delta-t", "2", "--quiet"]


def install_plugin(root: Path, package: str = "sparseopt_plugin_example", entry: str = "sparseopt_plugin_example:register",
                   source: Path | None = None) -> Path:
    """Install a plugin as pip would leave it: the package and a .dist-info with its entry point, under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copytree(source, root / package)
    info = root / f"{package}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[sparseopt.plugins]\nexample = {entry}\n")
    return root


@pytest.fixture
def plugin_env(tmp_path):
    site = install_plugin(tmp_path / "site", source=EXAMPLE / "sparseopt_plugin_example")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def loaded_plugin(tmp_path, monkeypatch):
    """The example plugin loaded in this process through importlib.metadata, unregistered afterwards."""
    site = install_plugin(tmp_path / "site", source=EXAMPLE / "sparseopt_plugin_example")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_loaded", {})
    loaded = plugins.load_plugins()
    yield loaded
    for registry, name in ((DST_METHODS, "momentum"), (SCALE_SOURCES, "fan_in_quarter"), (MODELS, "vgg_bn")):
        registry.unregister(name)
    sys.modules.pop("sparseopt_plugin_example", None)


def sparseopt_cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "sparseopt", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_entry_point_plugin_is_found_and_registers_everything(loaded_plugin):
    assert loaded_plugin == {"sparseopt_plugin_example:register": "entry point 'example' of sparseopt-plugin-example"}
    assert "momentum" in DST_METHODS and "fan_in_quarter" in SCALE_SOURCES and "vgg_bn" in MODELS
    assert plugins.load_plugins() == loaded_plugin  # once per process: a second call registers nothing twice


def test_cli_trains_a_plugin_method_model_and_scale_source_with_their_options(plugin_env, tmp_path):
    out = tmp_path / "run"
    proc = sparseopt_cli(["train", "--no-compare-optimizers", "--dst", "momentum", "--dst-kwargs", "beta=0.8",
                          "--model", "vgg_bn", "--model-kwargs", "width=8", "--scale-source", "fan_in_quarter",
                          "--sparsity", "0.9", *QUICK, "--out", str(out)], plugin_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    env = json.loads((out / "env.json").read_text())
    assert results["status"] == "completed" and results["method"]["dst"] == "momentum"
    assert env["topology"]["method"] == "SparseMomentum" and env["topology"]["beta"] == 0.8
    assert results["topology_updates"] == results["topology_updates_planned"] == 5
    assert results["resolved"]["scale_source"] == "fan_in_quarter"
    assert yaml.safe_load((out / "config.yaml").read_text())["model_kwargs"] == {"width": 8}
    # the plugin's state (its momentum buffers) is in the checkpoint and the run resumes from it
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["topology"]["momentum"]) == 5 and state["masks"] is not None
    # masks moved between layers (Sparse Momentum's redistribution) and kept the global count
    density = [m for m in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if "density" in m]
    assert abs(density[-1]["density"] - density[0]["density"]) < 1e-9
    proc = sparseopt_cli(["train", "--config", str(out / "config.yaml"), "--resume"], plugin_env, tmp_path)
    assert proc.returncode == 0 and "nothing left" not in proc.stderr, proc.stderr[-2000:]


def test_plugin_options_are_checked_against_the_class_signature(plugin_env, tmp_path):
    base = ["train", "--no-compare-optimizers", "--dst", "momentum", *QUICK, "--out", str(tmp_path / "r")]
    proc = sparseopt_cli([*base, "--dst-kwargs", "betta=0.8"], plugin_env, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: dst 'momentum' (SparseMomentum) takes no option 'betta' (did you mean 'beta'?); its further options: ['beta']"]
    proc = sparseopt_cli([*base, "--dst-kwargs", "delta_t=3"], plugin_env, tmp_path)
    assert proc.returncode == 2 and "'delta_t' of dst 'momentum' (SparseMomentum) is set by --delta-t" in proc.stderr
    proc = sparseopt_cli([*base, "--model", "vgg_bn", "--model-kwargs", "depth=3"], plugin_env, tmp_path)
    assert proc.returncode == 2 and "model 'vgg_bn' takes no option 'depth'" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_help_lists_plugin_choices(plugin_env, tmp_path):
    proc = sparseopt_cli(["train", "--help"], plugin_env, tmp_path)
    text = " ".join(proc.stdout.split())  # argparse wraps the lines
    assert proc.returncode == 0
    assert "rigl, momentum}" in text and "vgg_bn}" in text and "fan_in_quarter}" in text


def test_sweep_file_runs_a_plugin_method_with_swept_options(plugin_env, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "plugin", "fixed": {"dst": "momentum", "model": "mlp", "mlp_hidden": [32], "epochs": 1, "train_subset": 256,
                                    "test_subset": 128, "batch_size": 64, "delta_t": 1, "quiet": True},
        "grid": {"dst_kwargs": [{"beta": 0.5}, {"beta": 0.9}]}, "seeds": [0]}))
    proc = sparseopt_cli(["sweep", str(sweep), "--out", str(tmp_path / "out")], plugin_env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if (p / "results.json").is_file())
    assert names == ["bundled_mnist-mlp-momentum-sparseopt-s0.9-e1-seed0-dst_kwargsbeta=0.5",
                     "bundled_mnist-mlp-momentum-sparseopt-s0.9-e1-seed0-dst_kwargsbeta=0.9"]
    betas = [json.loads((tmp_path / "out" / n / "env.json").read_text())["topology"]["beta"] for n in names]
    assert betas == [0.5, 0.9]


def test_torchrun_processes_load_the_plugin(plugin_env, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sparseopt", "train",
         "--no-compare-optimizers", "--dst", "momentum", "--model", "mlp", "--mlp-hidden", "32", "--mlp-norm", "none",
         "--check-masks", *QUICK, "--out", str(out)],
        env=plugin_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["topology_updates"] == 5  # masks and weights checked equal per update


def test_a_broken_plugin_is_one_line_naming_it(tmp_path):
    site = install_plugin(tmp_path / "site", package="broken_plugin", entry="broken_plugin:register")
    (site / "broken_plugin.py").write_text("raise ImportError('needs scipy')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    proc = sparseopt_cli(["train", "--epochs", "1"], env, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: plugin broken_plugin:register (entry point 'example' of broken-plugin) failed to load: ImportError: needs scipy"]


def test_environment_variable_loads_a_module_that_is_not_installed(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "from sparseopt import PRUNE_SCORES\nPRUNE_SCORES.register('negated', lambda w, m, s=None: -w.abs())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPARSEOPT_PLUGINS", "my_scores")
    monkeypatch.setattr(plugins, "_loaded", {})
    try:
        assert plugins.load_plugins()["my_scores"] == "SPARSEOPT_PLUGINS"
        from sparseopt.train.config import make_config

        assert make_config(None, {"prune_score": "negated"}).validate().prune_score == "negated"
    finally:
        sparseopt.PRUNE_SCORES.unregister("negated")
        sys.modules.pop("my_scores", None)


# -- the interfaces a plugin builds on ---------------------------------------------------------------------------
def _model_and_masks(sparsity=0.8, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
                          nn.Linear(12, 4))
    masks = sparseopt.sparsify(model, sparsity, "uniform", generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3), masks, **options)
    x, y = torch.randn(32, 20), torch.randint(0, 4, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    return model, masks, opt


def test_updater_base_is_abstract_until_growth_is_defined():
    _, masks, opt = _model_and_masks()
    with pytest.raises(TypeError, match="grow_scores"):
        DSTUpdater(masks, opt, delta_t=1, t_end=10)


class _Gradient(DSTUpdater):
    def grow_scores(self, index, layer):
        return layer.weight.grad.abs()


def test_a_plan_moves_connections_between_layers_and_keeps_the_total():
    class Moving(_Gradient):
        def plan(self, fraction, counts):  # layer 0 gives 5 connections to layer 1
            return [LayerPlan(5, 0), LayerPlan(0, 5), LayerPlan(0, 0)]

    _, masks, opt = _model_and_masks()
    before = masks.num_active()
    assert Moving(masks, opt, delta_t=1, t_end=10).update(0.3)
    after = masks.num_active()
    assert after == [before[0] - 5, before[1] + 5, before[2]]


def test_a_density_schedule_is_a_plan_that_drops_more_than_it_grows():
    class Shrinking(_Gradient):  # GraNet-like: prune 4 more per layer than grown
        def plan(self, fraction, counts):
            return [LayerPlan(int(fraction * c) + 4, int(fraction * c)) for c in counts]

    _, masks, opt = _model_and_masks()
    before = masks.num_active()
    topology = Shrinking(masks, opt, delta_t=1, t_end=10)
    assert topology.update(0.25)
    assert masks.num_active() == [c - 4 for c in before]
    assert topology.last_update["pruned_and_regrown"] == sum(int(0.25 * c) + 4 for c in before)


def test_structured_masks_refuse_a_plan_that_changes_a_layer_count():
    class Moving(_Gradient):
        def plan(self, fraction, counts):
            return [LayerPlan(2, 0), LayerPlan(0, 2)]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = sparseopt.sparsify(model, 0.5, "uniform", structure="constant_fan_in")
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks)
    nn.functional.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 4, (8,))).backward()
    with pytest.raises(ValueError, match="keeps every neuron's count, so it must grow what it drops"):
        Moving(masks, opt, delta_t=1, t_end=10).update(0.3)


def test_any_optimizer_with_skip_next_step_satisfies_the_protocol():
    class MySkipper(torch.optim.SGD):
        skipped = 0

        def skip_next_step(self):
            self.skipped += 1

    model, masks, _ = _model_and_masks()
    opt = MySkipper(model.parameters(), lr=0.1)
    topology = sparseopt.RigL(masks, opt, delta_t=1, t_end=10)  # no hasattr: the SkipsSteps protocol
    assert topology.prune_score == "magnitude"  # not preconditioning: the baseline's preset
    nn.functional.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 4, (8,))).backward()
    assert topology.update(0.3) and opt.skipped == 1
    with pytest.raises(ValueError, match="prune_score='scaled' needs a sparseopt.SparseOpt"):
        sparseopt.RigL(masks, opt, delta_t=1, t_end=10, prune_score="scaled")


def test_auto_prune_score_is_the_presets_everywhere():
    from sparseopt.optim.presets import OPTIMIZER_PRESETS
    from sparseopt.train.build import build_run
    from sparseopt.train.config import make_config

    for name, preset in OPTIMIZER_PRESETS.items():
        cfg = make_config(None, {"optimizer": name}).validate()
        model = sparseopt.models.MLP(hidden=[16])
        run = build_run(cfg, model, total_steps=100, peak_lr=0.1)
        direct = sparseopt.RigL(run.masks, run.optimizer, delta_t=10, t_end=50)  # the library's "auto"
        assert run.topology.prune_score == direct.prune_score == preset.prune_score, name


def test_custom_prune_score_is_ranked_signed_smallest_first():
    _, masks, opt = _model_and_masks(0.5)
    layer = masks.layers[0]
    active = layer.weight[layer.mask].abs()
    largest = active.max()
    sparseopt.RigL(masks, opt, delta_t=1, t_end=10, prune_score=lambda w, m, s: -w.abs(), keep_regrown=False).update(0.1)
    # -|w| drops the largest weights: the largest one is gone (its grown replacement starts at 0)
    assert not (layer.weight.abs() == largest).any()


def test_a_registered_scale_source_is_what_sparseopt_applies():
    from sparseopt.optim.scales import ScaleSource

    class Half(ScaleSource):
        def scales(self, inputs, process_group=None):
            return [0.5 * torch.ones_like(x.fan_in_scale) for x in inputs]

    SCALE_SOURCES.register("half", Half)
    try:
        model, masks, _ = _model_and_masks()
        opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, scale_source="half")
        nn.functional.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 4, (8,))).backward()
        raw = [layer.weight.grad.clone() for layer in masks]
        opt.precondition_grads_()
        assert opt.scale_source == "half" and opt.preconditioned_layers == ["0", "3"]
        for layer, g in zip(masks, raw):
            factor = 0.5 if layer.name in ("0", "3") else 1.0
            torch.testing.assert_close(layer.weight.grad, factor * g * layer.mask)
    finally:
        SCALE_SOURCES.unregister("half")


def test_foreach_switch_gives_the_same_step_as_per_tensor_kernels():
    from sparseopt.optim.wrapper import use_foreach

    weights = []
    for foreach in (True, False, None):
        model, masks, opt = _model_and_masks(foreach=foreach, max_grad_norm=0.5, scale_weight_decay=True)
        opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    for other in weights[1:]:
        for a, b in zip(weights[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert not use_foreach([torch.zeros(2)], None) and use_foreach([torch.zeros(2)], True)


def test_registered_model_without_shortcut_or_in_shape_builds(tmp_path):
    from sparseopt.train.build import make_model
    from sparseopt.train.config import make_config

    MODELS.register("plain", lambda num_classes=10: nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes)))
    MODELS.register("shaped", lambda num_classes=10, in_shape=None: nn.Sequential(
        nn.Flatten(), nn.Linear(int(torch.tensor(in_shape).prod()), num_classes)))
    try:
        assert make_model(make_config(None, {"model": "plain"}).validate())[1].out_features == 10
        assert make_model(make_config(None, {"model": "shaped", "dataset": "cifar10"}).validate())[1].in_features == 3072
        assert main(["train", "--model", "plain", "--no-compare-optimizers", "--epochs", "1", "--train-subset", "256",
                     "--test-subset", "128", "--quiet", "--out", str(tmp_path / "plain")]) == 0
    finally:
        MODELS.unregister("plain")
        MODELS.unregister("shaped")


def test_load_sparse_loads_the_plugin_that_registers_the_files_model(tmp_path, monkeypatch):
    """A file of a plugin's model loads in a process that has not loaded plugins yet (issue 28)."""
    (tmp_path / "my_model.py").write_text(
        "from torch import nn\nfrom sparseopt import MODELS\n"
        "MODELS.register('tiny_net', lambda num_classes=10: nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_loaded", {})
    monkeypatch.setenv("SPARSEOPT_PLUGINS", "my_model")
    try:
        plugins.load_plugins()
        model = sparseopt.models.build_model("tiny_net", 3)
        masks = sparseopt.sparsify(model, 0.5)
        sparseopt.export_sparse(model, masks, tmp_path / "m.pt", model_name="tiny_net", num_classes=3, input_shape=(1, 4, 4))
        MODELS.unregister("tiny_net")  # a fresh process: the plugin is not loaded yet
        sys.modules.pop("my_model", None)
        monkeypatch.setattr(plugins, "_loaded", {})
        loaded = sparseopt.load_sparse(tmp_path / "m.pt", inference=False)
        assert isinstance(loaded, nn.Sequential) and "tiny_net" in MODELS
        MODELS.unregister("tiny_net")
        monkeypatch.delenv("SPARSEOPT_PLUGINS")
        monkeypatch.setattr(plugins, "_loaded", {})
        with pytest.raises(ValueError, match="needs model 'tiny_net', which no loaded plugin registers"):
            sparseopt.load_sparse(tmp_path / "m.pt", inference=False)
    finally:
        if "tiny_net" in MODELS:
            MODELS.unregister("tiny_net")
        sys.modules.pop("my_model", None)


def test_a_method_option_its_constructor_cannot_convert_names_the_option_and_method(tmp_path, capsys):
    """`--dst-kwargs grad_power=abc` said only "could not convert string to float" (issue 28)."""
    from sparseopt.cli.main import main

    class Powered(sparseopt.RigL):
        def __init__(self, masks, optimizer=None, *, grad_power: float = 1.0, **kwargs):
            super().__init__(masks, optimizer, **kwargs)
            self.grad_power = float(grad_power)

    DST_METHODS.register("powered", Powered)
    try:
        assert main(["train", "--dst", "powered", "--dst-kwargs", "grad_power=abc", "--epochs", "1",
                     "--train-subset", "256", "--quiet", "--no-compare-optimizers", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "dst 'powered' (Powered) with --dst-kwargs grad_power='abc'" in err[0], err
        assert "could not convert string to float" in err[0]
    finally:
        DST_METHODS.unregister("powered")


def test_a_model_that_does_not_take_the_datasets_input_is_one_line_before_anything_is_written(tmp_path, capsys):
    """A plugin model built for another input failed with a raw traceback after config.yaml was written (issue 28)."""
    from sparseopt.cli.main import main

    MODELS.register("small_input", lambda num_classes=10: nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes)))
    try:
        out = tmp_path / "run"
        assert main(["train", "--dataset", "bundled_mnist", "--model", "small_input", "--epochs", "1", "--quiet",
                     "--no-compare-optimizers", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model 'small_input' does not take the bundled_mnist input of shape (1, 28, 28)" in err[0]
        assert not (out / "config.yaml").exists() and not (out / "env.json").exists()
    finally:
        MODELS.unregister("small_input")
