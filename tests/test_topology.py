import math
from pathlib import Path

import pytest
import torch
from conftest import SmallConvNet, batches
from torch import nn

import sparseopt
from sparseopt.topology import is_update_step, prune_and_grow


def test_drop_fraction_schedule():
    assert sparseopt.drop_fraction(0, 0.3, 1000) == pytest.approx(0.3)
    assert sparseopt.drop_fraction(500, 0.3, 1000) == pytest.approx(0.15)
    assert sparseopt.drop_fraction(250, 0.3, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert sparseopt.drop_fraction(1000, 0.3, 1000) == 0.0
    assert sparseopt.drop_fraction(5000, 0.3, 1000) == 0.0


def test_update_steps_stop_at_t_end():
    steps = [t for t in range(1000) if is_update_step(t, 100, 750)]
    assert steps == [100, 200, 300, 400, 500, 600, 700]


def _linear_setup(mask, weight, grad, optimizer="sgd", **kw):
    model = nn.Sequential(nn.Linear(mask.shape[1], mask.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    masks = sparseopt.MaskSet(model, {"0": mask})
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(model.parameters())
    opt = sparseopt.SparseOpt(base, masks, precondition=False)
    model[0].weight.grad = grad.clone()
    return model, masks, opt


def test_rigl_grows_top_gradient_positions_hand_made():
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[0.5, -0.1, 0, 0, 0, 0], [0.05, 2.0, 0, 0, 0, 0]])
    grad = torch.tensor([[9.0, 9.0, 0.3, -0.9, 0.1, 0.0], [0.0, 0.0, 0.2, 0.0, -0.8, 0.7]])
    model, masks, opt = _linear_setup(mask, weight, grad)
    rigl = sparseopt.RigL(masks, opt, delta_t=1, t_end=10, alpha=0.5)
    rigl.update(0.5)  # drop int(0.5 * 4) = 2 smallest |w|: (0,1) and (1,0)
    # grow the 2 largest |grad| among non-kept: (0,1) has 9.0 (just dropped, regrown), then (0,3) 0.9
    expected = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(masks["0"], expected)
    w = model[0].weight
    assert w[0, 1].item() == pytest.approx(-0.1)  # regrown in the same update keeps its value
    assert w[0, 3].item() == 0.0 and w[1, 0].item() == 0.0  # new starts at 0, pruned is 0
    assert opt._skip_next


def test_keep_regrown_false_restarts_regrown_connections():
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    model, masks, opt = _linear_setup(mask, torch.tensor([[0.5, -0.1, 0, 0]]), torch.tensor([[0.0, 9.0, 0.5, 0.0]]))
    sparseopt.RigL(masks, opt, delta_t=1, t_end=10, keep_regrown=False).update(0.5)
    assert masks["0"].tolist() == [[True, True, False, False]]
    assert model[0].weight[0, 1].item() == 0.0


def test_corrected_growth_gradient_uses_sparseopt_scales():
    # row 0 dense-ish (n=3), row 1 sparse (n=1): c = sqrt(3/2), sqrt(1/2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[1.0, 1.0, 0.01, 0], [1.0, 0, 0, 0]])
    grad = torch.tensor([[0, 0, 0, 1.0], [0, 1.1, 0, 0]])
    for growth, expected_row in (("original", 1), ("corrected", 0)):
        model = nn.Sequential(nn.Linear(4, 2, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(weight)
        masks = sparseopt.MaskSet(model, {"0": mask.clone()})
        opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, layers="all", scale_source="fan_in")
        model[0].weight.grad = grad.clone()
        sparseopt.RigL(masks, opt, delta_t=1, t_end=10, growth_gradient=growth).update(0.25)  # drop 1
        grown = masks["0"] & ~mask
        assert grown.sum() == 1 and grown[expected_row].any(), growth


def test_ties_broken_by_position():
    mask = torch.tensor([True, True, False, False, False, False])
    kept, new = prune_and_grow(mask, torch.tensor([1.0, 1.0, 0, 0, 0, 0]), torch.zeros(6), 1)
    assert kept.tolist() == [True, False, False, False, False, False]
    assert new.tolist() == [True, True, False, False, False, False]  # all-zero grads: lowest index


def test_new_connections_have_zero_optimizer_state_for_any_optimizer():
    for optimizer in ("sgd", "adam"):
        torch.manual_seed(0)
        model = SmallConvNet()
        masks = sparseopt.sparsify(model, 0.8)
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(model.parameters())
        opt = sparseopt.SparseOpt(base, masks)
        rigl = sparseopt.RigL(masks, opt, delta_t=3, t_end=20)
        for x, y in batches(4):
            before = [m.clone() for m in masks.masks]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            updated = rigl.step()
            opt.step()
        assert updated
        for w, m, b in zip(masks.weights, masks.masks, before):
            fresh = m & ~b
            assert fresh.any()
            states = [v for v in opt.state[w].values() if torch.is_tensor(v) and v.shape == w.shape]
            assert states
            for v in states:
                assert torch.count_nonzero(v[fresh | ~m]) == 0
            assert torch.count_nonzero(w[fresh]) == 0  # update skipped, new weights still 0


def test_weight_update_skipped_on_topology_step():
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8)
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks)
    rigl = sparseopt.RigL(masks, opt, delta_t=1, t_end=10)
    rigl.t = 1
    nn.functional.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1]).backward()
    assert rigl.step()
    after_update = [p.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(after_update, model.parameters()))
    opt.step()  # the next step is a normal one
    assert not all(torch.equal(a, b) for a, b in zip(after_update, model.parameters()))


def _run(updater_cls, data_seed=0, steps=40, **kw):
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.9, generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), masks)
    topo = updater_cls(masks, opt, delta_t=5, total_steps=steps, **kw) if updater_cls is not sparseopt.Static else updater_cls(masks, opt)
    counts0 = masks.num_active()
    union = [m.clone() for m in masks.masks]
    itop = [masks.itop_rate()]
    for x, y in batches(steps, seed=data_seed):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        topo.step()
        opt.step()
        assert masks.num_active() == counts0  # exact per-layer counts
        for u, m in zip(union, masks.masks):
            u |= m
        itop.append(masks.itop_rate())
    return masks, topo, union, itop


def test_set_counts_exact_and_reproducible_per_seed():
    a, ta, _, _ = _run(sparseopt.SET, seed=3)
    b, _, _, _ = _run(sparseopt.SET, seed=3)
    c, _, _, _ = _run(sparseopt.SET, seed=4)
    assert ta.num_updates == 5  # t = 5..25 < t_end = 30
    assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks))
    assert not all(torch.equal(x, y) for x, y in zip(a.masks, c.masks))


@pytest.mark.parametrize("cls", [sparseopt.RigL, sparseopt.SET])
def test_itop_non_decreasing_and_equal_to_union(cls):
    masks, topo, union, itop = _run(cls)
    assert all(b >= a for a, b in zip(itop, itop[1:]))
    assert itop[-1] > itop[0]
    assert masks.itop_rate() == pytest.approx(sum(int(u.sum()) for u in union) / masks.total)
    for name, u in zip(masks.names, union):
        assert masks.itop_rates()[name] == pytest.approx(int(u.sum()) / u.numel())


def test_static_never_changes():
    masks, topo, union, itop = _run(sparseopt.Static)
    assert itop[0] == itop[-1] and topo.t == 40 and topo.num_updates == 0


def test_no_update_after_t_end():
    masks, topo, _, _ = _run(sparseopt.RigL, steps=40, t_end=12)
    assert topo.num_updates == 2  # t = 5, 10


def test_bad_arguments(convnet):
    masks = sparseopt.sparsify(convnet, 0.5)
    opt = sparseopt.SparseOpt(torch.optim.SGD(convnet.parameters(), lr=0.1), masks)
    with pytest.raises(ValueError, match="t_end=200 is past the end of training \\(total_steps=100\\)"):
        sparseopt.RigL(masks, opt, t_end=200, total_steps=100)
    with pytest.raises(ValueError, match="give t_end, or total_steps"):
        sparseopt.RigL(masks, opt)
    with pytest.raises(ValueError, match="delta_t must be a positive integer, got 0"):
        sparseopt.RigL(masks, opt, delta_t=0, total_steps=10)
    with pytest.raises(ValueError, match="alpha"):
        sparseopt.SET(masks, opt, alpha=1.5, total_steps=10)
    with pytest.raises(ValueError, match="skip_next_step"):
        sparseopt.RigL(masks, torch.optim.SGD(convnet.parameters(), lr=0.1), total_steps=10)
    with pytest.raises(ValueError, match="unknown growth_gradient 'x'"):
        sparseopt.RigL(masks, opt, total_steps=10, growth_gradient="x")
    with pytest.raises(RuntimeError, match="needs the dense gradient"):
        sparseopt.RigL(masks, opt, total_steps=10).update(0.3)
    # a plain optimizer works when the RigL conventions that need a wrapper are off
    plain = sparseopt.RigL(masks, torch.optim.SGD(convnet.parameters(), lr=0.1), total_steps=10, skip_update=False)
    assert plain.config()["skip_update"] is False


def test_topk_selection_equals_stable_sort_with_ties():
    from sparseopt.topology.selection import select_bottom, select_top

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 60, (1,), generator=g))
        scores = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        order = torch.sort(scores, descending=True, stable=True).indices
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(select_top(scores, k), expected), trial
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[: n - k]] = True
        assert torch.equal(select_bottom(scores, k), ~keep), trial


def test_non_finite_growth_scores_rank_last_by_one_rule_in_both_selections():
    """NaN and +-inf growth scores (an fp16 overflow) rank below every finite one, unstructured and grouped alike."""
    from sparseopt.topology.selection import prune_and_grow, prune_and_grow_grouped

    mask = torch.tensor([[True, False, False, False], [True, False, False, False]])
    prune_score = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0]])  # nothing is pruned (n_drop 0), one grown per row
    grow = torch.tensor([[0.0, float("nan"), float("inf"), -1.0], [0.0, float("-inf"), 2.0, float("nan")]])
    _, new = prune_and_grow(mask, prune_score, grow, 0, n_grow=2)
    assert new.nonzero().tolist() == [[0, 0], [0, 3], [1, 0], [1, 2]]  # the finite -1.0 beats NaN and +inf
    # grouped (rows): both actives are pruned, each row regrows what it lost
    _, new = prune_and_grow_grouped(mask, torch.tensor([[0.0, 0, 0, 0], [0.0, 0, 0, 0]]), grow, 2, lambda t: t)
    assert new.sum(1).tolist() == [1, 1]
    assert new[0, 0] and new[1, 2]  # row 0 keeps the finite 0.0 over NaN/inf; row 1 takes 2.0


def test_a_method_with_its_own_prune_scores_is_recorded_as_such():
    """results.json said prune_score 'scaled' for a method that overrides prune_scores (issue 28)."""
    from types import SimpleNamespace

    from sparseopt.train import records
    from sparseopt.train.config import TrainConfig

    class Mine(sparseopt.RigL):
        def prune_scores(self, index, layer, scales):
            return -layer.weight.abs()

    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8)
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks)
    model(torch.randn(2, 3, 8, 8))  # SparseOpt finds the normalized layers on the first forward
    for updater, expected in ((sparseopt.RigL(masks, opt, delta_t=2, total_steps=10), "scaled"),
                              (Mine(masks, opt, delta_t=2, total_steps=10), "Mine.prune_scores")):
        assert updater.config()["prune_score"] == expected
        run = SimpleNamespace(masks=masks, optimizer=opt, topology=updater, sparse=None)
        results = records.run_results(TrainConfig(), Path("."), {"epoch": 1}, epoch=1, num_classes=10,
                                      class_names=None, seconds=1.0, run=run, history=[])
        assert results["resolved"]["prune_score"] == expected


def test_a_custom_prune_score_receives_the_layers_scale():
    """Custom prune scores got scale=None: only 'scaled' fetched the scales (issue 28)."""
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8)
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, layers="all", scale_source="fan_in")
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    seen = []

    def score(weight, mask, scale):
        seen.append(scale)
        return weight.abs()

    expected = opt.layer_scales()  # the scales of the masks before the update
    sparseopt.SET(masks, opt, delta_t=1, total_steps=10, prune_score=score).update(0.3)
    assert len(seen) == len(masks) and all(torch.equal(s, c) for s, c in zip(seen, expected))
    assert any(not torch.all(c == 1) for c in expected)  # real per-neuron scales, not ones
    seen.clear()
    plain = sparseopt.MaskSet(nn.Sequential(nn.Linear(4, 4)), {"0": torch.ones(4, 4, dtype=torch.bool)})
    sparseopt.SET(plain, torch.optim.SGD(plain.model.parameters(), lr=0.1), delta_t=1, total_steps=10,
                  prune_score=score, skip_update=False, reset_optimizer_state=False).update(0.5)
    assert seen == [None]  # a torch optimizer has no scales
