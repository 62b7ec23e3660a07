"""The library without hidden assumptions (issue 12): mask state follows the model, loads re-apply masks,
non-finite growth, GradScaler, MultiheadAttention and embeddings, registries."""

import pytest
import torch
from conftest import SmallConvNet, batches
from torch import nn

import sparseopt


def _rigl(model, **opt_kw):
    masks = sparseopt.sparsify(model, 0.8, generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), masks, **opt_kw)
    return masks, opt, sparseopt.RigL(masks, opt, delta_t=2, t_end=100)


def _rigl_with_gradients(**opt_kw):
    """A SmallConvNet under RigL + SparseOpt with the gradients of one batch, and that batch."""
    torch.manual_seed(0)
    model = SmallConvNet()
    masks, opt, rigl = _rigl(model, **opt_kw)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    return model, masks, opt, rigl, (x, y)


def _train(model, masks, opt, rigl, data, dtype=torch.float32):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
        rigl.step()
        opt.step()


def test_mask_state_follows_a_dtype_move():
    torch.manual_seed(0)
    model = SmallConvNet()
    masks, opt, rigl = _rigl(model, undamped_growth=True, scale_ema=0.5)
    _train(model, masks, opt, rigl, batches(3))
    model.double()
    _train(model, masks, opt, rigl, batches(4, seed=1), torch.float64)
    assert rigl.num_updates == 3
    for layer in masks:
        assert layer.weight.dtype == torch.float64
        assert opt._multipliers[id(layer.weight)].dtype == torch.float64  # rebuilt, not the float32 cache
        assert torch.count_nonzero(layer.weight * ~layer.mask) == 0
    assert 0.2 < masks.itop_rate() < 1


def test_mask_state_follows_a_device_move_to_meta():
    torch.manual_seed(0)
    model = SmallConvNet()
    masks, opt, rigl = _rigl(model, undamped_growth=True)
    _train(model, masks, opt, rigl, batches(3))
    model.to("meta")
    assert {e.device.type for e in masks.explored} == {"meta"}
    assert {g.device.type for g in masks.grown_on_device()} == {"meta"}
    x, y = batches(1)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x.to("meta")), y.to("meta")).backward()
    opt.step()  # no data-dependent branch and no cache on the old device
    assert {opt._multipliers[id(w)].device.type for w in masks.weights} == {"meta"}


def test_loading_a_dense_state_dict_reapplies_the_masks():
    torch.manual_seed(0)
    dense = SmallConvNet()
    torch.manual_seed(1)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.9)
    state = {k: v for k, v in dense.state_dict().items()}  # no weight_mask entries
    incompatible = model.load_state_dict(state, strict=False)
    assert sorted(incompatible.missing_keys) == sorted(f"{n}.weight_mask" for n in masks.names)
    for layer in masks:
        assert torch.count_nonzero(layer.weight * ~layer.mask) == 0
        assert torch.equal(layer.weight[layer.mask], dense.state_dict()[f"{layer.name}.weight"][layer.mask])


def test_growth_with_non_finite_scores_is_skipped_and_never_shrinks_a_layer():
    model, masks, opt, rigl, _ = _rigl_with_gradients()
    counts = masks.num_active()
    model.conv2.weight.grad[0, 0] = float("inf")  # an fp16 overflow
    before = [m.clone() for m in masks.masks]
    assert rigl.update(0.3) is False
    assert rigl.skipped_updates == 1 and rigl.last_update["skipped"] == "non-finite growth scores"
    assert all(torch.equal(a, b) for a, b in zip(before, masks.masks)) and rigl.num_updates == 0
    # and prune_and_grow itself grows only inactive positions, even with too few finite candidates
    mask = torch.tensor([True, True, True, False, False, False])
    scores = torch.tensor([9.0, 9.0, 9.0, float("nan"), float("nan"), float("nan")])
    kept, new = sparseopt.prune_and_grow(mask, torch.tensor([1.0, 2.0, 3.0, 0, 0, 0]), scores, 2)
    assert int(new.sum()) == 3 and kept.tolist() == [False, False, True, False, False, False]
    assert masks.num_active() == counts


def test_grad_scaler_overflow_on_an_update_step_does_not_skip_the_next_good_step():
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8, generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks)
    rigl = sparseopt.RigL(masks, opt, delta_t=1, t_end=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = batches(3)
    # step 1 is an update step (t = 1); make its gradients overflow after the backward pass
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if t == 1:
            model.fc.weight.grad[0, 0] = float("inf")
        updated = rigl.step()
        before = [w.clone() for w in masks.weights]
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(a, b) for a, b in zip(before, masks.weights))
        if t == 1:
            assert not updated and rigl.skipped_updates == 1  # non-finite scores: no topology change
            assert not moved  # the scaler skipped the overflow step
        if t == 2:
            assert updated and not moved  # a real update step: its weight update is skipped, as RigL does
    # and a request left over by a step the scaler skipped expires at zero_grad
    opt.skip_next_step()
    opt.zero_grad()
    x, y = data[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = [w.clone() for w in masks.weights]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, masks.weights))


def test_attention_projections_are_masked_and_what_stays_dense_is_reported(caplog):
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    with caplog.at_level("INFO", logger="sparseopt"):
        masks = sparseopt.sparsify(block, 0.9, "uniform")
    assert masks.names == ["self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"]
    assert masks.unmasked_weights() == [] and "stay dense" not in caplog.text
    assert masks.density() == pytest.approx(0.1, abs=1e-3)
    # biases and LayerNorm parameters are dense: the whole block is a little denser than its weights
    params = sum(p.numel() for p in block.parameters())
    weights = masks.total
    assert masks.model_density() == pytest.approx((params - weights + 0.1 * weights) / params, abs=1e-3)
    assert masks.stats()["density_model"] == masks.model_density()
    opt = sparseopt.SparseOpt(torch.optim.SGD(block.parameters(), lr=0.1, momentum=0.9), masks)
    rigl = sparseopt.RigL(masks, opt, delta_t=2, t_end=10)
    for _ in range(5):
        opt.zero_grad()
        block(torch.randn(4, 6, 32)).pow(2).mean().backward()
        rigl.step()
        opt.step()
    assert rigl.num_updates == 2
    for layer in masks:
        assert torch.count_nonzero(layer.weight * ~layer.mask) == 0
    assert "self_attn.in_proj_weight_mask" in block.state_dict()
    # separate key / value sizes: three projection weights
    attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)
    assert sparseopt.sparsify(attn, 0.5).names == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj"]


def test_embeddings_are_opt_in_and_dense_ones_are_logged(caplog):
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 8))
    with caplog.at_level("INFO", logger="sparseopt"):
        masks = sparseopt.sparsify(model, 0.5)
    assert masks.names == ["1"] and masks.unmasked_weights() == [("0.weight", 1600)]
    assert "1 weights stay dense (0.weight (1600))" in caplog.text
    assert masks.model_density() == pytest.approx((1600 + 8 + 64) / (1600 + 128 + 8), abs=1e-9)
    model2 = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 8))
    assert sparseopt.sparsify(model2, 0.5, embeddings=True).names == ["0", "1"]


class _TiedDecoder(nn.Module):
    """A language-model head whose output layer shares the embedding table (weight tying)."""

    def __init__(self):
        super().__init__()
        self.emb, self.hidden, self.out = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.hidden(self.emb(x)))


def test_a_tied_weight_gets_one_mask_and_its_reported_density_is_the_real_one():
    masks = sparseopt.sparsify(_TiedDecoder(), 0.9, embeddings=True, generator=torch.Generator().manual_seed(0))
    assert masks.names == ["emb", "hidden"]  # the decoder's weight is the embedding table: masked once
    table = masks.model.emb.weight
    assert (table != 0).float().mean().item() == pytest.approx(masks.densities()["emb"], abs=1e-6)
    # Without embeddings the table stays dense, and so does the output layer that shares it.
    dense = _TiedDecoder()
    assert sparseopt.sparsify(dense, 0.9).names == ["hidden"] and bool((dense.emb.weight != 0).all())
    with pytest.raises(ValueError, match="'emb' and 'out' share one weight"):
        sparseopt.MaskSet(_TiedDecoder(), {"emb": torch.ones(50, 16), "out": torch.ones(50, 16)})


def test_extensions_are_one_register_call_each(tmp_path):
    from sparseopt.cli.main import main
    from sparseopt.masks.distributions import erk_densities

    @sparseopt.DST_METHODS.register("grow_smallest")
    class GrowSmallest(sparseopt.DSTUpdater):  # a toy method: grow where the gradient is smallest
        def grow_scores(self, index, layer):
            return -layer.weight.grad.abs()

    sparseopt.DISTRIBUTIONS.register("erk_squared", lambda names, shapes, s, **kw: erk_densities(shapes, s, power_scale=2.0))
    sparseopt.PRUNE_SCORES.register("random_order", lambda weight, mask, scale: torch.rand_like(weight))
    try:
        with pytest.raises(ValueError, match="DST method 'rigl' is already registered"):
            sparseopt.DST_METHODS.register("rigl", GrowSmallest)
        out = tmp_path / "run"
        assert main(["train", "--dst", "grow_smallest", "--distribution", "erk_squared", "--prune-score", "random_order",
                     "--epochs", "1", "--train-subset", "512", "--delta-t", "1", "--quiet", "--no-compare-optimizers",
                     "--out", str(out)]) == 0
        import json

        results = json.loads((out / "results.json").read_text())
        assert results["topology_updates"] == 2 and results["resolved"]["prune_score"] == "random_order"
        with pytest.raises(ValueError, match="unknown DST method 'nope'; choose one of .*'grow_smallest'"):
            sparseopt.DST_METHODS["nope"]
    finally:
        for registry, name in ((sparseopt.DST_METHODS, "grow_smallest"), (sparseopt.DISTRIBUTIONS, "erk_squared"),
                               (sparseopt.PRUNE_SCORES, "random_order")):
            registry.unregister(name)


def test_compiled_model_trains_like_eager_across_topology_updates():
    def run(compiled):
        torch.manual_seed(0)
        model = SmallConvNet()
        masks, opt, rigl = _rigl(model)
        forward = torch.compile(model) if compiled else model
        for x, y in batches(6):
            opt.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            rigl.step()
            opt.step()
        return model, masks, rigl, opt

    eager, eager_masks, eager_rigl, _ = run(False)
    compiled, masks, rigl, opt = run(True)
    assert rigl.num_updates == eager_rigl.num_updates == 2
    for a, b in zip(eager_masks.masks, masks.masks):
        assert torch.equal(a, b)  # the same topology: masks are buffers the compiled graph reads in place
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_multipliers_keep_their_storage_across_mask_updates():
    model, masks, opt, rigl, (x, y) = _rigl_with_gradients()
    opt.step()
    before = {k: v.data_ptr() for k, v in opt._multipliers.items()}
    values = {k: v.clone() for k, v in opt._multipliers.items()}
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    rigl.update(0.3)
    opt.step()  # the update step itself is skipped (reference RigL)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert {k: v.data_ptr() for k, v in opt._multipliers.items()} == before  # updated in place (CUDA graphs)
    assert any(not torch.equal(values[k], v) for k, v in opt._multipliers.items())  # with the new masks' values
