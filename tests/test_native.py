"""The compiled kernels: equal to F.conv2d / F.linear on every SIMD path, built, cached and refused as promised.

Every test that needs the library asks for the ``native`` fixture: where no C compiler exists the test
is skipped with that reason (CI has one, so there the kernels are built and tested); the fallback
itself is tested by forcing it.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import random_conv_case, relative_error, simd_paths, use_simd_path
from torch import nn

import sparseopt
from sparseopt.cli.main import main
from sparseopt.deploy.fusion import fuse_epilogues
from sparseopt.models import build_model
from sparseopt.native import build, conv

TOLERANCE = 1e-5  # relative to the output's scale, fp32


SIMD_PATHS = simd_paths()


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_direct_conv_equals_conv2d_on_every_path(path, fresh_backend):
    backend = use_simd_path(fresh_backend, path)
    assert backend.path == path
    g = torch.Generator().manual_seed(build.PATHS.index(path))
    densities = [0.0, 1.0, 0.01, 0.05, 0.3] + [None] * 55
    for trial, density in enumerate(densities):
        weight, mask, x, bias, stride, pad = random_conv_case(g, density)
        if trial % 3 == 1:
            x = x.contiguous(memory_format=torch.channels_last)  # read through its strides
        k = weight.shape[-1]
        direct = conv.DirectWeight(weight * mask, mask)
        reference = F.conv2d(x, weight * mask, bias, stride, pad)
        residual = torch.randn(reference.shape, generator=g) if trial % 2 else None
        relu = trial % 4 < 2
        out_padding = (trial % 3, trial % 3)
        y = conv.conv2d(x, direct, bias if trial % 5 else None, (k, k), (stride, stride), (pad, pad),
                        residual=residual, relu=relu, out_padding=out_padding)
        expected = reference if trial % 5 else reference - bias.reshape(1, -1, 1, 1)
        expected = expected + residual if residual is not None else expected
        expected = expected.relu() if relu else expected
        assert y.shape == expected.shape
        assert relative_error(y, expected) <= TOLERANCE, (trial, tuple(weight.shape), tuple(x.shape), stride, pad)
        if out_padding != (0, 0):  # a view inside a zero border, the layout the next layer reads
            p = out_padding[0]
            base = torch.as_strided(y, (y.shape[0], y.shape[1], y.shape[2] + 2 * p, y.shape[3] + 2 * p),
                                    (y.stride(0), y.stride(1), y.stride(2), 1), y.storage_offset() - p * y.stride(2) - p)
            border = base.clone()
            border[:, :, p:-p, p:-p] = 0
            assert torch.count_nonzero(border) == 0
    features = torch.randn(5, 37, generator=g)
    for density in (0.0, 0.1, 1.0):
        weight = torch.randn(19, 37, generator=g)
        mask = torch.rand(19, 37, generator=g) < density
        for rows in (features[:1], features, features.reshape(5, 1, 37)):
            y = conv.linear(rows, conv.DirectWeight(weight * mask, mask), bias[:19] if len(bias) >= 19 else None)
            assert relative_error(y, F.linear(rows, weight * mask, bias[:19] if len(bias) >= 19 else None)) <= TOLERANCE


def test_no_read_past_the_input(native):
    """The last tile of a grid reads nothing past the grid: an input ending just before an unreadable page."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    region = mmap.mmap(-1, 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None)
    assert libc.mprotect(ctypes.c_void_p(base + page), page, 0) == 0  # PROT_NONE: any read there is a crash
    floats = torch.frombuffer(region, dtype=torch.float32, count=page // 4)
    g = torch.Generator().manual_seed(0)
    for c, hw in ((3, 7), (5, 5), (2, 1)):  # grids of 49, 25 and 1 pixels: tails of every width
        x = floats[-c * hw * hw:].view(1, c, hw, hw)
        x.copy_(torch.randn(x.shape, generator=g))
        weight = torch.randn(4, c, 1, 1, generator=g)
        mask = torch.ones_like(weight, dtype=torch.bool)
        y = conv.conv2d(x, conv.DirectWeight(weight, mask), None, (1, 1), (1, 1), (0, 0))
        assert relative_error(y, F.conv2d(x, weight)) <= TOLERANCE
    del x, floats


def test_a_padded_output_is_read_in_place_by_the_next_layer(native, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(8, 4, 3, 3, generator=g), torch.randn(6, 8, 3, 3, generator=g)
    m1, m2 = torch.rand(w1.shape, generator=g) < 0.3, torch.rand(w2.shape, generator=g) < 0.3
    x = torch.randn(2, 4, 9, 11, generator=g)
    y = conv.conv2d(x, conv.DirectWeight(w1 * m1, m1), None, (3, 3), (1, 1), (1, 1), relu=True, out_padding=(1, 1))
    packs = []
    monkeypatch.setattr(conv, "pack", lambda *a: packs.append(a) or pytest.fail("packed again"))
    z = conv.conv2d(y, conv.DirectWeight(w2 * m2, m2), None, (3, 3), (1, 1), (1, 1))
    expected = F.conv2d(F.conv2d(x, w1 * m1, None, 1, 1).relu(), w2 * m2, None, 1, 1)
    assert not packs and relative_error(z, expected) <= TOLERANCE


def _trained_like(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name, shape, batch", [("resnet20", (3, 32, 32), 3), ("resnet50", (3, 64, 64), 1),
                                                 ("mlp", (1, 28, 28), 5)])
def test_whole_models_on_the_direct_kernel_give_the_masked_outputs(native, name, shape, batch):
    torch.manual_seed(0)
    model = _trained_like(build_model(name, 10, in_shape=shape))
    masks = sparseopt.sparsify(model, 0.95)
    x = torch.randn(batch, *shape)
    with torch.inference_mode():
        reference = model(x)
    fast = sparseopt.sparse_inference(model, masks, x, choose="direct")
    report = fast.sparse_report
    assert {layer["kernel"] for layer in report["layers"].values()} == {"direct"}
    with torch.inference_mode():
        assert relative_error(fast(x), reference) <= TOLERANCE
        other = torch.randn(batch + 1, *shape)  # another batch size: the offsets are per geometry, the result exact
        assert relative_error(fast(other), model(other)) <= TOLERANCE
    assert report["backend"]["path"] == native.path
    memory = report["weight_memory"]
    assert 0 < memory["ratio"] <= 0.15, memory  # values + positions at 95%
    if name != "mlp":
        fused = report["fusion"]["fused"]
        assert all("relu" in what for layer, what in fused.items() if layer != "maxpool")
        assert fused.get("maxpool") == (["native max pool"] if name == "resnet50" else None)
        assert sum("residual" in what for what in fused.values()) == (9 if name == "resnet20" else 16)
        if name == "resnet20":  # every block's conv1 writes the zero border its conv2 reads
            assert all("out_padding=1" in fused[f"layer{s}.{b}.conv1"] for s in (1, 2, 3) for b in range(3))


def test_two_threads_run_one_model_at_once(native):
    import threading

    torch.manual_seed(0)
    model = _trained_like(build_model("resnet20", 10))
    masks = sparseopt.sparsify(model, 0.95)
    inputs = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]  # two shapes: two plans per layer, too
    fast = sparseopt.sparse_inference(model, masks, inputs[0], choose="direct")
    with torch.inference_mode():
        references = [model(x) for x in inputs]
    errors = []

    def serve(i):
        with torch.inference_mode():
            for _ in range(15):
                errors.append(relative_error(fast(inputs[i]), references[i]))

    workers = [threading.Thread(target=serve, args=(i,)) for i in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(errors) == 30 and max(errors) <= TOLERANCE


def test_a_user_model_fx_cannot_trace_runs_unfused(native):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                y = y * 2
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    model = Branchy().eval()
    masks = sparseopt.sparsify(model, 0.8)
    x = torch.randn(2, 3, 12, 12)
    fast = sparseopt.sparse_inference(model, masks, x, choose="direct")
    assert fast.sparse_report["fusion"]["fused"] == {}
    assert "torch.fx cannot trace" in fast.sparse_report["fusion"]["note"]
    with torch.inference_mode():
        assert relative_error(fast(x), model(x)) <= TOLERANCE


def test_fusion_keeps_a_layer_used_twice_and_a_shared_output_apart(native):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            a = self.conv(x)
            return torch.relu(self.conv(torch.relu(a))) + a  # `conv` at two places; `a` read twice

    torch.manual_seed(0)
    model = Shared().eval()
    masks = sparseopt.sparsify(model, 0.5)
    x = torch.randn(1, 4, 6, 6)
    fast = sparseopt.sparse_inference(model, masks, x, choose="direct")
    assert fast.sparse_report["fusion"]["fused"] == {}
    with torch.inference_mode():
        assert relative_error(fast(x), model(x)) <= TOLERANCE
    assert fuse_epilogues(nn.Sequential(nn.Linear(2, 2)))[1]["note"] == "no layer runs the direct kernel"


def test_native_max_pool_equals_torchs(native):
    g = torch.Generator().manual_seed(0)
    for k, s, p in [(3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2), (1, 1, 0), (3, 2, 0)]:
        x = torch.randn(2, 5, 13, 11, generator=g)
        x[0, 1, 4, 4] = float("nan")  # NaN wins, as in torch
        for layout in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(conv.max_pool2d(layout, (k, k), (s, s), (p, p)).nan_to_num(nan=7.0),
                               F.max_pool2d(x, k, s, p).nan_to_num(nan=7.0)), (k, s, p)


def test_the_kernels_refuse_what_they_cannot_read(native):
    weight = torch.randn(4, 3, 3, 3)
    direct = conv.DirectWeight(weight, torch.ones_like(weight, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"takes 4-D float32 CPU tensors, got torch.float64 of shape \(1, 3, 8, 8\)"):
        conv.conv2d(torch.randn(1, 3, 8, 8, dtype=torch.float64), direct, None, (3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="takes 4-D float32 CPU tensors"):
        conv.conv2d(torch.randn(3, 8, 8), direct, None, (3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="float32 CPU tensors, got torch.float16"):
        conv.linear(torch.randn(2, 27).half(), conv.DirectWeight(weight.reshape(4, 27), torch.ones(4, 27, dtype=torch.bool)), None)


def test_half_precision_is_one_clear_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).half()
    masks = sparseopt.sparsify(model, 0.5)
    with pytest.raises(ValueError, match=r"takes float32 models; this one has float16 weights: convert it with "
                                         r"model.float\(\) first"):
        sparseopt.sparse_inference(model, masks, torch.randn(1, 3, 8, 8).half())


def test_forced_fallback_uses_torchs_kernels(fresh_backend, tmp_path):
    fresh_backend.setenv("SPARSEOPT_NATIVE", "0")
    assert not conv.available() and build.backend().path == "torch"
    torch.manual_seed(0)
    model = _trained_like(build_model("resnet20", 10))
    masks = sparseopt.sparsify(model, 0.95)
    x = torch.randn(2, 3, 32, 32)
    fast = sparseopt.sparse_inference(model, masks, x, choose="csr")
    assert fast.sparse_report["backend"]["path"] == "torch"
    assert all("direct" not in layer["ms"] for layer in sparseopt.sparse_inference(model, masks, x).sparse_report[
        "layers"].values())
    with torch.inference_mode():
        assert relative_error(fast(x), model(x)) <= TOLERANCE


def test_no_compiler_is_one_warning_and_torchs_kernels(fresh_backend, tmp_path):
    fresh_backend.setenv("CC", str(tmp_path / "no-such-cc"))
    fresh_backend.setenv("SPARSEOPT_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend, lib = build.load()
    assert lib is None and backend.path == "torch"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no C compiler found" in messages[0] and "\n" not in messages[0]


def test_a_failing_build_is_one_warning(fresh_backend, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'fakecc 1.0'; exit 0; fi\n"
                    "echo 'sparse_conv.c:1:1: error: this compiler is broken' >&2; exit 1\n")
    fake.chmod(0o755)
    fresh_backend.setenv("CC", str(fake))
    fresh_backend.setenv("SPARSEOPT_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend, lib = build.load()
    assert lib is None and backend.path == "torch"
    assert len(caught) == 1 and "error: this compiler is broken" in str(caught[0].message)


def test_the_cache_is_reused_and_a_broken_entry_rebuilt(fresh_backend, tmp_path):
    fresh_backend.setenv("SPARSEOPT_CACHE", str(tmp_path))
    first, lib = build.load(warn=False)
    if lib is None:
        pytest.skip(f"compiled kernels unavailable here: {first.reason}")
    assert first.built_now and first.build_seconds > 0
    record = json.loads((tmp_path / first.cache_dir.split("/")[-1] / "build.json").read_text())
    assert record["cpu"]["model"] == first.cpu["model"] and record["torch"] == torch.__version__
    build.reset()
    second, _ = build.load(warn=False)
    assert not second.built_now and second.cache_dir == first.cache_dir  # cached
    library = tmp_path / first.cache_dir.split("/")[-1] / first.library.split("/")[-1]
    truncated = library.with_suffix(".part")  # as another process's interrupted copy would leave it
    truncated.write_bytes(library.read_bytes()[:1000])
    truncated.replace(library)
    build.reset()
    third, lib = build.load(warn=False)
    assert third.built_now and lib is not None and third.library != first.library and not library.exists()
    record = json.loads((library.parent / "build.json").read_text())
    record["key"] = "built-for-another-cpu"  # a folder whose record names another key is never trusted
    (library.parent / "build.json").write_text(json.dumps(record))
    build.reset()
    assert build.load(warn=False)[0].built_now


def test_the_cache_key_names_cpu_compiler_and_torch(monkeypatch):
    cpu = build.cpu_info()
    key = build._key("/usr/bin/cc", "cc 12", cpu)
    assert key != build._key("/usr/bin/cc", "cc 13", cpu)
    assert key != build._key("/usr/bin/cc", "cc 12", {**cpu, "flags_hash": "0" * 16})
    assert key != build._key("/usr/bin/cc", "cc 12", {**cpu, "model": "another CPU"})
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert key != build._key("/usr/bin/cc", "cc 12", cpu)


def test_kernels_command(native, capsys):
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    assert f"path:     {native.path}" in out and "cache:" in out and "compiler:" in out and "build:" in out
    assert main(["kernels", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["path"] == native.path and record["cache_dir"] == native.cache_dir


def test_kernels_command_when_switched_off(fresh_backend, capsys):
    fresh_backend.setenv("SPARSEOPT_NATIVE", "0")
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    assert "path:     torch" in out and "SPARSEOPT_NATIVE=0" in out
