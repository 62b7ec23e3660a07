"""Training throughput of N ResNet-20 runs at once on one device, eager or compiled (issue 13).

    python benchmarks/bench_runs_per_gpu.py --runs 1 4 8 --bf16 --channels-last          # eager
    python benchmarks/bench_runs_per_gpu.py --runs 1 --compile-mode reduce-overhead       # CUDA graphs
    python benchmarks/bench_runs_per_gpu.py --device cpu --runs 1 2 --steps 5 --warmup 2  # a rehearsal

Each run is a separate process training CIFAR-shaped random batches (batch 128) with RigL at 90% and
SparseOpt, the step of ``sparseopt train`` without data loading and evaluation. All N processes
warm up, wait at a common start line, then time ``--steps`` steps; the aggregate is every image they
trained divided by the span from the first start to the last finish. Reported as ratios to one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparseopt
    from sparseopt.models import build_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("resnet20", 10).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    masks = sparseopt.sparsify(model, 0.9, generator=torch.Generator().manual_seed(0))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), masks)
    topology = sparseopt.RigL(masks, opt, delta_t=100, total_steps=10**6)
    forward = torch.compile(model, mode=args.compile_mode) if args.compile_mode else model
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = nn.functional.cross_entropy(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        topology.step()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    Path(args.ready).touch()
    while not Path(args.go).exists():
        time.sleep(0.001)
    start = time.time()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"start": start, "end": time.time(), "images": args.steps * args.batch}))


def measure(n: int, args) -> dict:
    folder = Path(tempfile.mkdtemp())
    threads = max(1, (os.cpu_count() or 1) // n)
    go = folder / "go"
    procs = []
    for i in range(n):
        cmd = [sys.executable, __file__, "--worker", "--ready", str(folder / f"ready{i}"), "--go", str(go),
               "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
        cmd += ["--bf16"] * args.bf16 + ["--channels-last"] * args.channels_last
        cmd += ["--compile-mode", args.compile_mode] if args.compile_mode else []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
    while not all((folder / f"ready{i}").exists() for i in range(n)):
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a benchmark worker failed")
        time.sleep(0.01)
    go.touch()
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"runs": n, "aggregate_images_per_s": sum(r["images"] for r in results) / span,
            "per_run_images_per_s": [r["images"] / (r["end"] - r["start"]) for r in results]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    p.add_argument("--go", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [measure(n, args) for n in args.runs]
    one = rows[0]["aggregate_images_per_s"] if args.runs[0] == 1 else None
    mode = args.compile_mode or "eager"
    print(f"ResNet-20 RigL 90% + SparseOpt, batch {args.batch}, {args.device}, {mode}, {args.steps} timed steps")
    for r in rows:
        ratio = f"{r['aggregate_images_per_s'] / one:6.2f}x one run" if one else ""
        print(f"{r['runs']:3d} runs at once: {r['aggregate_images_per_s']:10.0f} images/s in all  {ratio}")
    if args.json:
        args.json.write_text(json.dumps({"mode": mode, "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
