"""A masked ResNet-20 RigL training step, eager against ``torch.compile`` (inductor) on the CPU.

    python benchmarks/bench_compile_cpu.py --threads 2 --json FILE

One process, both models built from one seed (SparseOpt + RigL at 95% ERK, batch 128, synthetic batches);
rounds alternate; reports the compile time (first steps), the median step of each and how many graphs
dynamo compiled before and after a topology update (a recompile would show there).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparseopt
from sparseopt.models import build_model
from sparseopt.native import build


def make(seed: int):
    torch.manual_seed(seed)
    model = build_model("resnet20", 10, in_shape=(3, 32, 32))
    masks = sparseopt.sparsify(model, 0.95, "erk", generator=torch.Generator().manual_seed(seed))
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), masks)
    return model, masks, opt, sparseopt.RigL(masks, opt, delta_t=100, total_steps=10**6)


def step(model, opt, topology, x, y) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    topology.step()
    opt.step()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g)
    eager, compiled = make(0), make(0)
    fast = torch.compile(compiled[0])
    start = time.perf_counter()
    for _ in range(2):  # the first forward and backward compile; SparseOpt's one-off hooks go after the first
        step(fast, *compiled[2:], x, y)
    compile_s = time.perf_counter() - start
    step(eager[0], *eager[2:], x, y)
    times = {"eager": [], "compiled": []}
    graphs_before = counters["stats"]["unique_graphs"]
    for r in range(args.rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            model = eager[0] if name == "eager" else fast
            run = eager if name == "eager" else compiled
            for _ in range(args.steps):
                run[3].t = 1  # plain steps
                times[name].append(step(model, run[2], run[3], x, y))
        compiled[3].t = 100  # a topology update on the compiled side: does anything recompile?
        step(fast, *compiled[2:], x, y)
        eager[3].t = 100
        step(eager[0], *eager[2:], x, y)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    result = {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "compile_s": round(compile_s, 1),
              "eager_ms": round(med["eager"], 1), "compiled_ms": round(med["compiled"], 1),
              "speedup": round(med["eager"] / med["compiled"], 3), "topology_updates": eager[3].num_updates,
              "graphs_after_warmup": graphs_before, "graphs_at_end": counters["stats"]["unique_graphs"],
              "cpu": build.cpu_info()["model"], "torch": torch.__version__}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
