"""Running a sweep: locally (one after another, or N at a time, one per GPU) or on SLURM through submitit.

Idempotent: finished runs are skipped, runs with a checkpoint resume, diverged
runs are reported and left alone (``retry_failed`` restarts them from scratch).
Every run is an ordinary ``sparseopt train`` run folder inside the sweep folder,
next to ``sweep.json`` (the manifest ``sparseopt report`` reads).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..files import atomic_write, write_json
from ..runs import RunFolder
from ..train.config import config_differences
from ..train.run_folder import listing
from .grid import PlannedRun, SweepSpec, expand, run_state


def stale_runs(runs: list[PlannedRun]) -> list[str]:
    """``"run: differences"`` for every run folder already made with another config than the sweep plans now.

    A sweep re-run after its file (or base config, or ``--set``) changed would otherwise skip finished runs and
    report the old configuration's numbers under the new one.
    """
    stale = []
    for run in runs:
        folder = RunFolder(run.config.out)
        if not folder.has_config():
            continue
        try:
            old = folder.config()
        except (yaml.YAMLError, OSError, ValueError) as e:
            stale.append(f"{run.name}: unreadable {folder.config_path.name} ({type(e).__name__})")
            continue
        diffs = config_differences(old, run.config.to_dict())
        if diffs:
            stale.append(f"{run.name}: " + "; ".join(map(str, diffs)))
    return stale


def plan(runs: list[PlannedRun], retry_failed: bool = False) -> list[tuple[PlannedRun, str]]:
    """(run, action) with action in ``skip`` / ``resume`` / ``start`` / ``failed``.

    Refuses (ValueError) a sweep folder that holds runs of the same names made with another configuration.
    """
    stale = stale_runs(runs)
    if stale:
        shown = listing(stale, 5, sep="\n  ")
        raise ValueError(
            f"{len(stale)} run folder(s) of this sweep were made with another configuration:\n  {shown}\n"
            "finished runs would be skipped and reported under the new settings; write the sweep to another --out, "
            "or delete those run folders to re-run them"
        )
    actions = []
    for run in runs:
        state = run_state(run.config.out)
        if state == "finished":
            actions.append((run, "skip"))
        elif state == "resumable":
            actions.append((run, "resume"))
        elif state == "failed":
            actions.append((run, "start" if retry_failed else "failed"))
        else:
            actions.append((run, "start"))
    return actions


def run_config(run: PlannedRun, action: str):
    """The run's config with the flags its action needs (resume a checkpoint, or replace a partial folder)."""
    return dataclasses.replace(run.config, resume=action == "resume", overwrite=action == "start", quiet=True)


def write_run_config(run: PlannedRun, action: str, folder: Path) -> Path:
    """The config file a run's ``sparseopt train --config`` subprocess reads."""
    cfg = run_config(run, action)
    path = folder / f"{run.name}.yaml"
    return atomic_write(path, lambda f: f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()))


def write_manifest(spec: SweepSpec, out: Path, runs: list[PlannedRun]) -> None:
    write_json(out / "sweep.json", {"name": spec.name, "runs": [r.name for r in runs], "grid": spec.grid,
                                    "variants": spec.variants, "seeds": spec.seeds, "fixed": spec.fixed,
                                    "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def train_in_process(config: dict[str, Any], distributed: bool = False) -> dict[str, Any]:
    """Entry point of a submitit job: set up torch.distributed from SLURM when needed, then train."""
    from ..train.config import TrainConfig
    from ..train.trainer import train

    if distributed:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return train(TrainConfig(**config))


def train_command(config_path: str | Path, nproc: int = 1) -> list[str]:
    """The ``sparseopt train --config`` command of one run (under ``torch.distributed.run`` for ``nproc > 1``)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "sparseopt", "train", "--config", str(config_path)]


def first_line(error: Exception) -> str:
    """A job's error in one line (its full traceback is in the job's log folder)."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def device_slots(parallel: int = 1, gpus: list[str] | None = None, per_device: int = 1) -> list[str | None]:
    """One entry per run that may go at once: GPU ids round-robin (``per_device`` runs on each), or CPU slots."""
    if per_device < 1:
        raise ValueError(f"per_device must be >= 1, got {per_device!r}")
    if gpus:
        return [gpu for _ in range(per_device) for gpu in gpus]
    return [None] * parallel


def threads_per_run(slots: int, cpus: int | None = None) -> int:
    """CPU threads each run may use so that ``slots`` runs at once do not oversubscribe the cores."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, slots))


def run_local(actions, out: Path, *, parallel: int = 1, gpus: list[str] | None = None, per_device: int = 1,
              nproc_per_run: int = 1, poll_s: float = 0.5) -> tuple[dict[str, int], int | None]:
    """Each run as a ``sparseopt train`` subprocess: ``parallel`` at a time on the CPU, or ``per_device`` at a time
    on each GPU of ``gpus`` (assigned round-robin through ``CUDA_VISIBLE_DEVICES``), each with its share of the
    CPU threads. SIGTERM / SIGINT stop every run cleanly (each keeps its last checkpoint, status ``interrupted``).
    Returns the runs' exit codes and the signal that stopped the sweep (None: it was not stopped)."""
    configs = out / ".sweep" / "configs"
    logs = out / ".sweep" / "logs"
    todo = [(run, action) for run, action in actions if action in ("start", "resume")]
    free = device_slots(parallel, gpus, per_device)
    threads = threads_per_run(len(free) * nproc_per_run)
    running: list[tuple[subprocess.Popen, PlannedRun, str | None, Any]] = []
    codes: dict[str, int] = {}
    stopping: list[int] = []

    def stop(signum, frame):
        stopping.append(signum)
        for proc, *_ in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (todo and not stopping) or running:
            while todo and free and not stopping:
                run, action = todo.pop(0)
                slot = free.pop(0)
                cmd = train_command(write_run_config(run, action, configs), nproc_per_run)
                env = dict(os.environ)
                for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                    env.setdefault(var, str(threads))
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                logs.mkdir(parents=True, exist_ok=True)
                log = open(logs / f"{run.name}.log", "a")
                log.flush()
                print(f"[sweep] {action:6s} {run.name}" + (f" on GPU {slot}" if slot is not None else ""), flush=True)
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                running.append((proc, run, slot, (log, log.tell())))
            time.sleep(poll_s)
            for item in list(running):
                proc, run, slot, (log, start) = item
                if proc.poll() is not None:
                    log.close()
                    codes[run.name] = proc.returncode
                    for line in warnings_in(logs / f"{run.name}.log", start):  # shown here, not only in the log
                        print(f"[sweep] {run.name}: {line}", flush=True)
                    if proc.returncode == 0:
                        status = "done"
                    elif stopping and proc.returncode in STOPPED_CODES:
                        status = "stopped (resumable)"
                    else:
                        status = f"FAILED (exit {proc.returncode}, see {logs / (run.name + '.log')})"
                    print(f"[sweep] {status:6s} {run.name}", flush=True)
                    running.remove(item)
                    free.append(slot)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        left = [run.name for run, _ in todo]
        stopped = [name for name, code in codes.items() if code in STOPPED_CODES]
        print(f"[sweep] stopped by {signal.Signals(stopping[0]).name}: {len(stopped)} run(s) interrupted with their "
              f"checkpoints kept, {len(left)} not started; run the same sweep command again to resume", flush=True)
    return codes, (stopping[0] if stopping else None)


# Exit codes of a run stopped by SIGINT / SIGTERM (128 + signal, as `sparseopt train` and a shell report them).
STOPPED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def warnings_in(log: Path, start: int = 0) -> list[str]:
    """The WARNING lines a run wrote to its log after byte ``start`` (this invocation's part)."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.lstrip().startswith("WARNING")]


def train_bundle(config_paths: list[str], threads: int) -> list[int]:
    """Entry point of a submitit job that packs several runs onto its one GPU: each a ``sparseopt train``
    subprocess, all at once, each with ``threads`` CPU threads. Returns their exit codes."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(train_command(path), env=env) for path in config_paths]
    return [proc.wait() for proc in procs]


def run_submitit(actions, out: Path, spec: SweepSpec, cluster: str | None = None, wait: bool = True,
                 per_device: int = 1) -> dict[str, Any]:
    """Submit every pending run as a submitit job (SLURM on a cluster, subprocesses with ``cluster="local"``).

    ``per_device > 1`` packs that many runs into each single-GPU job (:func:`train_bundle`).
    """
    try:
        import submitit
    except ImportError:
        raise ValueError("--launcher submitit needs the submitit package: pip install submitit") from None
    executor = submitit.AutoExecutor(folder=str(out / ".sweep" / "submitit" / "%j"), cluster=cluster)
    params = {"name": f"sparseopt-{spec.name}", "timeout_min": 60 * 24, **spec.slurm}
    if spec.nproc_per_run > 1:
        params.setdefault("tasks_per_node", spec.nproc_per_run)
        params.setdefault("gpus_per_node", spec.nproc_per_run)
    executor.update_parameters(**params)
    pending = [(run, action) for run, action in actions if action in ("start", "resume")]
    if per_device > 1:
        if spec.nproc_per_run > 1:
            raise ValueError("per_device > 1 packs single-process runs onto one GPU; it cannot be combined with nproc_per_run")
        return _submit_bundles(executor, pending, out, per_device, spec, wait)
    jobs = {}
    for run, action in pending:
        cfg = run_config(run, action)
        jobs[run.name] = executor.submit(train_in_process, cfg.to_dict(), spec.nproc_per_run > 1)
        print(f"[sweep] submitted {run.name} ({action}) as job {jobs[run.name].job_id}", flush=True)
    if not wait:
        return {name: job.job_id for name, job in jobs.items()}
    results = {}
    for name, job in jobs.items():
        try:
            job.result()
            results[name] = 0
        except Exception as e:
            print(f"[sweep] FAILED {name}: {first_line(e)}", flush=True)
            results[name] = 1
    return results


def _submit_bundles(executor, pending, out: Path, per_device: int, spec: SweepSpec, wait: bool) -> dict[str, Any]:
    configs = out / ".sweep" / "configs"
    bundles = [pending[i:i + per_device] for i in range(0, len(pending), per_device)]
    threads = threads_per_run(per_device, int(spec.slurm.get("cpus_per_task", os.cpu_count() or 1)))
    jobs = []
    for bundle in bundles:
        paths = [str(write_run_config(run, action, configs)) for run, action in bundle]
        job = executor.submit(train_bundle, paths, threads)
        names = [run.name for run, _ in bundle]
        print(f"[sweep] submitted {len(names)} runs as job {job.job_id} (one GPU): {', '.join(names)}", flush=True)
        jobs.append((names, job))
    if not wait:
        return {name: job.job_id for names, job in jobs for name in names}
    results = {}
    for names, job in jobs:
        try:
            codes = job.result()
        except Exception as e:
            print(f"[sweep] FAILED job {job.job_id}: {first_line(e)}", flush=True)
            codes = [1] * len(names)
        results.update(zip(names, codes))
    return results


def run_sweep(spec: SweepSpec, out: str | Path, *, overrides: dict[str, Any] | None = None, launcher: str = "local",
              parallel: int = 1, gpus: list[str] | None = None, per_device: int = 1, cluster: str | None = None,
              dry_run: bool = False,
              retry_failed: bool = False, wait: bool = True) -> dict[str, Any]:
    out = Path(out)
    runs = expand(spec, out, overrides)
    actions = plan(runs, retry_failed)
    counts = {a: sum(1 for _, x in actions if x == a) for a in ("skip", "resume", "start", "failed")}
    print(f"[sweep] {spec.name}: {len(runs)} runs -> {out} ({counts['skip']} finished, {counts['resume']} to resume, "
          f"{counts['start']} to start, {counts['failed']} diverged and left alone)", flush=True)
    if dry_run:
        for run, action in actions:
            print(f"  {action:6s} {run.name}")
        return {"runs": [r.name for r in runs], "actions": {r.name: a for r, a in actions}, "codes": {}}
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(spec, out, runs)
    if launcher == "local":
        codes, stopped_by = run_local(actions, out, parallel=parallel, gpus=gpus, per_device=per_device,
                                      nproc_per_run=spec.nproc_per_run)
    elif launcher == "submitit":
        codes, stopped_by = run_submitit(actions, out, spec, cluster=cluster, wait=wait, per_device=per_device), None
    else:
        raise ValueError(f"unknown launcher {launcher!r}; choose local or submitit")
    return {"runs": [r.name for r in runs], "actions": {r.name: a for r, a in actions}, "codes": codes,
            "stopped_by": stopped_by}
