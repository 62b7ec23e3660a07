"""Run by tests/test_distributed.py under torchrun: train, then save this rank's masks and weights.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT_DIR DUMP_DIR [--stop-after-epoch K] [train flags]
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparseopt.cli.train_args import add_config_flags, parse_train_args  # noqa: E402
from sparseopt.train import trainer as trainer_mod  # noqa: E402


def main():
    import argparse

    dump = Path(sys.argv[1])
    argv = sys.argv[2:]
    stop_after = None
    if "--stop-after-epoch" in argv:
        i = argv.index("--stop-after-epoch")
        stop_after = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    corrupt = "--corrupt-mask-on-rank-1" in argv
    if "--unsync-bn-stats" in argv:  # the defect of issue 18: per-rank BatchNorm statistics into c_i
        import sparseopt.optim.scales as so

        so.mean_over_ranks = lambda tensors, group=None: tensors
    argv = [a for a in argv if a not in ("--corrupt-mask-on-rank-1", "--unsync-bn-stats")]
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    cfg = parse_train_args(parser, argv)
    t = trainer_mod.Trainer(cfg)
    rank = int(os.environ.get("RANK", "0"))
    real_log = t.log

    def log(msg):
        real_log(msg)
        if stop_after is not None and msg.startswith(f"epoch {stop_after:>3}/"):
            sys.exit(3)  # every rank stops at the same point, after the checkpoint

    t.log = log
    if corrupt and rank == 1:
        real_setup = t.setup

        def setup():
            real_setup()
            m = t.masks.masks[0].view(-1)
            m[int(torch.nonzero(m)[0])] = False  # one connection lost on this rank only
            m[int(torch.nonzero(~m)[-1])] = True

        t.setup = setup
    t.run()
    dump.mkdir(parents=True, exist_ok=True)
    torch.save({"masks": [m.clone() for m in t.masks.masks] if t.masks else [],
                "model": {k: v.clone() for k, v in t.model.state_dict().items()}}, dump / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
