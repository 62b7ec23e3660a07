"""``--download`` for CIFAR and MNIST: official sources, official checksums, atomic writes.

A file is streamed to a hidden ``.part`` file beside its destination, its MD5
is checked against the official value, and only then renamed into place
(``os.replace`` is atomic). A broken or mismatching transfer leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from .errors import DatasetError

# (file name, md5) per dataset; the md5 values are the ones published with the datasets.
SOURCES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", [("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/", [("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")]),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        [
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ],
    ),
    "fashion_mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        [
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ],
    ),
}
SUBFOLDER = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": ".", "cifar100": "."}


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: Path, md5: str, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``md5``. Returns ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            expected = response.headers.get("Content-Length")
            received = 0
            while block := response.read(1 << 20):
                out.write(block)
                received += len(block)
            if expected is not None and received != int(expected):
                raise DatasetError(f"download of {url} interrupted: got {received} of {expected} bytes")
        actual = md5sum(part)
        if actual != md5:
            raise DatasetError(f"checksum mismatch for {url}: md5 {actual}, expected {md5}; the file was not kept")
        os.replace(part, dest)
    except DatasetError:
        part.unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as e:  # URLError, IncompleteRead, timeouts, bad URLs
        part.unlink(missing_ok=True)
        raise DatasetError(f"download of {url} failed ({e}); nothing was written") from None
    if progress:
        print(f"downloaded {dest} ({dest.stat().st_size / 2**20:.1f} MB, md5 ok)")
    return dest


def download_dataset(name: str, root: str | Path, base_url: str | None = None) -> Path:
    """Fetch every file of ``name`` into ``root`` (skipping files already there). Returns the folder."""
    if name not in SOURCES:
        raise DatasetError(f"--download is available for {sorted(SOURCES)}, not {name!r}")
    url, files = SOURCES[name]
    url = base_url or url
    folder = Path(root).expanduser() / SUBFOLDER[name]
    for filename, md5 in files:
        dest = folder / filename
        if not dest.exists():
            download_file(url.rstrip("/") + "/" + filename, dest, md5)
    return folder
