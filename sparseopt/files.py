"""Files the library writes and reads: atomic writes, and checkpoints loaded without unpickling code.

The ground floor: every other package (training, deployment, sweeps, analyses, integrations) writes its
files through here, so a crash mid-write never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place.

    A crash mid-write leaves the previous file intact (``os.replace`` is atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` written atomically; gzip-compressed (reproducibly: no timestamp) when ``path`` ends in ``.gz``,
    as committed results are (about a tenth of the size)."""
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    return atomic_write(path, lambda f: f.write(data))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


class DiskFull(OSError):
    """A write that failed for want of space: one line that says where and how much is needed."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state (what a checkpoint of it needs on disk, near enough)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically; a full disk is a :class:`DiskFull` naming the file and the space it needs.

    torch reports a full disk as "file write failed" without the reason, so the free space is checked
    when a write fails. The previous checkpoint is untouched either way (the write goes to a temporary file).
    """
    path = Path(path)
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except (RuntimeError, OSError) as e:
        need = tensor_bytes(state)
        free = shutil.disk_usage(path.parent).free
        if getattr(e, "errno", None) == errno.ENOSPC or free < need + (1 << 20):
            kept = "the previous checkpoint is kept" if path.is_file() else "there is no earlier checkpoint"
            raise DiskFull(f"disk full: the checkpoint {path} needs about {need / 2**20:.1f} MB and "
                           f"{free / 2**20:.1f} MB are free there; {kept}. Free some space and run the same command "
                           "with --resume") from None
        raise


def load_failure(error: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed, without torch's advice to load unsafely."""
    text = str(error)
    refused = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, flags=re.IGNORECASE)
    if refused:
        return f"it contains objects other than tensors and plain data ({refused.group(1)}), which are never unpickled"
    lines = [line for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(error).__name__}: {lines[0] if lines else 'unreadable'}"


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code from the file); a refusal is one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, refused globals
        raise ValueError(f"checkpoint {path} cannot be loaded safely: {load_failure(e)}") from None
