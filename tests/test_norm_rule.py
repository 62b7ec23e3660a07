"""SparseOpt behind each normalization: precondition only where the norm skews gradients between neurons."""

import logging

import pytest
import torch
from torch import nn

import sparseopt
from sparseopt.optim.norms import norm_group_size
from sparseopt.optim.preconditioner import neuron_scales


@pytest.mark.parametrize("norm, output_shape, layer, expected", [
    (nn.BatchNorm1d(8), (4, 8), nn.Linear(3, 8), 1),
    (nn.BatchNorm2d(8), (4, 8, 5, 5), nn.Conv2d(3, 8, 3), 1),
    (nn.InstanceNorm2d(8), (4, 8, 5, 5), nn.Conv2d(3, 8, 3), 1),
    (nn.GroupNorm(8, 8), (4, 8, 5, 5), nn.Conv2d(3, 8, 3), 1),   # one channel a group: per neuron
    (nn.GroupNorm(2, 8), (4, 8, 5, 5), nn.Conv2d(3, 8, 3), 4),
    (nn.GroupNorm(1, 8), (4, 8, 5, 5), nn.Conv2d(3, 8, 3), 8),   # one group: LayerNorm over (C, H, W)
    (nn.LayerNorm(8), (4, 8), nn.Linear(3, 8), 8),
    (nn.LayerNorm(8), (4, 6, 8), nn.Linear(3, 8), 8),             # tokens: still over the features
    (nn.LayerNorm([8, 5, 5]), (4, 8, 5, 5), nn.Conv2d(3, 8, 3), 8),
    (nn.LayerNorm(5), (4, 8, 5, 5), nn.Conv2d(3, 8, 3), 1),      # over the width only: each channel its own
    (nn.RMSNorm(8), (4, 8), nn.Linear(3, 8), 8),
])
def test_group_size_of_each_normalization(norm, output_shape, layer, expected):
    assert norm_group_size(norm, layer, torch.empty(output_shape)) == expected


def test_group_scales_use_the_group_mean_fan_in():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    # n = [4, 2, 1, 3]; groups of 2: [3, 3, 2, 2], mean 2.5
    expected = torch.tensor([1.2, 1.2, 0.8, 0.8]).sqrt()
    torch.testing.assert_close(neuron_scales(mask, 2), expected)
    assert torch.equal(neuron_scales(mask, 4), torch.ones(4))  # one group: nothing to cancel
    torch.testing.assert_close(neuron_scales(mask, 1), neuron_scales(mask))
    dead = mask.clone()
    dead[1] = False
    assert neuron_scales(dead, 2)[1] == 0 and neuron_scales(dead, 2)[0] > 0  # a dead neuron stays at 0
    with pytest.raises(ValueError, match="group_size 3 does not divide the layer's 4 neurons"):
        neuron_scales(mask, 3)


def _mlp_opt(norm):
    torch.manual_seed(0)
    model = sparseopt.models.MLP(20, [16], 3, norm=norm)
    masks = sparseopt.sparsify(model, 0.7, "uniform")
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), masks, scale_source="fan_in")
    x, y = torch.randn(8, 20), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    return model, masks, opt


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_a_layer_before_a_feature_norm_is_not_preconditioned(norm, caplog):
    model, masks, opt = _mlp_opt(norm)
    raw = masks.weights[0].grad.clone()
    with caplog.at_level(logging.WARNING, logger="sparseopt"):
        opt.precondition_grads_()
    assert opt.preconditioned_layers == []
    torch.testing.assert_close(masks.weights[0].grad, raw * masks.masks[0], rtol=0, atol=0)
    assert "has no skew to cancel" in caplog.text


def test_a_layer_before_groupnorm_gets_the_group_scale():
    model, masks, opt = _mlp_opt("groupnorm")  # 16 features: gcd(32, 16) = 16 groups of 1
    assert opt.preconditioned_layers == ["1"]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    masks = sparseopt.sparsify(net, 0.7, "uniform", generator=torch.Generator().manual_seed(3))
    opt = sparseopt.SparseOpt(torch.optim.SGD(net.parameters(), lr=0.1), masks, scale_source="fan_in")
    nn.functional.cross_entropy(net(torch.randn(4, 3, 6, 6)), torch.tensor([0, 1, 2, 0])).backward()
    raw = masks.weights[0].grad.clone()
    opt.precondition_grads_()
    assert opt.preconditioned_layers == ["0"]
    c = neuron_scales(masks.masks[0], 4)
    assert not torch.equal(c, neuron_scales(masks.masks[0]))  # the group rule is not the per-neuron one here
    torch.testing.assert_close(masks.weights[0].grad, raw * masks.masks[0] * c.reshape(-1, 1, 1, 1))
    # the group sizes travel with the optimizer's state (a resumed run needs no forward pass to know them)
    state = opt.state_dict()
    again = sparseopt.SparseOpt(torch.optim.SGD(net.parameters(), lr=0.1), masks, scale_source="fan_in")
    again.load_state_dict(state)
    torch.testing.assert_close(again.layer_scales()[0], c)
    # the paper's layers="all" keeps its per-neuron rule everywhere
    paper = sparseopt.SparseOpt(torch.optim.SGD(net.parameters(), lr=0.1), masks, layers="all", scale_source="fan_in")
    torch.testing.assert_close(paper.layer_scales()[0], neuron_scales(masks.masks[0]))
