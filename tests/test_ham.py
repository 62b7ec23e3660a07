import io
import math

import pytest
import torch
from conftest import SmallConvNet, batches
from torch import nn

import sparseopt
from sparseopt.optim.ham import ham_update_
from sparseopt.train.build import build_run, make_model
from sparseopt.train.config import make_config
from sparseopt.train.trainer import run_name


def _expected(w_after_base, g, lr, alpha, beta):
    sign = 0.0 if w_after_base == 0 else math.copysign(1.0, w_after_base)
    exponent = max(-5.0, min(5.0, lr * (-alpha * sign * g - beta)))
    return w_after_base * math.exp(exponent)


def test_ham_step_equals_formula_hand_made():
    # entries: ordinary, sign change in the base step, exact zero, clamped high, clamped low
    w0 = torch.tensor([[0.5, 0.01, 0.0], [-0.3, 2.0, -1.0]])
    g = torch.tensor([[0.2, 0.3, 0.7], [-0.4, -3.0, -3.0]])
    lr, alpha, beta = 0.1, 20.0, 0.5
    p = nn.Parameter(w0.clone())
    opt = sparseopt.HAM(torch.optim.SGD([p], lr=lr), alpha=alpha, beta=beta)
    p.grad = g.clone()
    opt.step()
    for i in range(2):
        for j in range(3):
            base = w0[i, j].item() - lr * g[i, j].item()
            assert p[i, j].item() == pytest.approx(_expected(base, g[i, j].item(), lr, alpha, beta), rel=1e-6), (i, j)
    assert p[0, 1].item() < 0  # the base step flipped the sign; HAM used sign(w) after the step
    assert p[1, 1].item() == pytest.approx((2.0 + 0.3) * math.exp(5.0), rel=1e-6)  # clamped at +5
    assert p[1, 2].item() == pytest.approx((-1.0 + 0.3) * math.exp(-5.0), rel=1e-6)  # clamped at -5


def test_zero_stays_zero_and_foreach_equals_single_tensor_path():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 5, generator=g), torch.randn(3, 2, 3, 3, generator=g)]
    ws[0][0, :3] = 0.0
    grads = [torch.randn(w.shape, generator=g) for w in ws]
    a, b = [w.clone() for w in ws], [w.clone() for w in ws]
    ham_update_(a, grads, 0.05, 200.0, 1e-3, foreach=True)
    ham_update_(b, grads, 0.05, 200.0, 1e-3, foreach=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)  # the same operations in the same order: the same bits (foreach=None on CPU is b)
    assert torch.count_nonzero(a[0][0, :3]) == 0


def test_bias_and_norm_parameters_untouched():
    torch.manual_seed(0)
    model = SmallConvNet()
    ref = SmallConvNet()
    ref.load_state_dict(model.state_dict())
    ham = sparseopt.HAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), alpha=200.0, beta=0.01)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(1):  # one step: both models see the same gradients
        for m, o in ((model, ham), (ref, sgd)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.dim() < 2:  # BN weight/bias, fc bias
            assert torch.equal(p, q), name
        else:
            assert not torch.equal(p, q), name


def test_alpha_beta_zero_equals_base_exactly():
    torch.manual_seed(0)
    model, ref = SmallConvNet(), SmallConvNet()
    ref.load_state_dict(model.state_dict())
    ham = sparseopt.HAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), alpha=0.0, beta=0.0)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in batches(5):
        for m, o in ((model, ham), (ref, sgd)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_composition_order_sparseopt_ham_sgd_matches_hand_written_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    masks = sparseopt.MaskSet(model, {"0": mask})
    lr, alpha, beta = 0.05, 100.0, 0.01
    opt = sparseopt.SparseOpt(sparseopt.HAM(torch.optim.SGD(model.parameters(), lr=lr), alpha=alpha, beta=beta), masks, layers="all")
    w = model[0].weight.detach().clone()
    model(torch.randn(5, 6)).pow(2).sum().backward()
    g = model[0].weight.grad.clone()
    opt.step()
    c = sparseopt.neuron_scales(mask)[:, None]
    g_hat = g * c * mask  # 1. SparseOpt correction
    w1 = w - lr * g_hat  # 2. SGD step on the corrected gradient
    expected = w1 * torch.exp((lr * (-alpha * torch.sign(w1) * g_hat - beta)).clamp(-5, 5))  # 3. hyperbolic step
    expected = expected * mask  # 4. masks re-applied
    torch.testing.assert_close(model[0].weight, expected, rtol=1e-6, atol=1e-7)


def test_ham_reads_scheduled_lr_and_round_trips_state():
    p = nn.Parameter(torch.tensor([[1.0, -1.0]]))
    opt = sparseopt.HAM(torch.optim.SGD([p], lr=1.0), alpha=0.0, beta=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[1.0, -1.0]]) * math.exp(-0.5))  # lr 0.5 used, not 1.0
    sched.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = sparseopt.HAM(torch.optim.SGD([p], lr=1.0), alpha=0.0, beta=1.0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="HAM alpha must be a finite number >= 0"):
        sparseopt.HAM(torch.optim.SGD([p], lr=1.0), alpha=-1.0)


def test_max_weight_norm():
    p = nn.Parameter(torch.full((3, 3), 10.0))
    opt = sparseopt.HAM(torch.optim.SGD([p], lr=0.0), alpha=0.0, beta=0.0, max_weight_norm=2.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert p.norm().item() == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("precondition", [False, True])
def test_renorm_clips_only_large_gradients(precondition):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    masks = sparseopt.sparsify(model, 0.5, "uniform")
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.0), masks, precondition=precondition, max_grad_norm=1.0)
    for scale, expect_clipped in ((1e-3, False), (1e3, True)):
        opt.zero_grad()
        (scale * model(torch.randn(16, 8)).pow(2).sum()).backward()
        raw = [p.grad.clone() for p in model.parameters()]
        opt.precondition_grads_()  # what the step will see before clipping
        norm_before = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()
        for p, g in zip(model.parameters(), raw):
            p.grad.copy_(g)
        masks_version = masks.version
        opt.step()  # lr = 0: weights unchanged, gradients left as clipped
        after = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()
        assert masks.version == masks_version
        if expect_clipped:
            assert norm_before > 1.0 and after == pytest.approx(1.0, rel=1e-5)
        else:
            assert norm_before < 1.0 and after == pytest.approx(norm_before, rel=1e-6)


def test_cli_flags_reach_the_objects(tmp_path):
    from sparseopt.cli.main import main

    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--quiet", "--no-compare-optimizers", "--train-subset", "512", "--ham",
            "--ham-alpha", "50", "--ham-beta", "0.01", "--max-grad-norm", "0.5", "--growth-gradient", "corrected", "--out", str(out)]
    assert main(args) == 0
    cfg = make_config(out / "config.yaml")
    assert (cfg.ham, cfg.ham_alpha, cfg.ham_beta, cfg.max_grad_norm, cfg.growth_gradient) == (True, 50.0, 0.01, 0.5, "corrected")
    run = build_run(cfg, make_model(cfg), total_steps=100, peak_lr=cfg.lr)
    assert isinstance(run.optimizer, sparseopt.SparseOpt) and run.optimizer.max_grad_norm == 0.5
    assert isinstance(run.optimizer.base, sparseopt.HAM) and run.optimizer.base.alpha == 50.0 and run.optimizer.base.beta == 0.01
    assert run.topology.growth_gradient == "corrected"
    import json

    method = json.loads((out / "results.json").read_text())["method"]
    assert {k: method[k] for k in ("dst", "optimizer", "ham", "max_grad_norm", "growth_gradient", "sparsity", "epochs", "seed")} == {
        "dst": "rigl", "optimizer": "sparseopt", "ham": True, "max_grad_norm": 0.5, "growth_gradient": "corrected",
        "sparsity": 0.95, "epochs": 1, "seed": 0}
    assert run_name(cfg) == "bundled_mnist-mlp-rigl-sparseopt-s0.95-ham-renorm0.5-grow-corrected-e1-seed0"


def test_dense_run_with_ham_and_renorm(tmp_path):
    cfg = make_config(overrides={"dst": "dense", "optimizer": "sgd", "ham": True})
    run = build_run(cfg.validate(), make_model(cfg), total_steps=10, peak_lr=0.1)
    assert isinstance(run.optimizer, sparseopt.HAM) and run.masks is None


def _authors_step(params, grads, lr, alpha=200.0, beta=1e-3, max_weight_norm=1000.0, max_grad_norm=20.0):
    """An independent re-derivation of the authors' HamOptimizerWrapper step (TomJacobs05/HAM) after plain SGD,
    element by element in float64 Python: SGD step; HAM on tensors of ndim >= 2 and nonzero entries; weight-norm
    clip of every parameter; the group's gradient norm clipped after the step. Returns (weights, grads) as lists."""
    out_w, out_g = [], []
    for w, g in zip(params, grads):
        flat_w, flat_g = w.double().flatten().tolist(), g.double().flatten().tolist()
        new = [wi - lr * gi for wi, gi in zip(flat_w, flat_g)]
        if w.dim() >= 2:
            new = [wi if wi == 0 else wi * math.exp(max(-5.0, min(5.0, lr * (-alpha * math.copysign(1.0, wi) * gi - beta))))
                   for wi, gi in zip(new, flat_g)]
        norm = math.sqrt(sum(v * v for v in new))
        if norm > max_weight_norm:
            new = [v * max_weight_norm / norm for v in new]
        out_w.append(torch.tensor(new, dtype=torch.float64).reshape(w.shape))
        out_g.append(flat_g)
    total = math.sqrt(sum(v * v for g in out_g for v in g))
    factor = min(1.0, max_grad_norm / (total + 1e-6))  # torch's clip_grad_norm_ adds 1e-6, as the authors call it
    return out_w, [torch.tensor([v * factor for v in g], dtype=torch.float64).reshape(p.shape) for g, p in zip(out_g, params)]


@pytest.mark.parametrize("foreach", [True, False])
def test_ham_matches_an_independent_rederivation_of_the_authors_code(foreach):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g) * 0.3
    weight[0, :2] = 0.0                                     # masked entries stay zero
    big = torch.full((4, 4), 400.0)                         # norm 1600 > 1000: clipped
    bias = torch.full((30,), 200.0)                         # 1-D: no HAM step, but its norm (1095) is clipped too
    grads = [torch.randn(6, 5, generator=g) * 30, torch.randn(4, 4, generator=g), torch.randn(30, generator=g) * 10]
    grads[0][1, 1] = 500.0                                  # exponent clamped at -5 or +5
    grads[0][0, :2] = 0.0                                   # masked: no gradient, so the base step keeps them at 0
    params = [nn.Parameter(t.clone()) for t in (weight, big, bias)]
    lr = 0.05
    opt = sparseopt.HAM(torch.optim.SGD(params, lr=lr), foreach=foreach)  # the authors' defaults
    assert (opt.alpha, opt.beta, opt.max_weight_norm, opt.max_grad_norm) == (200.0, 1e-3, 1000.0, 20.0)
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    opt.step()
    want_w, want_g = _authors_step([weight, big, bias], grads, lr)
    for p, w, gr in zip(params, want_w, want_g):
        torch.testing.assert_close(p.detach().double(), w, rtol=2e-6, atol=1e-9)
        torch.testing.assert_close(p.grad.double(), gr, rtol=2e-6, atol=1e-9)
    assert params[0][0, :2].eq(0).all()
    assert params[1].norm().item() == pytest.approx(1000.0, rel=1e-6)
    assert params[2].norm().item() == pytest.approx(1000.0, rel=1e-6)
    assert sum(p.grad.pow(2).sum() for p in params).sqrt().item() == pytest.approx(20.0, rel=1e-5)


def test_ham_gradient_clip_after_the_step_changes_nothing_in_sparseopts_loop():
    # RigL reads the gradient before optimizer.step(), so the authors' post-step clip cannot change what it grows.
    def train(max_grad_norm):
        torch.manual_seed(0)
        model = SmallConvNet()
        masks = sparseopt.sparsify(model, 0.8, generator=torch.Generator().manual_seed(0))
        opt = sparseopt.SparseOpt(sparseopt.HAM(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
                                                max_grad_norm=max_grad_norm), masks)
        rigl = sparseopt.RigL(masks, opt, delta_t=2, alpha=0.5, total_steps=12)
        for x, y in batches(12, seed=3):
            opt.zero_grad()
            (1000 * nn.functional.cross_entropy(model(x), y)).backward()  # gradients far above the clip norm
            rigl.step()
            opt.step()
        return model, masks

    clipped, no_clip = train(1e-3), train(None)
    assert all(torch.equal(a, b) for a, b in zip(clipped[1].masks, no_clip[1].masks))
    for a, b in zip(clipped[0].parameters(), no_clip[0].parameters()):
        assert torch.equal(a, b)


def test_a_checkpoint_continues_only_the_ham_it_was_written_by():
    """HAM checks its saved settings on load, as SparseOpt does: other settings are one clear error."""
    model = nn.Linear(4, 3)
    saved = sparseopt.HAM(torch.optim.SGD(model.parameters(), lr=0.1), alpha=200.0).state_dict()
    sparseopt.HAM(torch.optim.SGD(model.parameters(), lr=0.1), alpha=200.0).load_state_dict(saved)  # the same: fine
    with pytest.raises(ValueError, match="written with HAM alpha=200.0, this HAM has alpha=100.0"):
        sparseopt.HAM(torch.optim.SGD(model.parameters(), lr=0.1), alpha=100.0).load_state_dict(saved)
    del saved["wrapper"]["clamp"]  # a checkpoint from before a setting was recorded: not checked
    sparseopt.HAM(torch.optim.SGD(model.parameters(), lr=0.1), alpha=200.0, clamp=3.0).load_state_dict(saved)
