"""Build, cache and load sparseopt's compiled kernels, on the machine that runs them.

The C source ships as package data (``csrc/``) and is compiled on first use with the machine's C
compiler into a plain shared library that is called through ``ctypes``. Why not
``torch.utils.cpp_extension.load``: measured on this project's machines (docs/deployment.md,
"Compiled kernels"), compiling against torch's headers takes tens of seconds where the plain C
library takes about one, and the kernels need nothing from torch but raw float pointers.

The library is built without ``-march``: each SIMD path (AVX-512, AVX2 + FMA, portable) is a
function compiled for its own target, and the C code asks the CPU at run time which it can run. The
cache is keyed all the same by everything that could make a binary wrong here: the source, the
compiler and its version, the flags, the CPU model and flags, the torch version and the platform;
a library is loaded only from the folder of its own key, after its checksum and ABI version are
checked, so a truncated file or one built elsewhere is rebuilt, never loaded.

Where no compiler is found or the build fails, one warning line names the reason and the caller
uses torch's kernels; nothing raises for that reason.

Environment:
    SPARSEOPT_NATIVE=0         do not build or load; torch's kernels only (what the fallback test forces)
    SPARSEOPT_SIMD=portable    use at most this path: avx512, avx2 or portable
    SPARSEOPT_CACHE=DIR        cache folder (default: $XDG_CACHE_HOME/sparseopt or ~/.cache/sparseopt)
    CC=...                     the C compiler (default: cc, gcc or clang, the first found)
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ABI_VERSION = 4  # must equal SPARSEOPT_ABI_VERSION in csrc/sparseopt.h
SOURCES = ("sparse_conv.c", "sparse_grad.c")
HEADERS = ("sparseopt.h",)
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-fno-strict-aliasing")
PATHS = ("portable", "avx2", "avx512")  # index = the C code's path number
_NEEDS = {"avx512": "it has avx512f, avx512vl, avx512bw and avx512dq", "avx2": "it has avx2 and fma, not all of "
          "avx512f/vl/bw/dq", "portable": "no avx2 + fma, or not x86-64"}
LIBRARY = "libsparseopt_kernels"  # + a build id: a rebuilt library is a new file, never the one a process has open


@dataclass
class Backend:
    """What ``sparseopt kernels`` prints and ``bench-infer`` records as ``backend``."""

    available: bool
    path: str  # avx512 | avx2 | portable | torch
    reason: str
    best_path: str | None = None
    compiler: str | None = None
    compiler_version: str | None = None
    flags: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    library: str | None = None
    build_seconds: float | None = None
    built_now: bool = False
    cpu: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_info() -> dict[str, Any]:
    """The CPU model and its SIMD flags (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.split()
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "neon", "asimd", "sve")))
    return {"model": model, "machine": platform.machine(), "simd": simd, "flags_hash":
            hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16]}


def _compiler() -> tuple[str, str] | tuple[None, str]:
    """``(path, version line)``, or ``(None, why)``."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in names:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"the C compiler {path} does not run ({e})"
        return path, (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "unknown"
    return None, f"no C compiler found (looked for {', '.join(names)}; set CC)"


def cache_root() -> Path:
    if os.environ.get("SPARSEOPT_CACHE"):
        return Path(os.environ["SPARSEOPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparseopt"


def _source_dir() -> Path:
    return Path(__file__).resolve().parent / "csrc"


def _key(compiler: str, version: str, cpu: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((_source_dir() / name).read_bytes())
    for part in (compiler, version, " ".join(FLAGS), cpu["model"], cpu["flags_hash"], cpu["machine"],
                 str(torch.__version__), platform.platform(), str(ABI_VERSION)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _open(library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library))
    lib.sparseopt_abi_version.restype = ctypes.c_int
    if lib.sparseopt_abi_version() != ABI_VERSION:
        raise OSError(f"ABI version {lib.sparseopt_abi_version()} != {ABI_VERSION}")
    lib.sparseopt_best_path.restype = ctypes.c_int
    lib.sparseopt_sconv.restype = ctypes.c_int
    lib.sparseopt_sconv.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.sparseopt_wgrad.restype = ctypes.c_int
    lib.sparseopt_wgrad.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.sparseopt_pack.restype = None
    lib.sparseopt_pack.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 15 + [ctypes.c_void_p, ctypes.c_int64]
    lib.sparseopt_maxpool.restype = None
    lib.sparseopt_maxpool.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 14 + [ctypes.c_void_p] + [ctypes.c_int64] * 3
    return lib


def _build(folder: Path, compiler: str) -> tuple[Path, float]:
    """``(library, seconds)``: compiled into a new file of ``folder``, complete before it gets its name."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    # dlopen returns the library already open under a name, so each build gets a name of its own
    library = folder / f"{LIBRARY}-{os.getpid()}-{time.time_ns()}.so"
    try:
        cmd = [compiler, *FLAGS, *(str(_source_dir() / s) for s in SOURCES), "-o", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            lines = (out.stderr or out.stdout or "no output").strip().splitlines()
            first = next((line for line in lines if "error" in line), lines[-1] if lines else "no output")
            raise RuntimeError(f"the compiler failed: {first.strip()}")
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library, time.perf_counter() - start


@contextlib.contextmanager
def _locked(file):
    """An exclusive lock on ``file`` where the platform has ``fcntl`` (elsewhere no compiler build is tried)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the build record's checksum still guards what is loaded
        yield
        return
    fcntl.flock(file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(file, fcntl.LOCK_UN)


_lock = threading.Lock()
_state: tuple[Backend, ctypes.CDLL | None] | None = None


def _load() -> tuple[Backend, ctypes.CDLL | None]:
    cpu = cpu_info()
    if os.environ.get("SPARSEOPT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return Backend(False, "torch", "SPARSEOPT_NATIVE=0: compiled kernels switched off", cpu=cpu), None
    compiler, version = _compiler()
    if compiler is None:
        return Backend(False, "torch", version, cpu=cpu), None
    root = cache_root()
    key = _key(compiler, version, cpu)
    folder = root / key
    backend = Backend(False, "torch", "", compiler=compiler, compiler_version=version, flags=list(FLAGS),
                      cache_dir=str(folder), cpu=cpu)
    record_path = folder / "build.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as lock, _locked(lock):  # one build at a time (DDP ranks, sweep runs)
            lib = None
            try:
                record = json.loads(record_path.read_text())
                library = folder / Path(record["library"]).name
                # truncated, replaced or built for another key: rebuilt, never loaded
                if record.get("key") == key and record.get("sha256") == _sha256(library):
                    lib = _open(library)
                    backend.build_seconds = record.get("build_seconds")
            except (OSError, ValueError, KeyError, TypeError):
                lib = None
            if lib is None:
                for old in folder.glob(f"{LIBRARY}-*.so"):  # a process that has one open keeps its copy
                    old.unlink(missing_ok=True)
                library, seconds = _build(folder, compiler)
                lib = _open(library)
                record = {"key": key, "library": library.name, "sha256": _sha256(library),
                          "build_seconds": round(seconds, 3), "compiler": compiler, "compiler_version": version,
                          "flags": list(FLAGS), "cpu": cpu, "torch": str(torch.__version__),
                          "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
                tmp = record_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(record, indent=1))
                os.replace(tmp, record_path)
                backend.build_seconds, backend.built_now = round(seconds, 3), True
            backend.library = str(library)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        backend.reason = f"the compiled kernels could not be built or loaded ({e}); using torch's kernels"
        return backend, None
    best = PATHS[lib.sparseopt_best_path()]
    backend.best_path = best
    wanted = os.environ.get("SPARSEOPT_SIMD", "").strip().lower()
    if wanted and wanted not in PATHS:
        warnings.warn(f"SPARSEOPT_SIMD={wanted!r} is not one of {list(PATHS)}; using {best}", stacklevel=3)
        wanted = ""
    path = wanted if wanted and PATHS.index(wanted) <= PATHS.index(best) else best
    backend.available, backend.path = True, path
    backend.reason = (f"SPARSEOPT_SIMD={wanted}" if wanted and wanted == path else
                      f"SPARSEOPT_SIMD={wanted} is beyond this CPU; the best it runs is {best}" if wanted else
                      f"the best path this CPU runs ({_NEEDS[best]})")
    return backend, lib


def load(warn: bool = True) -> tuple[Backend, ctypes.CDLL | None]:
    """``(backend, library)``: built and loaded once per process; the library is None when unavailable."""
    global _state
    with _lock:
        if _state is None:
            _state = _load()
            backend = _state[0]
            if warn and not backend.available and not backend.reason.startswith("SPARSEOPT_NATIVE=0"):
                warnings.warn(f"sparseopt: {backend.reason}", RuntimeWarning, stacklevel=2)
        return _state


def backend() -> Backend:
    return load()[0]


def clear_cache() -> None:
    """Delete this machine's cached build (its key's folder) and forget the loaded library."""
    compiler, version = _compiler()
    if compiler is not None:
        shutil.rmtree(cache_root() / _key(compiler, version, cpu_info()), ignore_errors=True)
    reset()


def reset() -> None:
    """Forget the loaded library, so that the next ``load`` reads the environment again (tests)."""
    global _state
    with _lock:
        _state = None


def path_number(path: str) -> int:
    return PATHS.index(path)
