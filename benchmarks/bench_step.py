"""Training-step cost side by side: dense SGD, our masked RigL, our RigL + SparseOpt, and sparsimony's RigL.

    python benchmarks/bench_step.py --repeats 30                    # ours vs dense
    python benchmarks/bench_step.py --model resnet50 --batch 8 --repeats 5
    python benchmarks/bench_step.py --device cuda --bf16 --channels-last [--compile]

sparsimony (a PyTorch DST library on PyPI) is included when it is importable. It
pins numpy 1.x, so run the comparison from a separate virtual environment:

    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 "numpy<2" sparsimony
    /tmp/peer/bin/pip install --no-deps -e .
    /tmp/peer/bin/python benchmarks/bench_step.py --repeats 30

Per-step times are measured in one process, variants interleaved round-robin,
medians over ``--repeats``; one topology update (prune + grow at drop fraction
0.3) is timed for each library; peak memory is the peak RSS of a fresh
subprocess per variant running ``--memory-steps`` steps (CPU), or
``torch.cuda.max_memory_allocated`` (GPU). Everything is reported as ratios to dense.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparseopt  # noqa: E402
from sparseopt.models import build_model  # noqa: E402

VARIANTS = ("dense", "ours_masked", "ours_sparseopt", "sparsimony")


def available_variants() -> list[str]:
    try:
        import sparsimony  # noqa: F401
    except ImportError:
        return list(VARIANTS[:3])
    return list(VARIANTS)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    def __init__(self, name, args, device):
        torch.manual_seed(0)
        self.name, self.device = name, device
        classes = 1000 if args.model == "resnet50" else 100
        self.model = build_model(args.model, classes).to(device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.topology = None
        self.bf16 = args.bf16
        if name.startswith("ours"):
            masks = sparseopt.sparsify(self.model, args.sparsity, "erk", generator=torch.Generator().manual_seed(0))
            self.opt = sparseopt.SparseOpt(self.opt, masks, precondition=name == "ours_sparseopt")
            self.topology = sparseopt.RigL(masks, self.opt, delta_t=args.delta_t, total_steps=10**7)
        elif name == "sparsimony":
            from sparsimony.distributions.base import ERKDistribution
            from sparsimony.dst.rigl import RigL
            from sparsimony.schedulers.base import CosineDecayScheduler

            self.sparsifier = RigL(scheduler=CosineDecayScheduler(0.3, 10**7, args.delta_t), distribution=ERKDistribution(),
                                   optimizer=self.opt, sparsity=args.sparsity, init_method=None)
            config = [{"tensor_fqn": f"{n}.weight"} for n, m in self.model.named_modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear))]
            self.sparsifier.prepare(self.model, config)
        self.forward = torch.compile(self.model) if args.compile else self.model

    def backward(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = nn.functional.cross_entropy(self.forward(x), y)
        loss.backward()

    def step(self, x, y):
        self.backward(x, y)
        if self.topology is not None:
            self.topology.step()  # off schedule: a counter increment, as in training
        self.opt.step()
        if self.name == "sparsimony":
            self.sparsifier.step()  # off schedule: accumulates nothing, applies masks lazily in forward

    def topology_update(self, x, y, delta_t):
        """Seconds for one prune-and-grow update, gradients of a real batch in place."""
        if self.name == "sparsimony":
            self.sparsifier._step_count = delta_t - 1  # the next step() is an update step
            self.backward(x, y)
            self.opt.step()
            sync(self.device)
            start = time.perf_counter()
            self.sparsifier.step()
        else:
            self.backward(x, y)
            sync(self.device)
            start = time.perf_counter()
            self.topology.update(0.3)
            self.opt._skip_next = False
        sync(self.device)
        return time.perf_counter() - start


def batch(args, device):
    size = args.image_size or (224 if args.model == "resnet50" else 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, torch.randint(0, 100, (args.batch,), generator=g).to(device)


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the address space exec created; ru_maxrss on Linux
    would also carry the parent's peak over fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(name, args) -> float:
    """Peak RSS (CPU) of a fresh process running a few steps of one variant."""
    cmd = [sys.executable, __file__, "--memory-only", name, "--model", args.model, "--batch", str(args.batch),
           "--sparsity", str(args.sparsity), "--memory-steps", str(args.memory_steps)]
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet50"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--delta-t", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--memory-only", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=available_variants())
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    x, y = batch(args, device)

    if args.memory_only:
        r = Runner(args.memory_only, args, device)
        for _ in range(args.memory_steps):
            r.step(x, y)
        print(peak_rss_mb())
        return None

    runners = {n: Runner(n, args, device) for n in args.variants}
    for r in runners.values():  # warm-up
        r.step(x, y)
        r.step(x, y)
    times = {n: [] for n in runners}
    gpu_peak = {}
    for _ in range(args.repeats):
        for n, r in runners.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            r.step(x, y)
            sync(device)
            times[n].append(time.perf_counter() - start)
            if device.type == "cuda":
                gpu_peak[n] = max(gpu_peak.get(n, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    updates = {n: statistics.median([r.topology_update(x, y, args.delta_t) for _ in range(args.updates)])
               for n, r in runners.items() if n != "dense"}
    med = {n: statistics.median(t) for n, t in times.items()}
    memory = gpu_peak if device.type == "cuda" else {n: peak_memory_mb(n, args) for n in runners}
    result = {
        "command": "python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "model": args.model, "batch": args.batch, "sparsity": args.sparsity, "repeats": args.repeats,
        "median_step_s": med,
        "step_ratio_to_dense": {n: t / med["dense"] for n, t in med.items()},
        "images_per_s": {n: args.batch / t for n, t in med.items()},
        "topology_update_s": updates,
        "peak_memory_mb": memory,
        "memory_ratio_to_dense": {n: m / memory["dense"] for n, m in memory.items()},
        "rigl_update_amortised_fraction": {n: u / (args.delta_t * med[n]) for n, u in updates.items()},
    }
    print(f"{args.model} batch {args.batch}, sparsity {args.sparsity}, {result['device']}, torch {torch.__version__}, "
          f"median of {args.repeats}")
    print(f"{'variant':16s} {'ms/step':>9s} {'x dense':>8s} {'img/s':>8s} {'update ms':>10s} {'peak MB':>9s} {'x dense':>8s}")
    for n in runners:
        upd = f"{updates[n] * 1e3:10.1f}" if n in updates else f"{'-':>10s}"
        print(f"{n:16s} {med[n] * 1e3:9.1f} {med[n] / med['dense']:8.3f} {args.batch / med[n]:8.0f} {upd} "
              f"{memory[n]:9.0f} {memory[n] / memory['dense']:8.3f}")
    if "ours_masked" in med:
        print(f"ours masked / dense = {med['ours_masked'] / med['dense']:.3f} (target <= 1.05); "
              f"sparseopt / masked = {med['ours_sparseopt'] / med['ours_masked']:.3f} (target <= 1.03); "
              f"RigL update / {args.delta_t} steps = {100 * result['rigl_update_amortised_fraction']['ours_masked']:.2f}% "
              "(target <= 2%)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
