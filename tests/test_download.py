"""--download against a small HTTP server on loopback: success, checksum mismatch, interrupted transfer."""

import hashlib
import http.server
import threading

import pytest
from conftest import write_cifar_archive

from sparseopt.data import download as dl
from sparseopt.data import load_cifar
from sparseopt.data.errors import DatasetError


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        body = self.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if self.path.startswith("/broken/"):
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection drops
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_success_then_loadable(tmp_path, server, monkeypatch):
    archive = write_cifar_archive(tmp_path / "src", "cifar10", n_train=20, n_test=10)
    body = archive.read_bytes()
    Handler.files = {archive.name: body}
    monkeypatch.setitem(dl.SOURCES, "cifar10", ("unused", [(archive.name, hashlib.md5(body).hexdigest())]))
    dest = tmp_path / "data"
    dl.download_dataset("cifar10", dest, base_url=server + "/ok/")
    assert _leftovers(dest) == [archive.name]
    x, y = load_cifar(dest, "cifar10", train=True)
    assert x.shape == (20, 3, 32, 32)
    dl.download_dataset("cifar10", dest, base_url=server + "/missing/")  # already there: not fetched again


def test_checksum_mismatch_leaves_nothing(tmp_path, server, monkeypatch):
    Handler.files = {"cifar-10-python.tar.gz": b"not the archive"}
    monkeypatch.setitem(dl.SOURCES, "cifar10", ("unused", [("cifar-10-python.tar.gz", "0" * 32)]))
    with pytest.raises(DatasetError, match="checksum mismatch.*expected 0000"):
        dl.download_dataset("cifar10", tmp_path, base_url=server + "/ok/")
    assert _leftovers(tmp_path) == []


def test_interrupted_transfer_leaves_nothing(tmp_path, server, monkeypatch):
    body = bytes(range(256)) * 400
    Handler.files = {"train-images-idx3-ubyte.gz": body}
    monkeypatch.setitem(dl.SOURCES, "mnist", ("unused", [("train-images-idx3-ubyte.gz", hashlib.md5(body).hexdigest())]))
    with pytest.raises(DatasetError, match="interrupted|failed"):
        dl.download_dataset("mnist", tmp_path, base_url=server + "/broken/")
    assert _leftovers(tmp_path / "mnist") == []


def test_unreachable_server_and_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match="failed.*nothing was written"):
        dl.download_file("http://127.0.0.1:9/x.gz", tmp_path / "x.gz", "0" * 32, timeout=2)
    with pytest.raises(DatasetError, match="--download is available for"):
        dl.download_dataset("imagenet", tmp_path)


def test_cli_download_then_train(tmp_path, server, monkeypatch):
    from sparseopt.cli.main import main

    archive = write_cifar_archive(tmp_path / "src", "cifar10", n_train=40, n_test=20)
    body = archive.read_bytes()
    Handler.files = {archive.name: body}
    monkeypatch.setitem(dl.SOURCES, "cifar10", (server + "/ok/", [(archive.name, hashlib.md5(body).hexdigest())]))
    data, out = tmp_path / "data", tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--model", "resnet20", "--download", "--data-dir", str(data),
                 "--epochs", "1", "--batch-size", "20", "--quiet", "--no-compare-optimizers", "--out", str(out)]) == 0
    assert (data / archive.name).is_file() and (out / "results.json").is_file()
