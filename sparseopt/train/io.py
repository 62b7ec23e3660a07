"""A run folder's metric lines and the run's environment record (file writes: :mod:`sparseopt.files`)."""

from __future__ import annotations

import json
import logging
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("sparseopt")


def jsonl_lines(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every line of a JSON-lines file that only ever grows by appends.

    A last line cut short (the process was killed, or the disk filled, in the middle of an append) is dropped
    with a warning, so the run can still be resumed and reported; a bad line anywhere else is an error.
    """
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                logger.warning("%s: its last line was cut short (%s) and is ignored", path, e)
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object")
        out.append((line, record))
    return out


def read_metrics(run_dir: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """Records of a run folder's ``metrics.jsonl`` (empty when there is none yet).

    ``event=None``: the per-epoch records; ``event="update"``: the per-topology-update
    records (lines with ``"event": "update"``).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for _, r in jsonl_lines(path) if r.get("event") == event]


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, seed: int, world_size: int = 1) -> dict[str, Any]:
    import numpy

    from .. import __version__

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "sparseopt": __version__,
        "git_revision": git_revision(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "hostname": socket.gethostname(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "world_size": world_size,
        "seed": seed,
        "argv": sys.argv,
    }
    return env
