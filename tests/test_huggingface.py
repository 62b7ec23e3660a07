"""SparseTrainingCallback inside Hugging Face's Trainer: tiny GPT-2 and BERT models built from configs."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face extra is not installed: pip install 'sparseopt[hf]'")

from hf_models import Tokens, bert, gpt2, training_args  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from sparseopt.integrations.huggingface import MASKS_FILE, STATE_FILE, SparseTrainingCallback  # noqa: E402
from sparseopt.topology.schedule import is_update_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GPT2_BLOCKS = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
BERT_BLOCKS = [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]


class MaskCheck(TrainerCallback):
    """After every optimizer step: masked weights are exactly zero and every layer keeps its count."""

    def __init__(self, sparse):
        self.sparse, self.steps, self.counts = sparse, 0, None

    def on_step_end(self, args, state, control, **kwargs):
        masks = self.sparse.masks
        counts = masks.num_active()
        self.counts = self.counts or counts
        assert counts == self.counts
        for weight, mask in zip(masks.weights, masks.masks):
            assert not weight[~mask].any()
        self.steps += 1


def train(model, out, sparse, task="lm", **args):
    check = MaskCheck(sparse)
    trainer = Trainer(model=model, args=training_args(out, **args), train_dataset=Tokens(task=task),
                      callbacks=[sparse, check])
    trainer.train(resume_from_checkpoint=args.get("resume_from_checkpoint"))
    return trainer, check


def expected_updates(steps, delta_t, t_end):
    return sum(is_update_step(t, delta_t, t_end) for t in range(steps))


@pytest.mark.parametrize("build, blocks, dense, task", [
    (gpt2, GPT2_BLOCKS, ["transformer.wte", "transformer.wpe", "lm_head"], "lm"),
    (bert, BERT_BLOCKS, ["bert.embeddings.word_embeddings", "bert.pooler.dense", "classifier"], "cls"),
])
def test_default_targets_are_the_blocks_linears_with_exact_counts(tmp_path, build, blocks, dense, task):
    model = build()
    sparse = SparseTrainingCallback(sparsity=0.9, dst="rigl", delta_t=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer, check = train(model, tmp_path, sparse, task=task)
    masks = sparse.masks
    assert masks.names == blocks
    total = sum(m.numel() for m in masks.masks)
    assert sum(masks.num_active()) == round(0.1 * total)  # exact, over the masked layers
    modules = dict(model.named_modules())
    for name in dense:  # embeddings and heads: no mask, and trained as dense weights
        assert not hasattr(modules[name], "weight_mask")
        assert modules[name].weight.ne(0).float().mean() > 0.95  # (BERT: the padding row is zero)
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(not hasattr(modules[n], "weight_mask") for n in norms)
    assert not torch.equal(before[f"{blocks[0]}.weight"], modules[blocks[0]].weight)
    assert check.steps == 20 and sparse.topology.t == 20
    assert sparse.topology.num_updates == expected_updates(20, 3, 15) == 4
    assert sparse.optimizer.preconditioned_layers == []  # LayerNorm: nothing to cancel
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < losses[0]
    config = json.loads((tmp_path / "checkpoint-20" / "config.json").read_text())["sparsity_config"]
    assert config["sparsity"] == 0.9 and config["targets"] == blocks and config["method"] == "rigl"


def test_gradient_accumulation_clipping_and_bf16_step_the_topology_once_per_optimizer_step(tmp_path):
    sparse = SparseTrainingCallback(sparsity=0.8, dst="rigl", delta_t=2)
    trainer, check = train(gpt2(), tmp_path, sparse, max_steps=10, gradient_accumulation_steps=3, max_grad_norm=0.05,
                           bf16=True, per_device_train_batch_size=4)
    assert trainer.accelerator.native_amp  # bf16 autocast on the CPU
    assert trainer.state.global_step == check.steps == sparse.topology.t == 10  # not the 30 micro-batches
    assert sparse.topology.num_updates == expected_updates(10, 2, 7) == 3
    assert sparse.topology.skipped_updates == 0


def test_a_resume_is_bit_exact_from_output_dir_and_from_elsewhere(tmp_path):
    reference = gpt2()
    train(reference, tmp_path / "a", SparseTrainingCallback(sparsity=0.9, dst="rigl", delta_t=3))
    final = {k: v.clone() for k, v in reference.state_dict().items()}
    shutil.rmtree(tmp_path / "a" / "checkpoint-20")  # resume_from_checkpoint=True finds checkpoint-10
    for out, where in ((tmp_path / "a", True), (tmp_path / "b", str(tmp_path / "a" / "checkpoint-10"))):
        model, sparse = gpt2(seed=1), SparseTrainingCallback(sparsity=0.9, dst="rigl", delta_t=3)
        train(model, out, sparse, resume_from_checkpoint=where)
        for key, value in model.state_dict().items():
            assert torch.equal(value, final[key]), key
        assert sparse.topology.num_updates == 4 and sparse.topology.t == 20
        shutil.rmtree(tmp_path / "a" / "checkpoint-20", ignore_errors=True)  # written again by the first resume


def test_resuming_from_a_checkpoint_written_without_the_callback_is_one_error(tmp_path):
    Trainer(model=gpt2(), args=training_args(tmp_path, max_steps=10), train_dataset=Tokens()).train()
    sparse = SparseTrainingCallback(sparsity=0.9)
    trainer = Trainer(model=gpt2(), args=training_args(tmp_path), train_dataset=Tokens(), callbacks=[sparse])
    with pytest.raises(ValueError, match="written without SparseTrainingCallback"):
        trainer.train(resume_from_checkpoint=True)


def test_resuming_from_outside_output_dir_without_saying_where_is_one_error(tmp_path):
    train(gpt2(), tmp_path / "a", SparseTrainingCallback(sparsity=0.9), max_steps=10)
    trainer = Trainer(model=gpt2(), args=training_args(tmp_path / "b"), train_dataset=Tokens(),
                      callbacks=[SparseTrainingCallback(sparsity=0.9)])
    with pytest.raises(ValueError, match=r"TrainingArguments\(resume_from_checkpoint=...\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))


def test_save_pretrained_loads_anywhere_with_equal_outputs_and_the_callback_resumes_its_masks(tmp_path):
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    model, sparse = gpt2(), SparseTrainingCallback(sparsity=0.9, dst="set", delta_t=3)
    train(model, tmp_path / "run", sparse)
    sparse.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("_mask")]  # the model file holds weights only  # noqa: SIM118
        stored = f.get_tensor("transformer.h.0.mlp.c_fc.weight")
    mask = sparse.masks["transformer.h.0.mlp.c_fc"]
    assert not stored[~mask].any() and stored[mask].ne(0).float().mean() > 0.99
    config = json.loads((tmp_path / "saved" / "config.json").read_text())["sparsity_config"]
    assert config["format"] == "sparseopt-masked" and config["structure"] == "unstructured"
    assert config["density"] == pytest.approx(0.1, abs=1e-4)

    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "saved")  # plain transformers: no sparseopt needed
    tokens = Tokens().x[:4]
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)

    again = SparseTrainingCallback(sparsity=0.9, dst="set", delta_t=3)
    Trainer(model=loaded, args=training_args(tmp_path / "more"), train_dataset=Tokens(), callbacks=[again])
    assert again.masks.names == sparse.masks.names
    assert all(torch.equal(a, b) for a, b in zip(again.masks.masks, sparse.masks.masks))
    with pytest.raises(ValueError, match="saved at sparsity 0.9"):
        Trainer(model=GPT2LMHeadModel.from_pretrained(tmp_path / "saved"), args=training_args(tmp_path / "x"),
                callbacks=[SparseTrainingCallback(sparsity=0.8)])
    (tmp_path / "saved" / MASKS_FILE).unlink()
    with pytest.raises(ValueError, match="its masks are not known"):
        Trainer(model=GPT2LMHeadModel.from_pretrained(tmp_path / "saved"), args=training_args(tmp_path / "y"),
                callbacks=[SparseTrainingCallback(sparsity=0.9)])
    assert (tmp_path / "run" / "checkpoint-10" / STATE_FILE).is_file()


def test_bert_resumes_bit_exactly_and_saves_a_model_that_loads_anywhere(tmp_path):
    from transformers import BertForSequenceClassification

    reference, sparse = bert(), SparseTrainingCallback(sparsity=0.9, dst="rigl", delta_t=3)
    train(reference, tmp_path / "a", sparse, task="cls")
    model, again = bert(seed=1), SparseTrainingCallback(sparsity=0.9, dst="rigl", delta_t=3)
    where = str(tmp_path / "a" / "checkpoint-10")
    train(model, tmp_path / "b", again, task="cls", resume_from_checkpoint=where)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    assert again.masks.checksum() == sparse.masks.checksum() and again.topology.num_updates == 4
    sparse.save_pretrained(tmp_path / "saved")
    loaded = BertForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    tokens = Tokens(task="cls").x[:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, reference.eval()(tokens).logits, rtol=0, atol=0)
    third = SparseTrainingCallback(sparsity=0.9)
    Trainer(model=loaded, args=training_args(tmp_path / "c"), callbacks=[third])
    assert all(torch.equal(a, b) for a, b in zip(third.masks.masks, sparse.masks.masks))


def test_load_best_model_at_end_gets_that_checkpoints_masks(tmp_path):
    sparse = SparseTrainingCallback(sparsity=0.9, dst="set", delta_t=2)
    model = gpt2()
    trainer = Trainer(model=model, args=training_args(tmp_path, eval_strategy="steps", eval_steps=10,
                                                      load_best_model_at_end=True, metric_for_best_model="loss",
                                                      greater_is_better=True),  # the worse one: the first
                      train_dataset=Tokens(), eval_dataset=Tokens(64, seed=1), callbacks=[sparse])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-10")
    saved = torch.load(Path(trainer.state.best_model_checkpoint) / STATE_FILE, weights_only=True)["masks"]["masks"]
    assert all(torch.equal(a, b) for a, b in zip(sparse.masks.masks, saved))
    assert all(not w[~m].any() for w, m in zip(sparse.masks.weights, sparse.masks.masks))


@pytest.mark.parametrize("dst, model", [("rigl", "gpt2"), ("set", "gpt2"), ("rigl", "bert")])
def test_ddp_through_the_trainer_keeps_masks_and_weights_equal_across_ranks(tmp_path, dst, model):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "hf_ddp_worker.py"), str(tmp_path), dst, model]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2 and r0["updates"] == r1["updates"] == expected_updates(12, 3, 9) == 2
    assert all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"]))
    for key, value in r0["model"].items():
        assert torch.equal(value, r1["model"][key]), key


def test_torch_compile_in_the_trainer_trains_with_the_masks(tmp_path):
    sparse = SparseTrainingCallback(sparsity=0.9, delta_t=3)
    trainer, check = train(gpt2(), tmp_path, sparse, max_steps=8, torch_compile=True,
                           torch_compile_backend="aot_eager", save_steps=100)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule" and sparse.masks.model is trainer.model
    assert check.steps == 8 and sparse.topology.num_updates == expected_updates(8, 3, 6) == 1


def test_a_trainer_built_with_model_init_masks_the_model_it_trains(tmp_path):
    # The Trainer calls model_init in its constructor and again in train(): the masks go on the second model.
    sparse = SparseTrainingCallback(sparsity=0.9, delta_t=3)
    check, first = MaskCheck(sparse), {}

    class FirstMasks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            first["checksum"] = sparse.masks.checksum()

    trainer = Trainer(model_init=lambda trial: gpt2(), args=training_args(tmp_path, max_steps=6), train_dataset=Tokens(),
                      callbacks=[sparse, FirstMasks(), check])
    trainer.train()
    assert sparse.masks.model is trainer.model and check.steps == 6 and sparse.topology.num_updates == 1
    drawn = SparseTrainingCallback(sparsity=0.9, delta_t=3).session.attach_masks(gpt2())
    assert first["checksum"] == drawn.checksum() != sparse.masks.checksum()  # the seed's masks, then RigL's update
    for weight, mask in zip(sparse.masks.weights, sparse.masks.masks):
        assert weight.requires_grad and not weight[~mask].any()


def test_a_callback_that_has_trained_refuses_another_model(tmp_path):
    sparse = SparseTrainingCallback(sparsity=0.9)
    train(gpt2(), tmp_path / "a", sparse, max_steps=2)
    with pytest.raises(ValueError, match="this callback has trained a GPT2LMHeadModel .masks on 8 layers. and was given "
                                         "another GPT2LMHeadModel; .* make a new one for each model"):
        train(gpt2(1), tmp_path / "b", sparse, max_steps=2)


def test_bad_arguments_are_one_line_each(caplog):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        SparseTrainingCallback(sparsity=1.0)
    with pytest.raises(ValueError, match="unknown DST method 'rigel'.*did you mean 'rigl'"):
        SparseTrainingCallback(dst="rigel")
    with pytest.raises(ValueError, match="targets pattern 'attn\\(' is not a regular expression"):
        SparseTrainingCallback(targets="attn(")
    sparse = SparseTrainingCallback(targets=["c_fc", "nothing_here"])
    with pytest.raises(ValueError, match=r"targets pattern 'nothing_here' matches no layer; layers are for example "
                                         r"\['transformer.h.0.attn.c_attn'"):
        sparse.session.attach_masks(gpt2())
    with pytest.raises(ValueError, match="structure 2:4 needs \\(out, in\\) weights.*Conv1D"):
        SparseTrainingCallback(sparsity=0.5, structure="nm", nm="2:4").session.attach_masks(gpt2())
    tied = SparseTrainingCallback(targets=["lm_head", "c_fc"])
    with caplog.at_level(logging.WARNING, logger="sparseopt"):
        masks = tied.session.attach_masks(gpt2())
    assert masks.names == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    lines = [r.getMessage() for r in caplog.records if "lm_head" in r.getMessage()]
    assert lines == ["not masking 'lm_head': its weight is tied to an embedding table, which stays dense "
                     "(embeddings=False)"]


def test_bert_takes_nm_masks_on_its_linear_layers(tmp_path):
    sparse = SparseTrainingCallback(sparsity=0.5, structure="nm", nm="2:4", dst="rigl", delta_t=3)
    train(bert(), tmp_path, sparse, task="cls", max_steps=8, save_steps=100)
    for mask in sparse.masks.masks:
        assert torch.equal(mask.reshape(mask.shape[0], -1, 4).sum(-1), torch.full((mask.shape[0], mask.shape[1] // 4), 2))
    assert sparse.topology.num_updates == 1


def test_a_missing_extra_is_one_line_naming_the_install_command(monkeypatch):
    from sparseopt.integrations.extras import MissingExtra

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "sparseopt.integrations.huggingface", raising=False)
    with pytest.raises(MissingExtra, match=r"pip install 'sparseopt\[hf\]'$"):
        import sparseopt.integrations.huggingface  # noqa: F401


def test_import_sparseopt_imports_no_framework():
    code = "import sys, sparseopt; print(sorted(m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
