"""Sparse training on the compiled kernels: the same gradients, steps, masks and records as masked training."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_conv_case, relative_error, simd_paths, use_simd_path
from torch import nn

import sparseopt
from sparseopt.cli.main import main
from sparseopt.models import build_model
from sparseopt.native import build
from sparseopt.native import grad as native_grad
from sparseopt.training_kernels import functions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIMD_PATHS = simd_paths()


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_sparse_autograd_equals_masked_dense_on_every_path(path, fresh_backend):
    """Output, input gradient, weight gradient at the active positions (zeros elsewhere) and bias gradient."""
    use_simd_path(fresh_backend, path)
    g = torch.Generator().manual_seed(10 + build.PATHS.index(path))
    for trial, density in enumerate([0.0, 1.0, 0.01, 0.05, 0.3] + [None] * 35):
        weight, mask, x, bias, stride, pad = random_conv_case(g, density, max_stride=3, pad_below_kernel=True)
        weight = weight * mask
        k = weight.shape[-1]
        use_bias = trial % 3 == 0
        ref_x, ref_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        ref_b = bias.clone().requires_grad_() if use_bias else None
        y_ref = F.conv2d(ref_x, ref_w, ref_b, stride, pad)
        dy = torch.randn(y_ref.shape, generator=g)
        y_ref.backward(dy)
        sx, sw = x.clone().requires_grad_(), weight.clone().requires_grad_()
        sb = bias.clone().requires_grad_() if use_bias else None
        tw = native_grad.TrainingWeight(mask)
        y = functions.SparseConv2dFunction.apply(sx, sw, sb, tw, ((k, k), (stride, stride), (pad, pad)), False)
        y.backward(dy)
        case = (trial, tuple(weight.shape), tuple(x.shape), stride, pad)
        assert y.shape == y_ref.shape and relative_error(y, y_ref) <= 1e-5, case
        assert relative_error(sx.grad, ref_x.grad) <= 1e-5, case
        assert relative_error(sw.grad, ref_w.grad * mask) <= 1e-5, case
        assert torch.count_nonzero(sw.grad[~mask]) == 0, case
        if use_bias:
            assert relative_error(sb.grad, ref_b.grad) <= 1e-5, case
    for density in (0.0, 0.07, 1.0):  # Linear, batch as the vector dimension, 3-D input
        mask = torch.rand(19, 37, generator=g) < density
        weight, bias = torch.randn(19, 37, generator=g) * mask, torch.randn(19, generator=g)
        x = torch.randn(3, 11, 37, generator=g)
        ref = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = [t.clone().requires_grad_() for t in (x, weight, bias)]
        dy = torch.randn(3, 11, 19, generator=g)
        F.linear(*ref).backward(dy)
        functions.SparseLinearFunction.apply(*out, native_grad.TrainingWeight(mask), False).backward(dy)
        for a, b in zip(out, ref):
            expected = b.grad * mask if b.shape == weight.shape else b.grad
            assert relative_error(a.grad, expected) <= 1e-5, density


def test_dense_gradient_steps_give_the_gradient_everywhere(native):
    """RigL's update steps: the weight gradient at every position, as masked training gives it."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(8, 5, 3, 3, generator=g) < 0.2
    weight, x = torch.randn(8, 5, 3, 3, generator=g) * mask, torch.randn(4, 5, 9, 9, generator=g)
    ref_w, sw = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    F.conv2d(x, ref_w, None, 2, 1).sum().backward()
    functions.SparseConv2dFunction.apply(x, sw, None, native_grad.TrainingWeight(mask), ((3, 3), (2, 2), (1, 1)),
                                         True).sum().backward()
    assert relative_error(sw.grad, ref_w.grad) <= 1e-5 and torch.count_nonzero(sw.grad[~mask]) > 0


def test_weight_gradient_is_the_same_for_any_thread_count(native):
    """Fixed partial-sum groups: bitwise the same gradient on 1 and 2 threads (bit-exact resume on another machine)."""
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(16, 16, 3, 3, generator=g) < 0.1
    tw = native_grad.TrainingWeight(mask)
    x, dy = torch.randn(40, 16, 12, 12, generator=g), torch.randn(40, 16, 12, 12, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            packed = native_grad.packed_input(x, tw, (3, 3), (1, 1), (1, 1))
            results.append(native_grad.conv2d_backward(x, dy, tw, (3, 3), (1, 1), (1, 1), packed, False, True)[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def _small_run(kernels: str, seed: int = 0, dst: str = "rigl", model_name: str = "resnet20", **structure):
    torch.manual_seed(seed)
    model = build_model(model_name, 10, in_shape=(3, 16, 16))
    masks = sparseopt.sparsify(model, 0.9 if not structure else 0.5, "erk" if not structure else "uniform",
                               generator=torch.Generator().manual_seed(seed), **structure)
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), masks)
    updater = sparseopt.RigL if dst == "rigl" else sparseopt.SET
    topology = updater(masks, opt, delta_t=3, alpha=0.3, total_steps=40)
    sparse = sparseopt.sparse_training(masks, kernels, topology)
    return model, masks, opt, topology, sparse


def _step(run, x, y):
    model, masks, opt, topology, _ = run
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    buffers = dict(model.named_buffers())  # the gradient of the active weights (masked training's is dense)
    grads = {n: p.grad * buffers[f"{n}_mask"] if f"{n}_mask" in buffers else p.grad.clone()
             for n, p in model.named_parameters()}
    updated = topology.step()
    opt.step()
    return loss.item(), grads, updated


def _sync(dst, src) -> None:
    """The sparse side continues from the masked side's state: every step is compared from one start."""
    dst[0].load_state_dict(src[0].state_dict())
    dst[1].load_state_dict(src[1].state_dict())
    dst[2].load_state_dict(src[2].state_dict())
    dst[3].load_state_dict(src[3].state_dict())


def _float64_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    twin = copy.deepcopy(model).double()
    for module in twin.modules():
        module.__dict__.pop("forward", None)  # the plain layers, in float64
    F.cross_entropy(twin(x.double()), y).backward()
    buffers = dict(twin.named_buffers())
    return {n: p.grad * buffers[f"{n}_mask"] if f"{n}_mask" in buffers else p.grad for n, p in twin.named_parameters()}


def _compare_steps(batches, dst="rigl", **structure):
    """Each step from the masked run's state: the loss, the gradients and, after an update, the masks.

    Gradients are held to the float64 gradient: the sparse path's error may not exceed masked dense
    training's by more than 1e-5 of the largest gradient entry. (Relative to each tensor's own size, a
    BatchNorm bias gradient, a sum that cancels to a thousandth of its terms, is off by percents in
    float32 on either path, depending on the summation order.)
    """
    masked, sparse = _small_run("masked", dst=dst, **structure), _small_run("sparse", dst=dst, **structure)
    worst_loss, worst_grad, updates = 0.0, 0.0, 0
    for x, y in batches:
        _sync(sparse, masked)
        exact = _float64_grads(masked[0], x, y)
        a, ga, updated = _step(masked, x, y)
        b, gb, updated_b = _step(sparse, x, y)
        assert updated == updated_b
        worst_loss = max(worst_loss, abs(a - b) / abs(a))
        scale = max(float(g.abs().max()) for g in exact.values())
        for n, g64 in exact.items():
            excess = (float((gb[n] - g64).abs().max()) - float((ga[n] - g64).abs().max())) / scale
            worst_grad = max(worst_grad, excess)
        if updated:
            updates += 1
            assert masked[1].checksum() == sparse[1].checksum()  # the same connections pruned and grown
    assert sparse[4].rebuilds >= updates  # the packed weights follow every new mask
    return worst_loss, worst_grad, updates


def test_structured_masks_train_the_same_on_the_kernels(native):
    """Constant fan-in and 2:4 masks: RigL keeps the structure (the updater checks it) on both paths, step for step.

    Losses and masks only: at 50% density on 4x4 planes one pre-activation of 8,192 lies within 1e-6 of
    zero, the two paths' rounding puts it on either side of the ReLU, and every gradient upstream moves
    by 2% (measured; the float64 gradient sides with one path or the other by chance).
    """
    g = torch.Generator().manual_seed(8)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(7)]
    for structure in ({"structure": "constant_fan_in"}, {"structure": "nm", "nm": "2:4", "dense_first": True}):
        loss, _, updates = _compare_steps(batches, "rigl", **structure)
        assert updates == 2 and loss <= 1e-5, (structure, loss)


def test_gradient_accumulation_and_clipping_see_masked_training_gradients(native):
    masked, sparse = _small_run("masked"), _small_run("sparse")
    _sync(sparse, masked)
    g = torch.Generator().manual_seed(9)
    micro = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    norms = []
    for model, _, opt, *_ in (masked, sparse):
        opt.zero_grad()
        for x, y in micro:  # three micro-batches accumulate into .grad
            F.cross_entropy(model(x), y).backward()
        opt.precondition_grads_()  # masks the gradients, as the step does before clipping
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    for (n, a), b in zip(masked[0].named_parameters(), sparse[0].parameters()):
        assert relative_error(b.grad, a.grad) <= 1e-5, n


@pytest.mark.skipif(not (DATA / "cifar-10-python.tar.gz").is_file(), reason="needs real CIFAR-10 in ../shared/data")
def test_hundred_steps_of_resnet20_rigl_on_cifar10_equal_masked_training(native):
    """ResNet-20, RigL at 95% ERK, 100 steps of real CIFAR-10 through the training pipeline (augmentation,
    warm-up schedule): every step from the masked run's state gives its loss within 1e-5 relative, and
    every topology update the same masks.

    Compared from one common state per step: left to run on its own, the masked path diverges from itself
    as fast when its weights are perturbed by 1e-7 (docs/results.md, "Sparse training kernels"), so a
    free-running comparison measures the chaos of training, not the kernels.
    """
    from sparseopt.train.config import TrainConfig
    from sparseopt.train.trainer import Trainer

    def trainer(kernels, tmp):
        cfg = TrainConfig(model="resnet20", dataset="cifar10", data_dir=str(DATA), dst="rigl", sparsity=0.95,
                          delta_t=25, epochs=1, batch_size=32, train_subset=3200, test_subset=100, kernels=kernels,
                          out=str(tmp / kernels), quiet=True, workers=0)
        t = Trainer(cfg, argv=[])
        t.setup()
        return t

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        masked, sparse = trainer("masked", Path(tmp)), trainer("sparse", Path(tmp))
        masked.train_loader.set_epoch(0)
        worst, updates = 0.0, 0
        for step, (x, y) in enumerate(masked.train_loader):
            sparse.model.load_state_dict(masked.model.state_dict())
            sparse.optimizer.load_state_dict(masked.optimizer.state_dict())
            sparse.topology.load_state_dict(masked.topology.state_dict())
            sparse.scheduler.load_state_dict(masked.scheduler.state_dict())
            losses, changed = [], []
            for t in (masked, sparse):
                t.model.train()
                loss = t.criterion(t.model(x), y)
                t.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                changed.append(t.topology.step())
                t.optimizer.step()
                t.scheduler.step()
                losses.append(loss.item())
            worst = max(worst, abs(losses[0] - losses[1]) / abs(losses[0]))
            if changed[0]:
                updates += 1
                assert changed[1] and masked.masks.checksum() == sparse.masks.checksum(), step
        assert step == 99 and updates == 2  # t = 25, 50 (t_end = 75)
        assert worst <= 1e-5, worst


def test_auto_decides_per_layer_records_and_restores(native):
    run = _small_run("auto")
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    _step(run, x, y)
    report = run[4].report()
    assert report["kernels"] == "auto" and set(report["layers"]) == set(run[1].names)
    for decision in report["layers"].values():
        assert decision["kernel"] in ("sparse", "masked") and decision["masked_ms"] > 0 and decision["sparse_ms"] > 0
        assert (decision["kernel"] == "sparse") == (decision["sparse_ms"] < decision["masked_ms"])
    other = _small_run("auto")
    other[4].load_state_dict(run[4].state_dict())
    assert other[4].report()["layers"] == report["layers"]  # a resumed auto run takes the same path


def test_needs_dense_gradient_only_before_gradient_growth(native):
    model, masks, opt, rigl, _ = _small_run("masked")
    flags = []
    for _ in range(8):
        flags.append(rigl.needs_dense_gradient())
        rigl.t += 1
    assert flags == [False, False, False, True, False, False, True, False]  # t = 3, 6 update (delta_t = 3)
    _, _, _, set_updater, _ = _small_run("masked", dst="set")
    set_updater.t = 3
    assert not set_updater.needs_dense_gradient()  # SET grows at random: no dense gradient
    assert not sparseopt.Static(masks).needs_dense_gradient()


def test_layers_the_kernels_cannot_take_stay_masked_with_the_reason(native):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                          nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.Flatten(), nn.Linear(8 * 36, 4))
    masks = sparseopt.sparsify(model, 0.5, "uniform")
    sparse = sparseopt.sparse_training(masks, "sparse")
    kinds = {n: d["kernel"] for n, d in sparse.report()["layers"].items()}
    assert kinds == {"0": "sparse", "1": "masked", "2": "masked", "4": "sparse"}
    assert "groups=2" in sparse.report()["layers"]["1"]["reason"]
    assert "dilation" in sparse.report()["layers"]["2"]["reason"]
    x = torch.randn(2, 3, 6, 6)
    sparse.remove()
    reference = model(x)
    sparse = sparseopt.sparse_training(masks, "sparse")
    assert relative_error(model(x), reference) <= 1e-5


def test_bf16_autocast_float64_and_missing_kernels_fall_back_to_masked(fresh_backend):
    def losses(kernels):
        run = _small_run(kernels)
        g = torch.Generator().manual_seed(6)
        return [_step(run, torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))[0]
                for _ in range(4)]

    fresh_backend.setenv("SPARSEOPT_NATIVE", "0")
    with pytest.warns(UserWarning, match="unavailable.*masked dense"):
        unavailable = losses("sparse")
    assert unavailable == losses("masked")  # the same run, bit for bit
    fresh_backend.delenv("SPARSEOPT_NATIVE")
    build.reset()
    if build.load(warn=False)[1] is None:
        return
    run = _small_run("sparse")
    with pytest.warns(UserWarning, match="float32.*masked dense"), torch.autocast("cpu", dtype=torch.bfloat16):
        run[0](torch.randn(2, 3, 16, 16))
    run = _small_run("sparse")
    run[0].double()
    with pytest.warns(UserWarning, match="float32.*masked dense"):
        out = run[0](torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert out.dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per reason, not per call
        run[0](torch.randn(2, 3, 16, 16, dtype=torch.float64))


def test_cli_sparse_kernels_record_decisions_and_resume_bit_exact(native, tmp_path, monkeypatch):
    from sparseopt.train import records as records_mod

    args = ["train", "--dataset", "bundled_mnist", "--model", "mlp", "--mlp-hidden", "96", "--sparsity", "0.9",
            "--dst", "rigl", "--delta-t", "4", "--train-subset", "512", "--test-subset", "200", "--batch-size", "64",
            "--no-compare-optimizers", "--quiet", "--seed", "3", "--epochs", "2"]
    real_save = records_mod.save_checkpoint

    def interrupted_then_resumed(out: Path, kernels: str) -> dict:
        def save_then_stop(path, state):
            real_save(path, state)
            if state["epoch"] == 1:
                raise KeyboardInterrupt  # killed after its first checkpoint

        monkeypatch.setattr(records_mod, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            main([*args, "--kernels", kernels, "--out", str(out)])
        monkeypatch.setattr(records_mod, "save_checkpoint", real_save)
        first = torch.load(out / "checkpoint.pt", weights_only=True)
        assert main([*args, "--kernels", kernels, "--out", str(out), "--resume"]) == 0
        return first

    assert main([*args, "--kernels", "sparse", "--out", str(tmp_path / "straight")]) == 0
    interrupted_then_resumed(tmp_path / "resumed", "sparse")
    a = torch.load(tmp_path / "straight/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoint.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    env = json.loads((tmp_path / "straight" / "env.json").read_text())
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    for record in (env["kernels"], results["kernels"]):
        assert record["kernels"] == "sparse" and record["backend"] in build.PATHS
        assert {n: d["kernel"] for n, d in record["layers"].items()} == {"1": "sparse", "4": "sparse"}
    assert results["kernels"]["rebuilds"] >= 2 * results["topology_updates"]

    first = interrupted_then_resumed(tmp_path / "auto", "auto")  # auto's choices are kept across the resume
    final = torch.load(tmp_path / "auto/checkpoint.pt", weights_only=True)
    assert final["sparse_training"]["decisions"] == first["sparse_training"]["decisions"]
    layers = json.loads((tmp_path / "auto" / "results.json").read_text())["kernels"]["layers"]
    assert all(d["kernel"] in ("sparse", "masked") and d["sparse_ms"] > 0 for d in layers.values())


def test_torch_compile_sees_each_sparse_layer_as_one_opaque_call(native):
    """torch.compile of a model on the kernels: the same losses, one graph per stretch between sparse layers,
    and no recompilation on ordinary steps or at topology updates (the layers are opaque to dynamo)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # counted from this test on
    eager, compiled = _small_run("sparse"), _small_run("sparse")
    model = torch.compile(compiled[0], backend="eager")
    g = torch.Generator().manual_seed(11)
    graphs = []
    for _ in range(7):  # updates at t = 3 and 6
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
        a = _step(eager, x, y)[0]
        run = (model, *compiled[1:])
        b = _step(run, x, y)[0]
        assert b == pytest.approx(a, rel=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] <= len(compiled[1]) + 1  # the stretches between the 22 opaque layers
    assert graphs[-1] == graphs[1], graphs  # nothing compiled again after the first steps, updates included
    torch._dynamo.reset()
