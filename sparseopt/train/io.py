"""The run's environment record (file writes: :mod:`sparseopt.files`; reading a run folder: :mod:`sparseopt.runs`)."""

from __future__ import annotations

import logging
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..version import __version__

logger = logging.getLogger("sparseopt")


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, seed: int, world_size: int = 1) -> dict[str, Any]:
    import numpy

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
