import pytest
import torch
from conftest import SmallConvNet, batches
from torch import nn

import sparseopt
from sparseopt.masks import MASK_BUFFER, fan_in, neuron_sparsity


class AllLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3)
        self.c2 = nn.Conv2d(8, 8, 3, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.c3 = nn.Conv3d(2, 4, 3)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)


def test_selects_conv_and_linear_weights_only():
    model = AllLayers()
    masks = sparseopt.sparsify(model, 0.5, "uniform")
    assert masks.names == ["c1", "c2", "dw", "c3", "head"]
    names = {n for n, _ in model.named_buffers()}
    assert {f"{n}.{MASK_BUFFER}" for n in masks.names} <= names
    assert not any("bn." in n and MASK_BUFFER in n for n in names)
    for layer in masks:
        assert layer.mask.dtype == torch.bool and layer.mask.shape == layer.weight.shape
    assert model.c1.bias.count_nonzero() == model.c1.bias.numel()  # biases untouched


def test_include_exclude_first_last():
    model = AllLayers()
    assert sparseopt.select_layers(model, include=["c*"]) and [n for n, _ in sparseopt.select_layers(model, include=["c*"])] == ["c1", "c2", "c3"]
    assert [n for n, _ in sparseopt.select_layers(model, exclude=[nn.Conv2d])] == ["c1", "c3", "head"]
    assert [n for n, _ in sparseopt.select_layers(model, dense_first=True, dense_last=True)] == ["c2", "dw", "c3"]
    with pytest.raises(ValueError, match="'nope\\*' matches no sparsifiable layer"):
        sparseopt.sparsify(model, 0.5, include=["nope*"])
    with pytest.raises(ValueError, match="leave no layer"):
        sparseopt.sparsify(nn.Sequential(nn.Linear(2, 2)), 0.5, dense_first=True)


@pytest.mark.parametrize("dist", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97])
def test_global_count_exact(convnet, dist, sparsity):
    masks = sparseopt.sparsify(convnet, sparsity, dist, generator=torch.Generator().manual_seed(1))
    assert sum(masks.num_active()) == round((1 - sparsity) * masks.total)
    for w, m in zip(masks.weights, masks.masks):
        assert torch.all(w[~m] == 0)


def test_custom_distribution_per_layer():
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.0, "custom", custom={"conv1": 0.5, "conv2": 0.75, "fc": 0.0})
    assert masks.num_active() == [round(216 * 0.5), round(1152 * 0.25), 160]


def test_masks_saved_and_restored_with_state_dict(convnet):
    masks = sparseopt.sparsify(convnet, 0.8, generator=torch.Generator().manual_seed(0))
    state = convnet.state_dict()
    fresh = SmallConvNet()
    fresh_masks = sparseopt.sparsify(fresh, 0.8, generator=torch.Generator().manual_seed(99))
    v = fresh_masks.version
    assert not all(torch.equal(a, b) for a, b in zip(masks.masks, fresh_masks.masks))
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(masks.masks, fresh_masks.masks))
    assert fresh_masks.version > v  # consumers see the change


def test_explicit_masks_and_shape_mismatch(convnet):
    with pytest.raises(ValueError, match="mask for 'fc' has shape \\(3, 3\\) but its weight has shape \\(10, 16\\)"):
        sparseopt.MaskSet(convnet, {"fc": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no layer named 'zz'"):
        sparseopt.MaskSet(convnet, {"zz": torch.ones(3, 3, dtype=torch.bool)})
    masks = sparseopt.MaskSet(convnet, {"fc": torch.rand(10, 16) > 0.5})
    with pytest.raises(ValueError, match="already has"):
        sparseopt.MaskSet(convnet, {"fc": torch.ones(10, 16, dtype=torch.bool)})
    assert masks.names == ["fc"]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    ],
    ids=["sgd-momentum-wd", "nesterov", "adam", "adamw"],
)
@pytest.mark.parametrize("precondition", [False, True])
def test_masked_weights_exactly_zero_after_50_steps(make_opt, precondition):
    torch.manual_seed(0)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.9)
    opt = sparseopt.SparseOpt(make_opt(model.parameters()), masks, precondition=precondition)
    topology = sparseopt.RigL(masks, opt, delta_t=7, total_steps=50)
    active0 = masks.num_active()
    for x, y in batches(50, seed=3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        topology.step()
        opt.step()
        for w, m in zip(masks.weights, masks.masks):
            assert torch.count_nonzero(w[~m]) == 0
    assert topology.num_updates == 5  # t = 7, 14, 21, 28, 35 < t_end = 37
    assert masks.num_active() == active0


def test_neuron_sparsity_and_fan_in():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert fan_in(mask).tolist() == [2, 4, 0]
    assert neuron_sparsity(mask).tolist() == [0.5, 0.0, 1.0]
    conv = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    conv[0, 0] = True
    assert fan_in(conv).tolist() == [4, 0]


def test_sparse_init_variance_follows_fan_in():
    model = nn.Sequential(nn.Linear(2000, 400))
    mask = torch.zeros(400, 2000, dtype=torch.bool)
    mask[:200, :100] = True  # n_i = 100
    mask[200:, :1600] = True  # n_i = 1600
    masks = sparseopt.MaskSet(model, {"0": mask})
    sparseopt.sparse_init_(masks, generator=torch.Generator().manual_seed(0))
    w = model[0].weight
    assert w[:200, :100].std().item() == pytest.approx((2 / 100) ** 0.5, rel=0.03)
    assert w[200:, :1600].std().item() == pytest.approx((2 / 1600) ** 0.5, rel=0.03)
    assert torch.count_nonzero(w[~mask]) == 0


def test_sparsify_sparse_init_option():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 100))
    masks = sparseopt.sparsify(model, 0.9, "uniform", init="sparse", generator=torch.Generator().manual_seed(0))
    active = model[0].weight[masks["0"]]
    assert active.std().item() == pytest.approx((2 / 100) ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="unknown init 'he'"):
        sparseopt.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, init="he")


def test_stats_flat_dict(convnet):
    masks = sparseopt.sparsify(convnet, 0.9, generator=torch.Generator().manual_seed(0))
    stats = sparseopt.sparsity_stats(masks)
    assert stats["density"] == pytest.approx(0.1, abs=1e-3)
    assert stats["itop"] == pytest.approx(stats["density"])  # nothing explored yet
    for name in masks.names:
        s = neuron_sparsity(masks[name])
        assert stats[f"neuron_sparsity/{name}/max"] == pytest.approx(s.max().item())
        assert stats[f"neuron_sparsity/{name}/std"] == pytest.approx(s.std(unbiased=False).item())
        assert stats[f"density/{name}"] == pytest.approx(masks.densities()[name])
    assert all(isinstance(v, float) for v in stats.values())


def test_checksum_detects_difference(convnet):
    masks = sparseopt.sparsify(convnet, 0.9, generator=torch.Generator().manual_seed(0))
    before = masks.checksum()
    assert masks.checksum() == before
    m = masks["fc"]
    i = int(torch.nonzero(m.reshape(-1))[0])
    j = int(torch.nonzero(~m.reshape(-1))[0])
    m.view(-1)[i], m.view(-1)[j] = False, True
    assert masks.checksum() != before
