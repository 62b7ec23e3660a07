"""The session both framework callbacks share, driven by hand the way a framework drives it."""

import pytest
import torch
from torch import nn

from sparseopt.integrations.session import SparseSession, innermost_optimizer, target_layers


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def hooked(session, optimizer):
    base = innermost_optimizer(optimizer)
    base.register_step_pre_hook(lambda *_: session.begin_step())
    base.register_step_post_hook(lambda *_: session.end_step())


def test_default_targets_are_the_layers_inside_module_lists():
    assert target_layers(Blocks()) == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    assert target_layers(Blocks(), targets=r"^(embed|head)$") == ["embed", "head"]
    assert target_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))) == ["0", "2"]
    assert target_layers(Blocks(), ignore=r"\.2$") == ["blocks.0.0", "blocks.1.0"]
    with pytest.raises(ValueError, match="no layer to sparsify: the model has no blocks"):
        target_layers(nn.Linear(2, 2))


def test_frozen_layers_stay_dense_by_default_and_are_refused_by_name(caplog):
    model = Blocks()
    model.blocks[0].requires_grad_(False)  # fine-tuning the upper block only
    with caplog.at_level("INFO", logger="sparseopt"):
        assert target_layers(model) == ["blocks.1.0", "blocks.1.2"]
    assert "2 frozen layers (requires_grad=False) stay dense, e.g. 'blocks.0.0'" in caplog.text
    with pytest.raises(ValueError, match=r"targets= names frozen layers .* \['blocks.0.0'\]; unfreeze them or ignore="):
        target_layers(model, targets=r"blocks\.\d\.0$")
    model.blocks.requires_grad_(False)
    with pytest.raises(ValueError, match="no layer to sparsify: every layer in its blocks is frozen"):
        target_layers(model)
    # the session trains what the optimizer holds: the Trainer's optimizer takes only the trainable weights
    session = SparseSession(sparsity=0.9, dst="rigl", delta_t=1)
    model = Blocks()
    model.blocks[0].requires_grad_(False)
    session.attach_masks(model)
    session.attach_optimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), 10)
    assert session.masks.names == ["blocks.1.0", "blocks.1.2"]


def test_a_grad_scaler_around_the_hooked_step_skips_the_update_step_and_overflows_cleanly():
    model = Blocks()
    session = SparseSession(0.8, dst="set", delta_t=2, precondition=False)
    session.attach_masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    session.attach_optimizer(optimizer, total_steps=20)
    hooked(session, optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for step in range(8):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if step == 3:  # an fp16 overflow: the scaler skips the step
            model.head.weight.grad[0, 0] = float("inf")
        dense = [model.embed.weight, model.head.bias]  # not masked: they move exactly when the optimizer steps
        before = [p.detach().clone() for p in dense]
        changed = session.topology_step()
        scaler.step(optimizer)  # unscales, checks for inf, then the hooked base step
        scaler.update()
        moved = any(not torch.equal(a, p) for a, p in zip(before, dense))
        assert changed == (step in (2, 4, 6))  # t = 2, 4, 6 < t_end = 15
        assert moved == (step not in (2, 3, 4, 6)), step  # update steps skipped, overflow skipped by the scaler
        for weight, mask in zip(session.masks.weights, session.masks.masks):
            assert not weight[~mask].any()
    assert session.topology.num_updates == 3


def test_the_session_state_round_trips_and_refuses_foreign_files(tmp_path):
    model = Blocks()
    session = SparseSession(0.9, dst="rigl", delta_t=1)
    session.attach_masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session.attach_optimizer(optimizer, total_steps=10)
    hooked(session, optimizer)
    for _ in range(3):  # updates at t = 1, 2
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        session.topology_step()
        optimizer.step()
    session.save(tmp_path / "state.pt", token="x")
    other = SparseSession(0.9, dst="rigl", delta_t=1)
    other.attach_masks(Blocks())
    other.attach_optimizer(torch.optim.SGD(other.masks.model.parameters(), lr=0.1), total_steps=10)
    state = SparseSession.read(tmp_path / "state.pt")
    assert state["token"] == "x"
    other.load_state_dict(state)
    assert other.masks.checksum() == session.masks.checksum() and other.topology.num_updates == 2
    assert other.masks.checksum() != SparseSession(0.9).attach_masks(Blocks()).checksum()
    torch.save({"format": "something else"}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="is not a sparseopt session state"):
        SparseSession.read(tmp_path / "foreign.pt")
    (tmp_path / "damaged.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        SparseSession.read(tmp_path / "damaged.pt")


@pytest.mark.parametrize("options, message", [
    ({"alpha": 2.0}, r"dst 'rigl' \(RigL\): alpha \(initial drop fraction\) must be in \[0, 1\], got 2.0"),
    ({"delta_t": 0}, r"delta_t must be a positive integer, got 0"),
    ({"scale_source": "nope"}, r"unknown scale source 'nope'"),
    ({"distribution": "erl"}, r"unknown distribution 'erl'"),
    ({"sparsity": 0.9, "structure": "nm", "nm": "2:4"}, r"structure 2:4 fixes the sparsity at 0.5; got sparsity=0.9"),
    ({"dst": "set", "dst_kwargs": {"sed": 1}}, r"takes no option 'sed'"),
])
def test_each_component_refuses_its_own_bad_option_when_the_session_is_made(options, message):
    """The session checks nothing itself that a component checks: it builds them once on a probe model."""
    with pytest.raises(ValueError, match=message):
        SparseSession(**{"sparsity": 0.9, **options})
