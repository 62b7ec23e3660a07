"""The options of the SparseOpt-vs-baseline study: pruning scores, scale sources, smoothing, undamped growth,
and the neuron / update monitors."""

import pytest
import torch
from conftest import SmallConvNet, batches
from torch import nn

import sparseopt
from sparseopt.monitor import UpdateProbe, loss_on_batch, neuron_stats, norm_fan_in_slope
from sparseopt.optim.preconditioner import bn_scales, gradient_multiplier, smooth_scales
from sparseopt.topology.scores import PRUNE_SCORES, normalized_score, scaled_score


def _random_layer(out=32, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(out, 1, generator=g) * 0.6 + 0.1
    mask = torch.rand(out, inp, generator=g) < density
    weight = torch.randn(out, inp, generator=g) * mask
    return weight, mask, g


# -- (a) pruning scores ---------------------------------------------------------------------------------
def test_normalized_score_is_invariant_to_row_rescaling():
    weight, mask, g = _random_layer()
    rows = torch.rand(weight.shape[0], 1, generator=g) * 100 + 0.01
    n = int(mask.sum())
    kept, _ = sparseopt.prune_and_grow(mask, normalized_score(weight, mask), torch.rand(mask.shape, generator=g), n // 4, n)
    kept_scaled, _ = sparseopt.prune_and_grow(mask, normalized_score(weight * rows, mask), torch.zeros(mask.shape), n // 4, n)
    assert torch.equal(kept, kept_scaled)
    # magnitude pruning is not invariant: the same rescaling changes what is dropped
    kept_mag, _ = sparseopt.prune_and_grow(mask, weight.abs(), torch.zeros(mask.shape), n // 4, n)
    kept_mag_scaled, _ = sparseopt.prune_and_grow(mask, (weight * rows).abs(), torch.zeros(mask.shape), n // 4, n)
    assert not torch.equal(kept_mag, kept_mag_scaled)


def test_scaled_score_undoes_a_per_neuron_learning_rate():
    # weights that moved c_i times as far because of the preconditioner rank as if it had not acted
    weight, mask, g = _random_layer()
    c = sparseopt.neuron_scales(mask)
    n = int(mask.sum())
    kept_plain, _ = sparseopt.prune_and_grow(mask, weight.abs(), torch.zeros(mask.shape), n // 3, n)
    kept_scaled, _ = sparseopt.prune_and_grow(mask, scaled_score(weight * c[:, None], mask, c), torch.zeros(mask.shape), n // 3, n)
    assert torch.equal(kept_plain, kept_scaled)
    assert set(PRUNE_SCORES) == {"magnitude", "scaled", "normalized"}


def test_rigl_prune_score_option_and_errors():
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8, generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, precondition=False)
    with pytest.raises(ValueError, match="unknown prune_score 'size'"):
        sparseopt.RigL(masks, opt, delta_t=2, t_end=10, prune_score="size")
    with pytest.raises(ValueError, match="needs a sparseopt.SparseOpt"):
        sparseopt.RigL(masks, torch.optim.SGD(model.parameters(), lr=0.1), delta_t=2, t_end=10, prune_score="scaled",
                       skip_update=False, reset_optimizer_state=False)
    # a callable score: drop the entries with the largest |w| first (negated magnitude)
    seen = []

    def largest_first(weight, mask, scale):
        seen.append(scale)
        return 1.0 / weight.abs().clamp_min(1e-12)

    rigl = sparseopt.RigL(masks, opt, delta_t=2, t_end=10, prune_score=largest_first)
    before = [(layer.weight.detach().abs() * layer.mask).clone() for layer in masks]
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    rigl.update(0.2)
    assert seen and torch.equal(seen[0], torch.ones(masks.masks[0].shape[0]))  # the baseline's scales: ones
    top = before[0].reshape(-1).argmax()
    assert not masks.masks[0].reshape(-1)[top] or masks.grown[0].reshape(-1)[top]  # the largest weight was dropped


# -- (d) BN-statistics scale -----------------------------------------------------------------------------
def test_bn_scale_equals_fan_in_scale_at_initialisation():
    g = torch.Generator().manual_seed(0)
    out, inp = 48, 1024
    density = torch.linspace(0.05, 0.6, out)[:, None]
    mask = torch.rand(out, inp, generator=g) < density
    layer = nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, inp, generator=g) / inp**0.5 * mask)
    bn = nn.BatchNorm1d(out, momentum=None)  # cumulative average: the exact variance over the batches seen
    for _ in range(20):
        bn(layer(torch.randn(256, inp, generator=g)))
    c_bn, c_fan = bn_scales(bn.running_var, mask), sparseopt.neuron_scales(mask)
    rel = (c_bn - c_fan).abs() / c_fan
    assert rel.mean() < 0.05 and rel.max() < 0.15
    # a neuron with no active weight gets 0, like the fan-in scale
    mask[3] = False
    assert bn_scales(bn.running_var, mask)[3] == 0
    assert torch.equal(bn_scales(torch.zeros(out), mask), torch.zeros(out))


def test_bn_stats_scales_follow_the_following_batchnorm():
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8, generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, scale_source="bn_stats")
    assert opt.dynamic_scales
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    raw = [w.grad.clone() for w in masks.weights]
    opt.precondition_grads_()
    expected = [bn_scales(model.bn1.running_var, masks["conv1"]), bn_scales(model.bn2.running_var, masks["conv2"]),
                torch.ones(10)]  # fc feeds no norm: not preconditioned (layers="normalized")
    for layer, g, c in zip(masks, raw, expected):
        shape = (-1,) + (1,) * (g.dim() - 1)
        torch.testing.assert_close(layer.weight.grad, g * c.reshape(shape) * layer.mask)
    with pytest.raises(ValueError, match="unknown scale source 'bn'"):
        sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, scale_source="bn")


# -- (c) smoothing ----------------------------------------------------------------------------------------
def _smoothed_sparseopt():
    """A SmallConvNet at 80% under SparseOpt with smoothed scales (scale_ema 0.9) on every layer."""
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8, generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.01), masks, scale_ema=0.9, layers="all",
                              scale_source="fan_in")
    return model, masks, opt


def _sgd_steps(model, opt, n):
    """Train ``n`` steps on the shared batches, yielding after each optimizer step."""
    for x, y in batches(n):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        yield


def test_smoothing_leaves_scales_unchanged_when_masks_do_not_change():
    model, masks, opt = _smoothed_sparseopt()
    for _ in _sgd_steps(model, opt, 5):
        for c, m in zip(opt.layer_scales(), masks.masks):
            torch.testing.assert_close(c, sparseopt.neuron_scales(m), rtol=1e-6, atol=0)


def test_smoothing_moves_scales_gradually_after_a_mask_change():
    prev = torch.tensor([1.0, 0.5, 0.0, 2.0])
    target = torch.tensor([2.0, 0.5, 1.0, 0.0])
    # live neurons move 10% of the way; a neuron coming alive takes its target; a dead one drops to 0
    torch.testing.assert_close(smooth_scales(prev, target, 0.9), torch.tensor([1.1, 0.5, 1.0, 0.0]))
    with pytest.raises(ValueError, match="scale_ema must be in"):
        model = nn.Sequential(nn.Linear(4, 4))
        sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), sparseopt.sparsify(model, 0.5), scale_ema=1.0)


# -- (e) undamped growth ----------------------------------------------------------------------------------
def test_undamped_growth_raises_the_scale_of_new_connections_to_one():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    c = sparseopt.neuron_scales(mask)  # sqrt(8/5), sqrt(2/5)
    grown = torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    m = gradient_multiplier(mask, c, torch.float32, grown)
    expected = torch.tensor([[c[0]] * 4, [1.0, 0, 0, 0]])  # c_0 > 1 stays; c_1 < 1 raised to 1 on its new connection
    torch.testing.assert_close(m, expected)
    assert torch.equal(gradient_multiplier(mask, None, torch.float32, grown), mask.float())


def test_rigl_records_grown_connections_and_their_churn():
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8, generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, undamped_growth=True)
    rigl = sparseopt.RigL(masks, opt, delta_t=2, t_end=100)
    history = []
    for x, y in batches(5):
        before = [m.clone() for m in masks.masks]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if rigl.step():
            grown = [m & ~b for m, b in zip(masks.masks, before)]
            assert all(torch.equal(a, b) for a, b in zip(grown, masks.grown))
            history.append((before, grown, dict(rigl.last_update)))
        opt.step()
    assert len(history) == 2 and history[0][2]["grown_pruned"] is None
    (_, grown1, _), (before2, _, info2) = history
    # pruned again = grown at update 1 and no longer active after update 2
    pruned_again = sum(int((g & ~m).sum()) for g, m in zip(grown1, masks.masks))
    assert info2["grown_pruned"] == pytest.approx(pruned_again / sum(int(g.sum()) for g in grown1))
    assert 0 < info2["grown_pruned"] < 1  # new connections start at 0: some are pruned at once


# -- monitors ---------------------------------------------------------------------------------------------
def test_neuron_stats_counts_and_init_slope():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(2000, 400, bias=False), nn.BatchNorm1d(400))
    density = torch.linspace(0.01, 0.5, 400)[:, None]
    mask = torch.rand(400, 2000, generator=g) < density
    mask[:7] = False  # seven dead neurons
    masks = sparseopt.MaskSet(model, {"0": mask})
    stats = neuron_stats(masks, [sparseopt.neuron_scales(mask)])
    assert stats["neurons/dead"] == 7 and stats["neurons/dead/0"] == 7
    assert stats["neurons/dead_frac"] == pytest.approx(7 / 400)
    n = mask.sum(1).float()
    assert stats["fan_in/min"] == n[n > 0].min()
    assert stats["fan_in/cv"] == pytest.approx(float(n.std(unbiased=False) / n.mean()), rel=1e-5)
    assert stats["fan_in/q50"] == pytest.approx(float((n / n.mean()).median()), rel=0.02)
    assert stats["scale/max"] == pytest.approx(float((n.max() / n.mean()).sqrt()), rel=1e-5)
    # i.i.d. weights masked: ||w_i|| ~ sqrt(n_i), a log-log slope of 1/2
    assert stats["weight_norm/fan_in_slope"] == pytest.approx(0.5, abs=0.03)
    assert "bn_sigma/fan_in_slope" not in stats  # no norms given
    # BN's sigma_i at initialisation follows sqrt(n_i) too: the paper's assumption, slope 1/2 ...
    model[1].momentum = 1.0  # running_var = this batch's variance
    model(torch.randn(4096, 2000, generator=g))
    assert neuron_stats(masks, norms={"0": model[1]})["bn_sigma/fan_in_slope"] == pytest.approx(0.5, abs=0.03)
    # ... and the statistic reads sigma, not the weights: equal row norms make BN's sigma independent of n_i.
    with torch.no_grad():
        model[0].weight.div_(model[0].weight.norm(dim=1, keepdim=True).clamp_min(1e-12))
    model(torch.randn(4096, 2000, generator=g))
    assert neuron_stats(masks, norms={"0": model[1]})["bn_sigma/fan_in_slope"] == pytest.approx(0.0, abs=0.03)


def test_norm_fan_in_slope_per_layer_centring():
    n = torch.tensor([1.0, 2, 4, 8])
    # two layers with the same slope (1) at very different scales: the pooled slope stays 1
    assert norm_fan_in_slope([(n, n * 1000), (n, n * 0.001)]) == pytest.approx(1.0)
    assert norm_fan_in_slope([(torch.ones(4) * 3, torch.rand(4))]) is None


def test_update_probe_windows():
    probe = UpdateProbe(window=3)
    for v in [5.0, 4.0, 3.0, 2.0]:
        probe.record(torch.tensor(v))
    probe.begin({"step": 3}, loss_after=torch.tensor(2.5))
    for v in [1.0, 0.0, 6.0, 9.0]:
        probe.record(torch.tensor(v))
    (rec,) = probe.flush()
    assert rec["step"] == 3
    assert rec["loss_before"] == 2.0 and rec["loss_after"] == 2.5
    assert rec["loss_window_before"] == pytest.approx(3.0)  # 4, 3, 2
    assert rec["loss_window_after"] == pytest.approx(7 / 3)  # 1, 0, 6 (the window is full at 3)
    assert rec["window_after_steps"] == 3
    assert probe.flush() == []


def test_loss_on_batch_leaves_batchnorm_statistics_untouched():
    import copy

    model = SmallConvNet().train()
    x, y = batches(1)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = nn.functional.cross_entropy(copy.deepcopy(model)(x), y)  # training mode: batch statistics
    loss = loss_on_batch(model, nn.CrossEntropyLoss(), x, y, lambda: torch.autocast("cpu", enabled=False))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running mean / var / num_batches_tracked unchanged


def test_smoothing_computes_the_fan_in_scale_once_per_mask_change(monkeypatch):
    import sparseopt.optim.sparseopt as mod

    calls = []
    real = mod.neuron_scales
    monkeypatch.setattr(mod, "neuron_scales", lambda mask, group=1: calls.append(1) or real(mask, group))
    model, masks, opt = _smoothed_sparseopt()
    for _ in _sgd_steps(model, opt, 3):
        pass
    assert len(calls) == len(masks)  # smoothed every step, recomputed from the masks only when they change
    masks.mark_changed()
    opt.step()
    assert len(calls) == 2 * len(masks)


def test_sigma_slope_script_reads_what_the_monitor_logged(tmp_path):
    """scripts/bn_sigma_slope.py recomputes, from a run's final checkpoint, the slope the trainer logged."""
    import importlib.util
    import json
    from pathlib import Path

    from sparseopt.cli.main import main
    from sparseopt.runs import read_metrics

    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--train-subset", "512", "--quiet", "--no-compare-optimizers",
                 "--out", str(run)]) == 0
    logged = read_metrics(run)[-1]["bn_sigma/fan_in_slope"]
    script = Path(__file__).resolve().parents[1] / "scripts" / "bn_sigma_slope.py"
    spec = importlib.util.spec_from_file_location("bn_sigma_slope", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path), "--json", str(tmp_path / "slopes.json")]) == 0
    (row,) = json.loads((tmp_path / "slopes.json").read_text())
    assert row["run"] == "run" and row["epoch"] == 1
    assert row["bn_sigma/fan_in_slope"] == pytest.approx(logged, abs=1e-9) and 0.0 < logged < 2.0
