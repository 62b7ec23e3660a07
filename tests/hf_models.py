"""Tiny Hugging Face models and synthetic token data for the integration tests (no hub: built from configs)."""

import torch

VOCAB, LENGTH = 64, 16


class Tokens(torch.utils.data.Dataset):
    """Sequences that count up from a random start (learnable), labelled for a causal LM or a classifier."""

    def __init__(self, n=256, seed=0, task="lm"):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.x = (start + torch.arange(LENGTH)) % VOCAB
        self.y = (start[:, 0] % 2) if task == "cls" else self.x
        self.task = task

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32, num_labels=2))


def training_args(out, **overrides):
    from transformers import TrainingArguments

    options = dict(output_dir=str(out), max_steps=20, per_device_train_batch_size=16, learning_rate=1e-3,
                   save_steps=10, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=5)
    options.update(overrides)
    return TrainingArguments(**options)
