"""Tiny GPT-2 through Hugging Face's Trainer: dense against 90% RigL (SparseTrainingCallback), loss after N steps.

The data is a synthetic language with a known floor: an order-1 Markov chain over 64 tokens in which
every token has 4 possible successors with fixed random probabilities, so the best possible loss is
the chain's conditional entropy (printed). No hub is needed.

    python benchmarks/hf_tiny_gpt2.py --steps 400 --seeds 0 1 2 --out docs/bench/hf_tiny_gpt2.json
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparseopt.files import write_json  # noqa: E402

VOCAB, LENGTH, SUCCESSORS = 64, 32, 4


def markov_chain(seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """(successor tokens, their probabilities) of every token, and the chain's conditional entropy."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.stack([torch.randperm(VOCAB, generator=g)[:SUCCESSORS] for _ in range(VOCAB)])
    probs = torch.softmax(torch.randn(VOCAB, SUCCESSORS, generator=g) * 1.5, dim=1)
    return successors, probs


def sequences(n: int, seed: int) -> torch.Tensor:
    successors, probs = markov_chain()
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, LENGTH, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, LENGTH):
        pick = torch.multinomial(probs[x[:, t - 1]], 1, generator=g)[:, 0]
        x[:, t] = successors[x[:, t - 1], pick]
    return x


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.x = sequences(n, seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def entropy_floor() -> float:
    _, probs = markov_chain()
    return float(-(probs * probs.log()).sum(1).mean())  # uniform stationary start: near enough for a floor


def run(sparse: bool, seed: int, steps: int, out: Path) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from sparseopt.integrations.huggingface import SparseTrainingCallback

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=128, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    callbacks = [SparseTrainingCallback(sparsity=0.9, dst="rigl", delta_t=50, seed=seed)] if sparse else []
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=32, learning_rate=3e-3,
                             warmup_steps=steps // 10, weight_decay=0.01, report_to=[], use_cpu=True, seed=seed,
                             disable_tqdm=True, logging_steps=steps // 4, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(8192, seed), eval_dataset=Tokens(1024, 10_000),
                      callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    result = {"sparse": sparse, "seed": seed, "eval_loss": trainer.evaluate()["eval_loss"], "seconds": seconds,
              "train_losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}
    if sparse:
        masks = callbacks[0].masks
        result.update(density=masks.density(), model_density=masks.model_density(),
                      updates=callbacks[0].topology.num_updates)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("hf_tiny_gpt2.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparseopt_hf_bench"))
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    runs = [run(sparse, seed, args.steps, args.work / f"{sparse}_{seed}") for seed in args.seeds for sparse in (False, True)]
    summary = {}
    for sparse in (False, True):
        losses = [r["eval_loss"] for r in runs if r["sparse"] == sparse]
        summary["rigl_90" if sparse else "dense"] = {"eval_loss_mean": statistics.mean(losses),
                                                    "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0}
    report = {"steps": args.steps, "entropy_floor": entropy_floor(), "uniform_loss": math.log(VOCAB),
              "summary": summary, "runs": runs, "torch": torch.__version__}
    write_json(args.out, report)
    print({k: v for k, v in report.items() if k != "runs"})


if __name__ == "__main__":
    main()
