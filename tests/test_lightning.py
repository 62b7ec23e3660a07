"""The SparseTraining callback inside Lightning: a tiny module on the bundled MNIST."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the Lightning extra is not installed: pip install 'sparseopt[lightning]'")

import lightning.pytorch as pl  # noqa: E402
from lightning_models import MNISTNet, mnist_loader, trainer  # noqa: E402

from sparseopt.integrations.lightning import SparseTraining  # noqa: E402
from sparseopt.topology.schedule import is_update_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class MaskCheck(pl.Callback):
    """After every optimizer step: masked weights are exactly zero and every layer keeps its count."""

    def __init__(self, sparse):
        self.sparse, self.steps = sparse, 0

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        masks = self.sparse.masks
        assert sum(masks.num_active()) == round(0.1 * masks.total)
        for weight, mask in zip(masks.weights, masks.masks):
            assert not weight[~mask].any()
        self.steps += 1


def updates(steps, delta_t, t_end):
    return sum(is_update_step(t, delta_t, t_end) for t in range(steps))


def test_two_epochs_with_accumulation_and_clipping_step_the_topology_once_per_optimizer_step(tmp_path):
    sparse = SparseTraining(sparsity=0.9, dst="rigl", delta_t=4)
    check = MaskCheck(sparse)
    module = MNISTNet()
    fit = trainer(tmp_path, [sparse, check], accumulate_grad_batches=2, gradient_clip_val=0.5)
    fit.fit(module, mnist_loader())
    assert fit.global_step == 16 and sparse.topology.t == 16  # 2 epochs x 16 batches / 2 accumulated
    assert check.steps >= 16
    assert sparse.topology.num_updates == updates(16, 4, 12) == 2
    assert sparse.masks.names == ["net.1", "net.4"]
    assert sum(sparse.masks.num_active()) == round(0.1 * sparse.masks.total)
    assert sparse.optimizer.preconditioned_layers == ["net.1"]  # it feeds a BatchNorm
    first, last = sum(module.losses[:8]) / 8, sum(module.losses[-8:]) / 8
    assert last < first - 0.5


def test_a_resume_from_a_checkpoint_is_bit_exact(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, ckpt_path=None):
        sparse = SparseTraining(sparsity=0.9, dst="set", delta_t=5)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        module = MNISTNet()
        fit = trainer(root, [sparse, saver])
        fit.fit(module, mnist_loader(), ckpt_path=ckpt_path)
        return module, sparse

    reference, sparse = run(tmp_path / "a")
    final = {k: v.clone() for k, v in reference.state_dict().items()}
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    assert ckpt["sparseopt"]["topology"]["t"] == 16 and "weight_mask" not in str(list(ckpt["state_dict"]))
    resumed, again = run(tmp_path / "b", tmp_path / "ckpt" / "epoch=0.ckpt")
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, final[key]), key
    assert again.masks.checksum() == sparse.masks.checksum()
    assert again.topology.num_updates == sparse.topology.num_updates == updates(32, 5, 24)


def test_a_checkpoint_written_without_the_callback_is_one_error(tmp_path):
    fit = trainer(tmp_path, [], max_epochs=1)
    fit.fit(MNISTNet(), mnist_loader(256))
    path = tmp_path / "dense.ckpt"
    fit.save_checkpoint(path)
    with pytest.raises(ValueError, match="written without the SparseTraining callback"):
        trainer(tmp_path, [SparseTraining(sparsity=0.9)]).fit(MNISTNet(), mnist_loader(256), ckpt_path=path)


def test_evaluating_a_checkpoint_needs_no_masks_and_a_reused_callback_refuses_another_module(tmp_path):
    sparse = SparseTraining(sparsity=0.9, delta_t=4)
    fit = trainer(tmp_path, [sparse], max_epochs=1)
    fit.fit(MNISTNet(), mnist_loader(256))
    path = tmp_path / "sparse.ckpt"
    fit.save_checkpoint(path)
    # test/validate from a checkpoint with a new callback (the callbacks list kept for evaluation): no masks needed
    fresh = SparseTraining(sparsity=0.9)
    (result,) = trainer(tmp_path, [fresh]).test(MNISTNet(), mnist_loader(128), ckpt_path=path, verbose=False)
    assert fresh.masks is None and 0 < result["test_loss"] < 3
    with pytest.raises(ValueError, match="this callback has trained a MNISTNet .masks on 2 layers. and was given "
                                         "another MNISTNet"):
        trainer(tmp_path, [sparse], max_epochs=1).fit(MNISTNet(), mnist_loader(256))


@pytest.mark.parametrize("dst", ["rigl"])
def test_ddp_on_the_cpu_keeps_masks_and_weights_equal_across_ranks(tmp_path, dst):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "tests" / "lightning_ddp_worker.py"), str(tmp_path), dst]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2 and r0["updates"] == r1["updates"] == updates(8, 4, 6) == 1
    assert all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"]))
    for key, value in r0["model"].items():  # parameters: BatchNorm's running statistics are per rank
        assert torch.equal(value, r1["model"][key]), key


def test_a_missing_extra_is_one_line_naming_the_install_command(monkeypatch):
    from sparseopt.integrations.extras import MissingExtra

    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "sparseopt.integrations.lightning", raising=False)
    with pytest.raises(MissingExtra, match=r"pip install 'sparseopt\[lightning\]'$"):
        import sparseopt.integrations.lightning  # noqa: F401
