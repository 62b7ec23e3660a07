"""Training-step cost of dense SGD, masked SGD (the DST baseline) and SparseOpt, side by side.

Times, in one process and interleaved round-robin so that machine noise hits
every variant alike:

* ``dense``      : plain SGD step (the physical limit for masked training);
* ``masked``     : ``SparseOpt(base, masks, precondition=False)`` (masked DST baseline);
* ``sparseopt``  : ``SparseOpt(base, masks)`` (preconditioned);
* ``rigl_update``: one RigL topology update (prune + grow + state reset).

Reports medians and ratios, and the RigL update amortised over ``delta_t`` steps.

    python benchmarks/bench_step.py --model resnet20 --batch 128 --repeats 20
    python benchmarks/bench_step.py --model resnet50 --batch 8 --image-size 224 --repeats 5
    python benchmarks/bench_step.py --device cuda --bf16 --channels-last --compile   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparseopt  # noqa: E402
from sparseopt.models import build_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Variant:
    def __init__(self, name, args, device):
        torch.manual_seed(0)
        classes = 1000 if args.model == "resnet50" else 100
        self.model = build_model(args.model, classes).to(device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        base = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.masks = None
        if name == "dense":
            self.opt = base
        else:
            self.masks = sparseopt.sparsify(self.model, args.sparsity, "erk", generator=torch.Generator().manual_seed(0))
            self.opt = sparseopt.SparseOpt(base, self.masks, precondition=name == "sparseopt")
            self.rigl = sparseopt.RigL(self.masks, self.opt, delta_t=args.delta_t, total_steps=10**6)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.args, self.device = args, device

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            loss = nn.functional.cross_entropy(self.forward(x), y)
        loss.backward()
        self.opt.step()

    def rigl_update(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            nn.functional.cross_entropy(self.forward(x), y).backward()
        sync(self.device)
        start = time.perf_counter()
        self.rigl.update(0.3)
        sync(self.device)
        self.opt._skip_next = False
        return time.perf_counter() - start


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet32", "resnet56", "resnet50"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=None, help="default 32 (CIFAR) or 224 (ResNet-50)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--delta-t", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = args.image_size or (224 if args.model == "resnet50" else 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 100, (args.batch,), generator=g).to(device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)

    names = ["dense", "masked", "sparseopt"]
    variants = {n: Variant(n, args, device) for n in names}
    for _ in range(args.warmup):
        for v in variants.values():
            v.step(x, y)
    times: dict[str, list[float]] = {n: [] for n in names}
    peak_mem: dict[str, int] = {}
    for _ in range(args.repeats):
        for n in names:  # round robin: noise hits every variant alike
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[n].append(timed(lambda v=variants[n]: v.step(x, y), device))
            if device.type == "cuda":
                peak_mem[n] = max(peak_mem.get(n, 0), torch.cuda.max_memory_allocated())
    update = [variants["masked"].rigl_update(x, y) for _ in range(max(3, args.repeats // 4))]

    med = {n: statistics.median(t) for n, t in times.items()}
    med_update = statistics.median(update)
    result = {
        "command": " ".join(["python", "benchmarks/bench_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "model": args.model,
        "batch": args.batch,
        "image_size": size,
        "sparsity": args.sparsity,
        "repeats": args.repeats,
        "median_step_s": med,
        "images_per_s": {n: args.batch / t for n, t in med.items()},
        "median_rigl_update_s": med_update,
        "ratio_masked_over_dense": med["masked"] / med["dense"],
        "ratio_sparseopt_over_masked": med["sparseopt"] / med["masked"],
        "rigl_update_amortised_fraction": med_update / (args.delta_t * med["masked"]),
    }
    if peak_mem:
        result["peak_memory_mb"] = {n: m / 2**20 for n, m in peak_mem.items()}
    print(f"{args.model} batch {args.batch} on {result['device']}, torch {torch.__version__}, median of {args.repeats}")
    for n in names:
        print(f"  {n:10s} {med[n] * 1e3:9.2f} ms/step  {args.batch / med[n]:9.1f} img/s")
    print(f"  rigl update {med_update * 1e3:8.2f} ms")
    print(f"  masked / dense        = {result['ratio_masked_over_dense']:.3f}  (target <= 1.05)")
    print(f"  sparseopt / masked    = {result['ratio_sparseopt_over_masked']:.3f}  (target <= 1.03)")
    print(f"  rigl update / (delta_t={args.delta_t} steps) = {100 * result['rigl_update_amortised_fraction']:.2f}%  (target <= 2%)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
