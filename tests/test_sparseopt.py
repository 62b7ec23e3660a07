import io

import pytest
import torch
from conftest import SmallConvNet, batches
from torch import nn

import sparseopt
from sparseopt.optim.preconditioner import gradient_multiplier


def test_neuron_scales_hand_made():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # n = [4, 1, 3, 0], n_avg = 2
    expected = torch.tensor([2**0.5, 0.5**0.5, 1.5**0.5, 0.0])
    torch.testing.assert_close(sparseopt.neuron_scales(mask), expected)


def test_neuron_scales_uniform_fan_in_is_identity():
    dense = torch.ones(5, 3, 3, 3, dtype=torch.bool)
    assert torch.equal(sparseopt.neuron_scales(dense), torch.ones(5))
    # 2:4 (N:M) along the input dimension: every neuron has the same fan-in.
    nm = torch.zeros(6, 8, dtype=torch.bool)
    for i in range(6):
        for block in range(2):
            nm[i, block * 4 + (i % 4)] = True
            nm[i, block * 4 + ((i + 1) % 4)] = True
    assert torch.equal(sparseopt.neuron_scales(nm), torch.ones(6))
    assert torch.equal(sparseopt.neuron_scales(torch.zeros(3, 4, dtype=torch.bool)), torch.zeros(3))


def test_scaling_preserves_the_norm_of_a_batchnorm_skewed_gradient():
    # The layer's gradient norm is approximately preserved for the gradient BN actually produces (each neuron's
    # gradient amplified by 1/sqrt(1 - s_i)), not for an arbitrary one: with i.i.d. entries it grows by
    # sqrt(1 + cv(n)^2).
    g = torch.Generator().manual_seed(0)
    out, inp = 128, 1024
    mask = torch.rand(out, inp, generator=g) < torch.linspace(0.02, 0.5, out)[:, None]
    layer = nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, inp, generator=g) * mask / inp**0.5)
    head = nn.Linear(out, 10)
    x, y = torch.randn(512, inp, generator=g), torch.randint(0, 10, (512,), generator=g)
    nn.functional.cross_entropy(head(torch.relu(nn.BatchNorm1d(out)(layer(x)))), y).backward()
    grad = layer.weight.grad * mask
    c = sparseopt.neuron_scales(mask)[:, None]
    assert (grad * c).norm() / grad.norm() == pytest.approx(1.0, abs=0.1)
    iid = torch.randn(out, inp, generator=g) * mask
    n = mask.sum(1).float()
    grown = ((iid * c).norm() / iid.norm()).item()
    assert grown == pytest.approx((1 + (n.std(unbiased=False) / n.mean()) ** 2).sqrt().item(), rel=0.02)
    assert grown > 1.1  # so the first check is not a tautology


def _sgd_model(precondition=True, **kw):
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8, generator=torch.Generator().manual_seed(0))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("layers", "all")  # these tests check the scaling itself on every masked layer
    kw.setdefault("scale_source", "fan_in")  # the paper's c_i, computed from the masks alone
    return model, masks, sparseopt.SparseOpt(base, masks, precondition=precondition, **kw)


def _backward(model, seed=0):
    x, y = batches(1, seed=seed)[0]
    nn.functional.cross_entropy(model(x), y).backward()


def test_gradients_scaled_in_place_by_c_times_mask():
    model, masks, opt = _sgd_model()
    _backward(model)
    raw = [w.grad.clone() for w in masks.weights]
    opt.precondition_grads_()
    for layer, g in zip(masks, raw):
        c = sparseopt.neuron_scales(layer.mask).reshape(-1, *([1] * (g.dim() - 1)))
        torch.testing.assert_close(layer.weight.grad, g * c * layer.mask, rtol=0, atol=0)


def test_baseline_and_sparseopt_differ_only_by_the_scaling():
    results = []
    for precondition in (False, True):
        model, masks, opt = _sgd_model(precondition)
        w0 = [w.clone() for w in masks.weights]
        _backward(model)
        raw = [w.grad.clone() for w in masks.weights]
        opt.step()
        results.append([(w0_ - w) / 0.1 for w0_, w in zip(w0, masks.weights)])  # = applied gradient
        scale = [sparseopt.neuron_scales(m) if precondition else torch.ones(m.shape[0]) for m in masks.masks]
        for upd, g, m, c in zip(results[-1], raw, masks.masks, scale):
            torch.testing.assert_close(upd, g * m * c.reshape(-1, *([1] * (g.dim() - 1))), rtol=1e-5, atol=1e-6)


def test_scales_cached_until_mask_changes(monkeypatch):
    model, masks, opt = _sgd_model()
    calls = []
    import sparseopt.optim.sparseopt as mod

    def counting(*a, **k):
        calls.append(1)
        return gradient_multiplier(*a, **k)

    monkeypatch.setattr(mod, "gradient_multiplier", counting)
    for _ in range(3):
        _backward(model)
        opt.step()
    assert len(calls) == len(masks)  # computed once
    masks.mark_changed()
    _backward(model)
    opt.step()
    assert len(calls) == 2 * len(masks)


def test_param_groups_shared_with_base_and_schedulers_work():
    model, masks, opt = _sgd_model()
    assert opt.param_groups is opt.base.param_groups
    assert opt.state is opt.base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        _backward(model)
        opt.step()
        sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_grad_scaler_unscales_before_preconditioning():
    model, masks, opt = _sgd_model()
    ref_model, ref_masks, ref_opt = _sgd_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batches(1)[0]
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    nn.functional.cross_entropy(ref_model(x), y).backward()
    ref_opt.step()
    for a, b in zip(masks.weights, ref_masks.weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip():
    model, masks, opt = _sgd_model(max_grad_norm=2.0)
    opt.base.param_groups[0]["momentum"] = 0.0
    _backward(model)
    opt.step()
    opt.skip_next_step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    _, _, fresh = _sgd_model(max_grad_norm=2.0)
    fresh.load_state_dict(state)
    assert fresh._skip_next is True
    assert fresh.preconditioned_layers == opt.preconditioned_layers
    _, _, other = _sgd_model(precondition=False)
    with pytest.raises(ValueError, match="precondition=True"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="expects"):
        fresh.load_state_dict(opt.base.state_dict())


def test_optimizer_must_hold_masked_weights(convnet):
    masks = sparseopt.sparsify(convnet, 0.5)
    base = torch.optim.SGD(convnet.fc.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold the weights of masked layers \['conv1', 'conv2'\]"):
        sparseopt.SparseOpt(base, masks)
    with pytest.raises(ValueError, match="unknown layers='some'"):
        sparseopt.SparseOpt(torch.optim.SGD(convnet.parameters(), lr=0.1), masks, layers="some")


def test_normalized_layers_detected_from_the_model():
    model, masks, opt = _sgd_model(layers="normalized")
    with pytest.raises(RuntimeError, match="first forward pass"):
        _ = opt.preconditioned_layers
    _backward(model)
    assert opt.preconditioned_layers == ["conv1", "conv2"]  # fc feeds no norm layer
    raw_fc = masks.weights[-1].grad.clone()
    opt.precondition_grads_()
    torch.testing.assert_close(masks.weights[-1].grad, raw_fc * masks["fc"], rtol=0, atol=0)
    _, _, custom = _sgd_model(layers=["fc"])
    assert custom.preconditioned_layers == ["fc"]
    assert custom.layers == ["fc"] and custom.config()["layers"] == ["fc"]  # the names, not the string 'custom'
    assert _sgd_model(precondition=False)[2].preconditioned_layers == []


def test_a_model_without_normalized_layers_is_told_that_nothing_is_preconditioned(caplog):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = sparseopt.SparseOpt(torch.optim.SGD(plain.parameters(), lr=0.1), sparseopt.sparsify(plain, 0.5))
    with caplog.at_level("WARNING", logger="sparseopt"):
        nn.functional.cross_entropy(plain(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    assert opt.preconditioned_layers == [] and "trains exactly as the masked baseline" in caplog.text
    caplog.clear()
    model, _, normalized = _sgd_model(layers="normalized")
    with caplog.at_level("WARNING", logger="sparseopt"):
        _backward(model)
        normalized.step()
    assert normalized.preconditioned_layers == ["conv1", "conv2"] and caplog.text == ""


def test_max_grad_norm_clips_global_norm():
    model, masks, opt = _sgd_model(max_grad_norm=1e-3)
    _backward(model)
    params = [p for p in model.parameters()]
    w0 = [p.clone() for p in params]
    opt.step()
    # the applied update is lr * clipped grad: global norm exactly lr * 1e-3
    update = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(w0, params)))
    assert update.item() == pytest.approx(0.1 * 1e-3, rel=1e-4)


def test_scale_weight_decay_folds_l2_into_gradient_before_scaling():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    masks = sparseopt.MaskSet(model, {"0": mask})
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=0.1), masks, scale_weight_decay=True, layers="all")
    w = model[0].weight.detach().clone()
    model(torch.randn(3, 6)).sum().backward()
    g = model[0].weight.grad.clone()
    opt.step()
    c = sparseopt.neuron_scales(mask)[:, None]
    torch.testing.assert_close(model[0].weight, w - (g + 0.1 * w) * c * mask)
    assert opt.param_groups[0]["weight_decay"] == 0.1  # restored after the step


def _mlp_grad_ratio(mask_rows, n_batches=20, bn=True, seed=0):
    """Per-neuron mean |g_sparse| / mean |g_dense| over active entries, shared init, random inputs."""
    torch.manual_seed(seed)

    def make():
        layers = [nn.Linear(784, 64)] + ([nn.BatchNorm1d(64)] if bn else []) + [nn.ReLU(), nn.Linear(64, 10)]
        return nn.Sequential(*layers)

    dense = make()
    sparse = make()
    sparse.load_state_dict(dense.state_dict())
    masks = sparseopt.MaskSet(sparse, {"0": mask_rows})
    g = torch.Generator().manual_seed(seed + 1)
    num = torch.zeros(64)
    den = torch.zeros(64)
    for _ in range(n_batches):
        x = torch.randn(64, 784, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        for model, acc in ((dense, den), (sparse, num)):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            acc += (model[0].weight.grad.abs() * mask_rows).sum(1) / mask_rows.sum(1)
    return num / den, masks


def test_bn_amplifies_sparse_gradients_by_inverse_sqrt_density():
    s = 0.9
    mask = torch.rand(64, 784, generator=torch.Generator().manual_seed(5)) >= s
    ratio, _ = _mlp_grad_ratio(mask)
    assert ratio.mean().item() == pytest.approx(1 / (1 - s) ** 0.5, rel=0.10)
    ratio_no_bn, _ = _mlp_grad_ratio(mask, bn=False)
    assert ratio_no_bn.mean().item() == pytest.approx(1.0, rel=0.10)


def test_sparseopt_scaling_removes_the_skew():
    # Non-uniform neuron sparsity s_i in [0.5, 0.97].
    gen = torch.Generator().manual_seed(7)
    s_i = torch.linspace(0.5, 0.97, 64)
    mask = torch.rand(64, 784, generator=gen) >= s_i[:, None]
    ratio, masks = _mlp_grad_ratio(mask)
    s = sparseopt.neuron_sparsity(mask)
    x = torch.log(1 - s)
    slope_before = torch.cov(torch.stack([x, torch.log(ratio)]))[0, 1] / x.var()
    corrected = ratio * sparseopt.neuron_scales(mask)
    slope_after = torch.cov(torch.stack([x, torch.log(corrected)]))[0, 1] / x.var()
    assert slope_before.item() == pytest.approx(-0.5, abs=0.1)  # ratio ~ (1 - s_i)^(-1/2)
    assert abs(slope_after.item()) < 0.1  # no trend left in s_i
    assert corrected.std() / corrected.mean() < 0.15


def test_normalized_layers_on_resnet20():
    from sparseopt.models import resnet20

    model = resnet20(10)
    masks = sparseopt.sparsify(model, 0.9)
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, layers="normalized")
    model(torch.randn(2, 3, 32, 32))
    convs = [n for n in masks.names if n != "fc"]
    assert opt.preconditioned_layers == convs and len(convs) == 21  # 19 convs + 2 projection shortcuts


def test_wrappers_copy_and_pickle_like_torch_optimizers():
    import copy
    import pickle

    model, masks, opt = _sgd_model(layers="normalized")
    _backward(model)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert type(clone) is sparseopt.SparseOpt and clone.preconditioned_layers == ["conv1", "conv2"]
        # one consistent copy: the copied optimizer holds the copied model's weights
        assert clone.base.param_groups[0]["params"][0] is clone.masks.weights[0]
        before = [w.clone() for w in masks.weights]
        _backward(clone.masks.model, seed=1)
        clone.step()
        assert all(torch.equal(a, b) for a, b in zip(before, masks.weights))  # the original is untouched
        assert all(torch.count_nonzero(w * ~m) == 0 for w, m in zip(clone.masks.weights, clone.masks.masks))
    ham = sparseopt.HAM(torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(copy.deepcopy(ham).base) is torch.optim.SGD


def test_every_kind_of_torch_optimizer_hook_runs_on_the_wrapper_and_on_its_pickled_copy():
    """The wrapper gets its hook registries from Optimizer.__setstate__ (no private names), and its state_dict
    runs torch's registries itself: this pins both on the installed torch (issue 28)."""
    import pickle

    model, masks, opt = _sgd_model()
    _backward(model)  # the first forward pass settles the layer detection and removes its hooks (picklable)
    for wrapper in (opt, pickle.loads(pickle.dumps(opt))):
        calls = []
        wrapper.register_step_pre_hook(lambda o, args, kwargs, calls=calls: calls.append("step-pre"))
        wrapper.register_step_post_hook(lambda o, args, kwargs, calls=calls: calls.append("step-post"))
        _backward(wrapper.masks.model)
        wrapper.step()
        assert calls == ["step-pre", "step-post"]
    model, masks, opt = _sgd_model()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load-pre", sd.get("extra"))))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    state = opt.state_dict()
    assert state["extra"] == 1 and calls == ["pre"]
    opt.load_state_dict(state)
    assert calls == ["pre", ("load-pre", 1), "load-post"]


def test_scale_sources_take_options_and_a_registered_function_is_one_line():
    """Scale sources could not take options, and a function registered as one was a raw TypeError (issue 28)."""
    from sparseopt.optim.scales import SCALE_SOURCES, ScaleSource, make_scale_source
    from sparseopt.train.config import make_config

    class PowerOfFanIn(ScaleSource):
        def __init__(self, power: float = 0.5):
            self.power = float(power)

        def scales(self, inputs, process_group=None):
            return [x.fan_in_scale.pow(2 * self.power) for x in inputs]  # (n_i / n_avg) ** 0.5

    SCALE_SOURCES.register("test_power", PowerOfFanIn)
    SCALE_SOURCES.register("test_function", lambda inputs: inputs)
    try:
        assert make_scale_source("test_power", {"power": 0.25}).power == 0.25
        with pytest.raises(ValueError, match="takes no option 'pwer'.*did you mean 'power'"):
            make_scale_source("test_power", {"pwer": 1})
        with pytest.raises(ValueError, match=r"scale source 'test_power' \(PowerOfFanIn\) with scale_kwargs .*could not convert"):
            make_scale_source("test_power", {"power": "abc"})
        with pytest.raises(ValueError, match="'test_function' is registered as function .*register a ScaleSource subclass"):
            make_scale_source("test_function")
        model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
        masks = sparseopt.sparsify(model, 0.5)
        opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, layers="all",
                                  scale_source="test_power", scale_kwargs={"power": 0.25})
        expected = [sparseopt.neuron_scales(m).pow(0.5) for m in masks.masks]
        assert all(torch.allclose(c, e) for c, e in zip(opt.layer_scales(), expected))
        cfg = make_config(None, {"scale_source": "test_power", "scale_kwargs": "power=0.25"}).validate()
        assert cfg.scale_kwargs == {"power": 0.25}
        with pytest.raises(ValueError, match="optimizer=sgd does not precondition, so scale_kwargs"):
            make_config(None, {"optimizer": "sgd", "scale_kwargs": "power=0.25"}).validate()
    finally:
        SCALE_SOURCES.unregister("test_power")
        SCALE_SOURCES.unregister("test_function")


def test_scale_input_fan_in_is_a_deprecated_name_of_fan_in_scale():
    from sparseopt.optim.scales import ScaleInput

    x = ScaleInput(layer=None, norm=None, fan_in_scale=torch.ones(3))
    with pytest.warns(DeprecationWarning, match="renamed fan_in_scale"):
        assert torch.equal(x.fan_in, x.fan_in_scale)
