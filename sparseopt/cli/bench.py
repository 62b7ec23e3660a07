"""``sparseopt bench-train``: masked dense against sparse-kernel training steps, side by side."""

from __future__ import annotations

import argparse


def cmd_bench_train(argv: list[str]) -> int:
    from ..files import write_json
    from ..masks.distributions import DISTRIBUTIONS
    from ..masks.structure import STRUCTURES
    from ..memory import describe
    from ..topology import DST_METHODS
    from ..train.bench_train import bench_train, default_dataset
    from ..train.config import TrainConfig
    from ..training_kernels import KERNEL_MODES

    p = argparse.ArgumentParser(prog="sparseopt bench-train", allow_abbrev=False,
                                description="One training step (forward, backward, topology update amortised over "
                                            "delta_t, optimizer) with masked dense kernels against the sparse kernels, "
                                            "side by side in one process, alternating rounds, same seed and batches.")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default=None, help="sets the input shape and class count (default: cifar10; mnist "
                                                   "for mlp, imagenet for resnet50); the batches are synthetic")
    p.add_argument("--mlp-hidden", type=int, nargs="+", default=None, help="hidden widths of --model mlp")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--distribution", default="erk", choices=[d for d in DISTRIBUTIONS if d != "custom"])
    p.add_argument("--structure", default="unstructured", choices=list(STRUCTURES))
    p.add_argument("--nm", default=None, help="N:M of --structure nm (e.g. 2:4)")
    p.add_argument("--dst", default="rigl", choices=list(DST_METHODS))
    p.add_argument("--delta-t", type=int, default=100)
    p.add_argument("--optimizer", default="sparseopt")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--kernels", default="sparse", choices=[k for k in KERNEL_MODES if k != "masked"])
    p.add_argument("--steps", type=int, default=5, help="timed plain steps per round and side")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (each: steps, then one update step)")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory for the next step in both processes, as a CPU training run does "
                        "(sparseopt.memory); --no-reuse-memory: the C library's defaults")
    p.add_argument("--json", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    if min(args.batch_size, args.steps, args.rounds, args.delta_t, args.threads or 1) < 1:
        p.error("--batch-size, --steps, --rounds, --delta-t and --threads must be >= 1")
    cfg = TrainConfig(model=args.model, dataset=args.dataset or default_dataset(args.model), sparsity=args.sparsity,
                      distribution=args.distribution, structure=args.structure, nm=args.nm, dst=args.dst,
                      delta_t=args.delta_t, optimizer=args.optimizer, batch_size=args.batch_size, seed=args.seed,
                      reuse_memory=args.reuse_memory,
                      **({"mlp_hidden": args.mlp_hidden} if args.mlp_hidden else {}))
    try:
        cfg = cfg.validate()
    except ValueError as e:
        p.error(str(e))
    result = bench_train(cfg, threads=args.threads, steps=args.steps, rounds=args.rounds, kernels=args.kernels,
                         layers=not args.no_layers)
    backend = result["backend"]
    print(f"{result['what']}, {result['threads']} threads, {describe(result['reuse_memory'])}; compiled kernels: "
          f"{backend['path']} ({backend['reason']})")
    for row in result.get("layers", []):
        print(f"{row['layer']:28s} density {row['density']:.3f}  masked {row['masked_ms']:8.3f} ms  "
              f"sparse {row['sparse_ms']:8.3f} ms  {row['speedup']:.2f}x")
    for side in ("masked", "sparse"):
        b = result[f"{side}_breakdown"]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in b["parts_ms"].items())
        ops = ", ".join(f"{k} {v:.1f}" for k, v in b.get("ops_ms", {}).items())
        print(f"{side:6s} step {result[f'{side}_ms']:.1f} ms (plain {b['plain_step_ms']:.1f}; {parts}; ops: {ops})")
    print(f"speedup {result['speedup']:.2f}x | max relative loss difference {result['max_rel_loss_diff']:.1e} | "
          f"packed-weight rebuild {result['rebuild_ms_per_update']:.1f} ms per update")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
