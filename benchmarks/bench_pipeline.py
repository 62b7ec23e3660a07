"""CPU (or GPU) throughput of the on-device CIFAR pipeline vs what ResNet-20 training consumes.

    python benchmarks/bench_pipeline.py --data-dir ../shared/data --steps 30

Measures, in one process: images/s of the DeviceLoader (normalise + pad-crop-flip
on whole batches) over the real CIFAR-10 training set, and images/s of ResNet-20
training steps (dense SGD, and RigL 90% + SparseOpt). The pipeline should
deliver at least 5x what the model consumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparseopt  # noqa: E402
from sparseopt.data import DATASETS, DeviceLoader, load_cifar  # noqa: E402
from sparseopt.models import resnet20  # noqa: E402


def pipeline_throughput(images, labels, device, batch, repeats):
    info = DATASETS["cifar10"]
    loader = DeviceLoader(images, labels, batch, mean=info.mean, std=info.std, train=True, augment=True, device=device)
    rates = []
    for epoch in range(repeats):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        n = 0
        for x, _ in loader:
            n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def training_throughput(x, y, sparse, steps):
    torch.manual_seed(0)
    model = resnet20(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    topo = None
    if sparse:
        masks = sparseopt.sparsify(model, 0.9, "erk")
        opt = sparseopt.SparseOpt(opt, masks)
        topo = sparseopt.RigL(masks, opt, delta_t=100, total_steps=10**6)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if topo is not None:
            topo.step()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    images, labels = load_cifar(args.data_dir, "cifar10", train=True)
    pipe = pipeline_throughput(images, labels, device, args.batch, repeats=3)
    loader = DeviceLoader(images[:args.batch], labels[:args.batch], args.batch, mean=DATASETS["cifar10"].mean,
                          std=DATASETS["cifar10"].std, train=True, augment=True, device=device)
    x, y = next(iter(loader))
    dense = training_throughput(x, y, False, args.steps)
    sparse = training_throughput(x, y, True, args.steps)
    result = {
        "command": "python benchmarks/bench_pipeline.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{device} ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "pipeline_images_per_s": pipe,
        "train_images_per_s": {"dense": dense, "rigl90_sparseopt": sparse},
        "pipeline_over_training": pipe / max(dense, sparse),
    }
    print(f"pipeline (normalise + pad-crop-flip, batch {args.batch}): {pipe:10.0f} img/s")
    print(f"ResNet-20 training, dense SGD:                   {dense:10.0f} img/s")
    print(f"ResNet-20 training, RigL 90% + SparseOpt:        {sparse:10.0f} img/s")
    print(f"pipeline / training = {result['pipeline_over_training']:.1f}x (target >= 5x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
