"""One rank of a 2-process DDP run of the Hugging Face Trainer with SparseTrainingCallback (tests/test_huggingface.py)."""

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_models import Tokens, bert, gpt2, training_args  # noqa: E402
from transformers import Trainer  # noqa: E402

from sparseopt.integrations.huggingface import SparseTrainingCallback  # noqa: E402


def main(out: str) -> None:
    callback = SparseTrainingCallback(sparsity=0.9, dst=sys.argv[2], delta_t=3)
    model = bert() if sys.argv[3] == "bert" else gpt2()
    args = training_args(out, max_steps=12, per_device_train_batch_size=8, ddp_backend="gloo", save_steps=100)
    data = Tokens(task="cls" if sys.argv[3] == "bert" else "lm")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    rank = args.process_index
    torch.save({"masks": [m.clone() for m in callback.masks.masks], "updates": callback.topology.num_updates,
                "world": args.world_size, "model": {k: v.clone() for k, v in model.state_dict().items()}},
               Path(out) / f"rank{rank}.pt")
    if torch.distributed.is_initialized():  # a process group left to interpreter exit can abort (gloo's threads)
        torch.distributed.barrier()
        del trainer  # it holds the DDP wrapper, which holds the group
        gc.collect()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
