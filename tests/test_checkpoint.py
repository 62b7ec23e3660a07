import io

import pytest
import torch
from conftest import SmallConvNet, batches
from torch import nn

import sparseopt


def _build(method, seed, opt_kw=None, prune_score="magnitude"):
    torch.manual_seed(seed)
    model = SmallConvNet()
    masks = sparseopt.sparsify(model, 0.9, generator=torch.Generator().manual_seed(seed))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), masks,
                              **(opt_kw or {}))
    kw = dict(delta_t=3, total_steps=24, prune_score=prune_score)
    topo = sparseopt.RigL(masks, opt, **kw) if method == "rigl" else sparseopt.SET(masks, opt, seed=seed, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 24)
    return model, masks, opt, topo, sched


def _train(objs, data):
    model, masks, opt, topo, sched = objs
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        topo.step()
        opt.step()
        sched.step()


def _save(objs):
    model, masks, opt, topo, sched = objs
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "masks": masks.state_dict(), "opt": opt.state_dict(),
                "topology": topo.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


VARIANTS = [
    ("rigl", {}, "magnitude"),
    ("set", {}, "magnitude"),
    # every option of the SparseOpt study carries its state through a checkpoint
    ("rigl", {"scale_ema": 0.9, "undamped_growth": True}, "scaled"),
    ("rigl", {"scale_source": "bn_stats"}, "normalized"),
]


@pytest.mark.parametrize("method,opt_kw,prune_score", VARIANTS)
def test_resume_is_bit_exact(method, opt_kw, prune_score):
    data = batches(24, seed=11)
    straight = _build(method, 0, opt_kw, prune_score)
    _train(straight, data)

    first = _build(method, 0, opt_kw, prune_score)
    _train(first, data[:12])
    state = _save(first)
    resumed = _build(method, 1, opt_kw, prune_score)  # fresh objects with other masks and weights
    model, masks, opt, topo, sched = resumed
    model.load_state_dict(state["model"])
    masks.load_state_dict(state["masks"])
    opt.load_state_dict(state["opt"])
    topo.load_state_dict(state["topology"])
    sched.load_state_dict(state["sched"])
    _train(resumed, data[12:])

    for a, b in zip(straight[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    assert straight[1].itop_rate() == resumed[1].itop_rate()
    assert straight[3].num_updates == resumed[3].num_updates == 5  # t = 3..15 < t_end = 18


def test_load_checks_layers_and_type():
    model, masks, opt, topo, _ = _build("rigl", 0)
    other = nn.Sequential(nn.Linear(4, 4))
    other_masks = sparseopt.sparsify(other, 0.5)
    with pytest.raises(ValueError, match="another model"):
        other_masks.load_state_dict(masks.state_dict())
    _, _, _, set_topo, _ = _build("set", 0)
    with pytest.raises(ValueError, match="written by RigL"):
        set_topo.load_state_dict(topo.state_dict())
