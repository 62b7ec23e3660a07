"""Run folders: what belongs to one, replacing one safely, and the lock that keeps one run per folder.

A folder is a run folder only if sparseopt's own marker says so: ``.sparseopt-run``,
written when a run starts, with the run's id (folders of earlier versions are
recognised by their ``env.json``). sparseopt never replaces or deletes anything in
a folder without the marker, and in one with it only the files it writes
(:data:`RUN_FILES`): pointing ``--out`` at a folder of documents, a config of your
own or your TensorBoard logs cannot lose them. A run holds an exclusive lock
(``flock`` on ``.lock``) on its folder for its whole life: a second run or resume
into the same folder fails at once with the holder's pid, and the operating
system drops the lock of a killed process, so a stale lock never blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from ..runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ENV_FILE,
    LOCK_NAME,
    MARKER,
    METRICS_FILE,
    RESULTS_FILE,
    RunFolder,
)
from .config import TrainConfig
from .naming import run_name

RUN_FILES = frozenset({CONFIG_FILE, ENV_FILE, METRICS_FILE, CHECKPOINT_FILE, RESULTS_FILE, LOCK_NAME, MARKER,
                       "comparison.md", "comparison.json", "comparison.png", "data_stats.json"})
RUN_DIRS = frozenset({"tensorboard", "wandb"})
COMPARE_DIRS = frozenset({"sgd", "sparseopt"})  # a --compare-optimizers folder holds two run folders


def check_out_path(path: Path) -> Path:
    """Refuse an output folder that cannot be made because it or a parent is a file; nothing is created."""
    for parent in [Path(path), *Path(path).parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {path}: {parent} is a file, not a folder")
            break
    return Path(path)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # an atomic write interrupted by a crash


def foreign_entries(path: Path) -> list[str]:
    """Entries of ``path`` that ``sparseopt train`` did not write (sorted); empty for a run folder."""
    foreign = []
    for entry in path.iterdir():
        name = entry.name
        if name in RUN_FILES and entry.is_file() or name in RUN_DIRS and entry.is_dir() or _is_temporary(name):
            continue
        if name in COMPARE_DIRS and entry.is_dir() and not foreign_entries(entry):
            continue
        foreign.append(name + ("/" if entry.is_dir() else ""))
    return sorted(foreign)


def is_run_folder(path: Path) -> bool:
    """Whether sparseopt's marker (or, for folders of earlier versions, its env.json record) says ``path`` is a run's."""
    if (path / MARKER).is_file():
        return True
    try:  # a run folder written before the marker existed: env.json is sparseopt's record of its invocations
        record = json.loads((path / ENV_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("invocations"), list) and "torch" in record


def write_marker(path: Path, **info) -> str:
    """Mark ``path`` as a run folder with a new run id; returns the id."""
    run_id = uuid.uuid4().hex
    record = {"run_id": run_id, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), **info}
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path / MARKER)
    return run_id


def has_run_content(path: Path) -> bool:
    """Whether ``path`` holds anything but a lock file and interrupted temporary writes."""
    return path.is_dir() and any(e.name != LOCK_NAME and not _is_temporary(e.name) for e in path.iterdir())


def listing(items: list[str], limit: int, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, and how many more there are (for error messages)."""
    more = f"{sep}... and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def clear_run_folder(path: Path) -> None:
    """Remove a previous run's files from ``path`` (``--overwrite``), or refuse if it holds anything else."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder")
    foreign = foreign_entries(path)
    if foreign:
        shown = listing(foreign, 8)
        raise ValueError(
            f"--overwrite refuses to clear {path}: it is not a sparseopt run folder (it holds {shown}). "
            "Choose another --out, or remove the folder yourself"
        )
    for entry in path.iterdir():
        if entry.name in (LOCK_NAME, MARKER):
            continue  # held by this run; the marker is renewed by it
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class RunLock:
    """Exclusive, process-lifetime lock on a run folder (POSIX ``flock``; a no-op where it is unavailable)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"run folder {self.path.parent} is in use by another sparseopt run ({self.holder()}); "
                             "wait for it to finish, stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def held_elsewhere(self) -> bool:
        """Whether a live process holds the lock now (tested without keeping it; no file is created)."""
        try:
            import fcntl
        except ImportError:
            return False
        if not self.path.is_file():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)  # also drops the lock just taken

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        # The file stays: unlinking a lock file races with a process that opened it just before.
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def prepare_out_dir(cfg: TrainConfig) -> tuple[Path, bool, list[str]]:
    """The run folder, whether to resume from its checkpoint, and what to tell; refuses what would mix or lose results.

    Nothing is written here (a refused folder is left exactly as it was): the folder is created,
    locked, marked and (``--overwrite``) cleared when the run starts (``records.start_run_folder``).
    """
    out = Path(cfg.out if cfg.out else Path("runs") / run_name(cfg))
    check_out_path(out)
    check_not_in_use(out)
    ours, content = is_run_folder(out), has_run_content(out)
    if content and not ours:
        raise FileExistsError(
            f"--out {out} holds files that sparseopt did not write ({listing(sorted(e.name for e in out.iterdir()), 6)}; "
            f"no {MARKER} marker): sparseopt never replaces or deletes them. Choose another --out")
    checkpoint = RunFolder(out).has_checkpoint()
    restart = [f"{out} holds a run that stopped before its first checkpoint: starting it from scratch"] * (
        ours and content and not checkpoint and not cfg.overwrite)
    if cfg.resume:
        if checkpoint:
            return out, True, []
        if ours:  # stopped before its first checkpoint: nothing to resume, start again
            return out, False, restart
        raise ValueError(f"--resume: no checkpoint at {RunFolder(out).checkpoint_path} and no run started there; "
                         f"start it without --resume")
    if checkpoint and not cfg.overwrite:
        raise FileExistsError(f"output folder {out} holds a run: pass --resume to continue it or --overwrite to replace it")
    foreign = foreign_entries(out) if ours else []
    if foreign:
        raise ValueError(f"--out {out} is a sparseopt run folder that also holds {listing(foreign, 8)}: sparseopt does not "
                         "delete what it did not write; move them, or choose another --out")
    return out, False, restart  # new, or a run that stopped before its first checkpoint: the same command starts it again


def check_not_in_use(out: Path) -> None:
    """Refuse a folder whose lock a running process holds, naming it (before any --resume advice could mislead)."""
    lock = RunLock(out)
    if out.is_dir() and lock.held_elsewhere():
        raise ValueError(f"run folder {out} is in use by a running sparseopt process ({lock.holder()}): wait for it to "
                         "finish or stop it (Ctrl-C or kill; it can be resumed afterwards), or choose another --out")
