"""sparseopt.memory: freed memory is kept for reuse, so a repeated allocation no longer faults fresh pages in."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GLIBC

REPO = Path(__file__).resolve().parents[1]

# A training step's pattern: allocate 100 MB activations, compute, free; count the page faults of each step.
STEPS = """
import resource, sys, torch
from sparseopt.memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(10):
    before = faults()
    x = torch.ones(25_000_000)
    y = x + 1
    del x, y
    counts.append(faults() - before)
print(applied, reuse_freed_memory() if applied else None, *counts)
"""


def steps(mode: str) -> tuple[str, str, list[int]]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": ""}).stdout.split()
    return out[0], out[1], [int(c) for c in out[2:]]


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's: elsewhere reuse_freed_memory() returns False")
def test_steps_reuse_their_pages_once_the_heap_has_settled():
    applied, again, reused = steps("reuse")
    assert applied == "True" and again == "True"  # applied once, then a no-op that says so
    pages = 2 * 100_000_000 // 4096  # two 100 MB tensors a step
    assert reused[0] > pages // 2  # the first step reaches the peak
    assert max(reused[-3:]) < pages // 100  # within a few steps the heap settles: the same pages serve every step
    _, _, default = steps("default")  # the C library's defaults map and unmap the blocks every step
    assert min(default[-3:]) > pages // 2


def test_outside_glibc_it_does_nothing_and_says_so(monkeypatch):
    import sparseopt.memory as memory

    monkeypatch.setattr(memory, "_applied", False)
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert memory.reuse_freed_memory() is False
