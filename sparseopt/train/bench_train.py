"""``sparseopt bench-train``: one training step, masked dense against the sparse kernels, side by side.

Both sides are built by the training code itself (:func:`~sparseopt.train.build.build_run`: the
model, the masks, the SparseOpt chain and the topology updater of the config) from one seed, so they
start equal and see the same batches, each in its own process (as a training run is); rounds alternate
between the two processes, the idle one waiting. A step is forward, loss,
backward, ``topology.step()`` and ``optimizer.step()``; the step that updates the topology (dense
weight gradient for RigL, the mask update, the packed weights rebuilt at the next forward) is timed
with the step after it (whose forward rebuilds the packed weights), and the step time reported is
amortised over ``delta_t``:

    step_ms = ((delta_t - 2) * plain_step_ms + update_pair_ms) / delta_t

``max_rel_loss_diff`` compares the two sides' losses over the same steps from the same start. The
breakdown gives, per side, the step's parts (forward, backward, topology, optimizer) and the operator
classes of one profiled step (convolutions and linear layers, BatchNorm, the rest), and per masked
layer the forward + backward of that layer alone.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from typing import Any

import torch
from torch import nn

from ..memory import reuse_freed_memory
from ..native import build as native_build
from ..timing import median
from ..training_kernels import sparse_training
from .build import build_run, make_model, model_spec
from .config import TrainConfig

TOTAL_STEPS = 10**6  # the schedule's length: the drop fraction stays near alpha during the benchmark
DEFAULT_DATASETS = {"mlp": "mnist", "resnet50": "imagenet"}


@dataclasses.dataclass
class _Side:
    name: str
    run: Any
    criterion: nn.Module
    losses: list[float] = dataclasses.field(default_factory=list)
    parts: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {"forward": [], "backward": [],
                                                                                "topology": [], "optimizer": []})
    plain: list[float] = dataclasses.field(default_factory=list)
    update: list[float] = dataclasses.field(default_factory=list)

    def step(self, x: torch.Tensor, y: torch.Tensor, record: bool = True, compare: bool = False) -> float:
        run = self.run
        t0 = time.perf_counter()
        loss = self.criterion(run.model(x), y)
        t1 = time.perf_counter()
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        run.topology.step()
        t3 = time.perf_counter()
        run.optimizer.step()
        t4 = time.perf_counter()
        if record:
            for part, seconds in zip(self.parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                self.parts[part].append(seconds)
        if compare:
            self.losses.append(loss.item())
        return t4 - t0


def _median_ms(samples: list[float]) -> float:
    return median(samples) * 1e3 if samples else float("nan")


def _op_classes(side: _Side, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Milliseconds of one step by operator class (torch.profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.step(x, y, record=False)
    classes = {"convolution_and_linear": 0.0, "batchnorm": 0.0, "other": 0.0}
    for event in prof.key_averages():
        name = event.key.lower()
        ms = event.self_cpu_time_total / 1e3
        if any(k in name for k in ("convolution", "conv2d", "addmm", "aten::mm", "sparseconv", "sparselinear")):
            classes["convolution_and_linear"] += ms
        elif "batch_norm" in name:
            classes["batchnorm"] += ms
        else:
            classes["other"] += ms
    return {k: round(v, 3) for k, v in classes.items()}


def _layer_table(side: _Side, x: torch.Tensor) -> list[dict[str, Any]]:
    """Per masked layer: forward + backward of the layer alone, masked dense against sparse (ms)."""
    inputs: dict[str, torch.Tensor] = {}
    def keep(name: str):
        def hook(module, args, output) -> None:
            inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [layer.module.register_forward_hook(keep(layer.name)) for layer in side.run.masks]
    with torch.no_grad():
        side.run.model(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, state in side.run.sparse._layers.items():
        if name not in inputs:
            continue
        masked_ms, sparse_ms = state.time_paths(inputs[name].requires_grad_(name != side.run.masks.names[0]))
        density = side.run.masks.densities()[name]
        rows.append({"layer": name, "density": round(density, 4), "input": list(inputs[name].shape),
                     "masked_ms": round(masked_ms, 3), "sparse_ms": round(sparse_ms, 3),
                     "speedup": round(masked_ms / sparse_ms, 3)})
    return rows


def _batches(cfg: TrainConfig, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    spec = model_spec(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    return [(torch.randn((cfg.batch_size, *spec.in_shape), generator=g),
             torch.randint(0, spec.num_classes, (cfg.batch_size,), generator=g)) for _ in range(steps + 1)]


def _serve(conn, cfg: TrainConfig, name: str, threads: int | None, steps: int) -> None:
    """One side in its own process: built, warmed up, then a round of steps per request."""
    if threads is not None:
        torch.set_num_threads(threads)
    reused = cfg.reuse_memory and reuse_freed_memory()  # as a CPU training run does (runtime.backend_flags)
    batches = _batches(cfg, steps)
    torch.manual_seed(cfg.seed)
    run = build_run(cfg, make_model(cfg), TOTAL_STEPS, cfg.lr)
    if name != "masked":
        run.sparse = sparse_training(run.masks, name, run.topology)
    side = _Side(name, run, nn.CrossEntropyLoss())
    delta_t = getattr(run.topology, "delta_t", None)
    side.step(*batches[0], record=False, compare=True)  # warm-up (and auto's per-layer timing); compared
    conn.send(("ready", delta_t))
    while True:
        request, arg = conn.recv()
        if request == "round":
            r = arg
            for i in range(steps):
                if delta_t is not None:  # plain steps: an iteration count that is never an update step
                    run.topology.t = delta_t * (2 * r + 1) + 1
                side.plain.append(side.step(*batches[1 + i], record=r == 0, compare=r == 0))
            if delta_t is not None:  # the step that updates the topology, and the next (its forward rebuilds)
                run.topology.t = delta_t * (2 * r + 2)
                seconds = side.step(*batches[0], record=False)
                run.topology.t = delta_t * (2 * r + 2) + 1
                side.update.append(seconds + side.step(*batches[0], record=False))
            conn.send(("done", None))
        elif request == "finish":
            profile, layers = arg
            out = {"plain": side.plain, "update": side.update, "parts": side.parts, "losses": side.losses,
                   "threads": torch.get_num_threads(), "reuse_memory": reused}
            if profile:
                out["ops_ms"] = _op_classes(side, *batches[1])
            if run.sparse is not None:
                out["kernels"] = run.sparse.report()
                out["rebuild_ms_per_update"] = round(1e3 * run.sparse.rebuild_seconds / max(run.sparse.rebuilds, 1)
                                                     * len(run.sparse._layers), 3)
                if layers:
                    out["layers"] = _layer_table(side, batches[1][0])
            conn.send(("result", out))
            return


def bench_train(cfg: TrainConfig, *, threads: int | None = None, steps: int = 5, rounds: int = 3,
                kernels: str = "sparse", layers: bool = True, profile: bool = True) -> dict[str, Any]:
    """Masked dense against sparse training steps of ``cfg``'s model, masks, optimizer and DST method.

    Each side runs in its own process, as a training run does: one process holding both models measured
    each side on the other's memory (the allocator's state, which decides how many fresh pages a step
    faults in, and this VM pays about 2 us for each): 1.20x against 1.61x in separate processes for
    ResNet-20 at 95% on two threads. Rounds still alternate between the two, one command, one machine state.
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter and heap per side, no forked OpenMP state
    pipes, procs = [], []
    try:
        for name in ("masked", kernels):
            parent, child = context.Pipe()
            proc = context.Process(target=_serve, args=(child, cfg, name, threads, steps), daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        delta_t = [pipe.recv()[1] for pipe in pipes][0]
        for r in range(rounds):
            for pipe in (pipes if r % 2 == 0 else pipes[::-1]):  # one side at a time: the other waits idle
                pipe.send(("round", r))
                pipe.recv()
        for pipe in pipes:
            pipe.send(("finish", (profile, layers)))
        masked, sparse = [pipe.recv()[1] for pipe in pipes]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    dynamic = delta_t is not None
    result: dict[str, Any] = {
        "what": f"{cfg.model} {cfg.structure} {cfg.distribution} sparsity {cfg.sparsity:g}, dst {cfg.dst}, "
                f"delta_t {delta_t}, batch {cfg.batch_size}",
        "config": {k: getattr(cfg, k) for k in ("model", "dataset", "sparsity", "distribution", "structure", "nm",
                                                 "dst", "delta_t", "batch_size", "optimizer", "seed", "mlp_hidden")},
        "threads": masked["threads"], "reuse_memory": masked["reuse_memory"], "steps": steps, "rounds": rounds,
        "data": "synthetic (standard normal)",
        "processes": "one per side, rounds alternating", "backend": native_build.backend().as_dict(),
        "kernels": sparse["kernels"],
    }
    for key, side in (("masked", masked), ("sparse", sparse)):
        plain = _median_ms(side["plain"])
        # delta_t steps hold one update step and the step after it: (delta_t - 2) plain steps and that pair
        amortised = plain if not dynamic else ((delta_t - 2) * plain + _median_ms(side["update"])) / delta_t
        result[f"{key}_ms"] = round(amortised, 3)
        result[f"{key}_breakdown"] = {
            "plain_step_ms": round(plain, 3),
            "update_pair_ms": round(_median_ms(side["update"]), 3) if dynamic else None,  # the update step + the next
            "parts_ms": {k: round(_median_ms(v), 3) for k, v in side["parts"].items()},
            **({"ops_ms": side["ops_ms"]} if profile else {}),
        }
    result["speedup"] = round(result["masked_ms"] / result["sparse_ms"], 3)
    result["max_rel_loss_diff"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(masked["losses"], sparse["losses"]))
    result["rebuild_ms_per_update"] = sparse["rebuild_ms_per_update"]
    if layers:
        result["layers"] = sparse["layers"]
    return result


def default_dataset(model: str) -> str:
    return DEFAULT_DATASETS.get(model, "cifar10")
