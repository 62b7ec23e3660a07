"""Structured sparsity: constant fan-in and N:M masks, kept exactly through every topology update."""

import pytest
import torch
from conftest import SmallConvNet, batches
from torch import nn

import sparseopt
from sparseopt.masks.structure import Structure
from sparseopt.models import build_model
from sparseopt.topology.selection import prune, prune_and_grow_grouped


def _row_counts(mask):
    return mask.reshape(mask.shape[0], -1).sum(1)


def test_constant_fan_in_masks_follow_the_distribution():
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    masks = sparseopt.sparsify(model, 0.95, "erk", structure="constant_fan_in", generator=torch.Generator().manual_seed(0))
    plain = sparseopt.sparsify(build_model("resnet20", 10), 0.95, "erk", generator=torch.Generator().manual_seed(0))
    for layer, other in zip(masks, plain):
        counts = _row_counts(layer.mask)
        assert (counts == counts[0]).all() and counts[0] >= 1, layer.name
        fan = layer.mask[0].numel()
        # each layer's density is the distribution's, rounded to whole inputs per neuron
        assert abs(counts[0].item() / fan - other.mask.sum().item() / other.mask.numel()) <= 0.5 / fan + 1e-9
    assert masks.sparsity() == pytest.approx(0.95, abs=0.005)
    assert all(torch.equal(c, torch.ones_like(c)) for c in map(sparseopt.neuron_scales, masks.masks))  # c_i = 1


def test_nm_masks_and_their_refusals():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = sparseopt.sparsify(model, 0.5, structure="nm", nm="2:4")
    for m in masks.masks:
        assert (m.reshape(-1, 4).sum(1) == 2).all()
    assert masks.sparsity() == 0.5
    with pytest.raises(ValueError, match="structure 1:4 fixes the sparsity at 0.75; got sparsity=0.9"):
        sparseopt.sparsify(nn.Sequential(nn.Linear(16, 8)), 0.9, structure="nm", nm=(1, 4))
    with pytest.raises(ValueError, match=r"layer 'conv1' has 27 inputs per neuron, not a multiple of M=4"):
        sparseopt.sparsify(build_model("resnet20", 10), 0.5, structure="nm", nm="2:4")
    with pytest.raises(ValueError, match="nm must look like 'N:M'"):
        Structure.parse("nm", "2-4")
    with pytest.raises(ValueError, match="N:M needs 0 < N < M, got 4:2"):
        Structure.parse("nm", "4:2")
    with pytest.raises(ValueError, match="unknown structure 'blocky'"):
        Structure.parse("blocky")


def test_grouped_prune_and_grow_keeps_each_group_and_prunes_as_the_layer_does():
    g = torch.Generator().manual_seed(0)
    structure = Structure("constant_fan_in")
    mask = structure.random_mask((6, 10), 24, g, "cpu")  # 4 per row
    weight, grad = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    kept, new = prune_and_grow_grouped(mask, weight.abs(), grad.abs(), 7, structure.groups)
    assert torch.equal(kept, prune(mask, weight.abs(), 7)[0])  # the 7 smallest |w| of the layer, wherever they are
    assert (kept.sum() == 17) and torch.equal(_row_counts(new), _row_counts(mask))
    # each row regrew its losses by largest |grad| among its entries not kept
    for i in range(6):
        lost = int((mask[i] & ~kept[i]).sum())
        free = (~kept[i]).nonzero().reshape(-1)
        best = free[grad[i, free].abs().argsort(descending=True)[:lost]]
        assert set(((new[i] & ~kept[i]).nonzero().reshape(-1)).tolist()) == set(best.tolist())
    # non-finite growth scores never make a group grow into a kept entry or lose count
    nm = Structure("nm", 1, 4)
    mask = nm.random_mask((4, 8), 0, g, "cpu")
    kept, new = prune_and_grow_grouped(mask, torch.randn(4, 8, generator=g), torch.full((4, 8), float("nan")), 5, nm.groups)
    assert (new.reshape(-1, 4).sum(1) == 1).all()


@pytest.mark.parametrize("structure, nm, sparsity", [("constant_fan_in", None, 0.9), ("nm", "1:4", 0.75)])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_updates_keep_the_structure_exactly(structure, nm, sparsity, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))
    masks = sparseopt.sparsify(model, sparsity, structure=structure, nm=nm, generator=torch.Generator().manual_seed(1))
    before = [m.clone() for m in masks.masks]
    groups = [masks.structure.groups(m).sum(1) for m in masks.masks]
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), masks)
    updater = (sparseopt.RigL if method == "rigl" else sparseopt.SET)(masks, opt, delta_t=2, alpha=0.5, total_steps=20)
    updates = 0
    for x, y in batches(12, shape=(4, 6, 6), classes=8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        updates += updater.step()
        opt.step()
        for m, count in zip(masks.masks, groups):
            assert torch.equal(masks.structure.groups(m).sum(1), count)
        assert all(w[~m].eq(0).all() for w, m in zip(masks.weights, masks.masks))
    assert updates >= 4 and any(not torch.equal(a, b) for a, b in zip(before, masks.masks))  # it really moved


def test_structure_travels_with_the_masks_and_is_checked_on_load():
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8, structure="constant_fan_in")
    state = masks.state_dict()
    assert state["structure"] == {"kind": "constant_fan_in", "n": 0, "m": 0}
    other = sparseopt.sparsify(SmallConvNet(), 0.8)
    with pytest.raises(ValueError, match="checkpoint masks have the constant_fan_in structure, this MaskSet has unstructured"):
        other.load_state_dict(state)
    broken = {**state, "masks": [m.clone() for m in state["masks"]]}
    row = broken["masks"][1][0].reshape(-1)
    row[int(row.nonzero()[0])] = False  # neuron 0 of conv2 loses an input
    with pytest.raises(RuntimeError, match=r"masks break the constant_fan_in structure in the checkpoint: conv2 \(1 groups\)"):
        masks.load_state_dict(broken)
    masks.load_state_dict(state)


def test_srigl_neuron_ablation_removes_weak_neurons_and_keeps_fan_in_equal():
    from sparseopt.topology.selection import prune_and_grow_ablating

    structure = Structure("constant_fan_in")
    g = torch.Generator().manual_seed(0)
    mask = structure.random_mask((8, 20), 32, g, "cpu")  # k = 4
    weight = torch.randn(8, 20, generator=g)
    weight[2] *= 1e-3  # neuron 2: tiny weights, pruned first ...
    grad = torch.rand(8, 20, generator=g)
    grad[2] = 0.0      # ... and nothing RigL would grow there: no salient connection left
    kept, new = prune_and_grow_ablating(mask, weight.abs(), grad, 4, gamma=0.3)
    counts = new.sum(1)
    assert counts[2] == 0 and (counts[counts > 0] == counts[counts > 0][0]).all()
    assert counts.sum() == 7 * round(32 / 7) and counts[0] == 5  # 32 inputs shared out over 7 live neurons
    for i in range(8):  # a live neuron keeps its largest surviving weights
        if i != 2:
            assert (kept[i] & ~new[i]).sum() == 0
    assert structure.violations(new) == 0
    full = torch.ones(3, 4, dtype=torch.bool)  # a full layer cannot give up a neuron: nowhere to put its inputs
    _, alive = prune_and_grow_ablating(full, torch.ones(3, 4), torch.zeros(3, 4), 12, gamma=1.0)
    assert torch.equal(alive.sum(1), torch.tensor([4, 4, 4]))
    thin = torch.eye(4, 6, dtype=torch.bool)  # k = 1; all pruned, growth (all ties) wants row 0 only
    _, one = prune_and_grow_ablating(thin, torch.ones(4, 6), torch.zeros(4, 6), 4, gamma=1.0)
    assert one.sum(1).tolist() == [4, 0, 0, 0]


def test_neuron_ablation_in_training_and_its_refusals():
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.8, structure="constant_fan_in", generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks)
    rigl = sparseopt.RigL(masks, opt, delta_t=2, alpha=0.5, total_steps=20, neuron_ablation=0.9)
    for x, y in batches(12):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        rigl.step()
        opt.step()
    assert rigl.num_updates >= 4 and rigl.config()["neuron_ablation"] == 0.9
    assert all(masks.structure.violations(m) == 0 for m in masks.masks)
    with pytest.raises(ValueError, match="neuron_ablation needs constant fan-in masks"):
        sparseopt.RigL(sparseopt.sparsify(SmallConvNet(), 0.8), opt, total_steps=10, neuron_ablation=0.3)
    with pytest.raises(ValueError, match=r"neuron_ablation \(SRigL's gamma_sal\) must be in \(0, 1\]"):
        sparseopt.RigL(masks, opt, total_steps=10, neuron_ablation=0.0)
