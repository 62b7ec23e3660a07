"""Compact export, loading and sparse CPU inference: equal outputs, file contents, refusals, per-layer kernels."""

import importlib.util
import io
import json
import pickle
import sys

import pytest
import torch
from conftest import GLIBC, data_path
from torch import nn

import sparseopt
from sparseopt.cli.main import main
from sparseopt.deploy.encoding import decode, decode_gaps, encode, encode_gaps, pack, unpack
from sparseopt.deploy.export import read_sparse
from sparseopt.models import build_model


def _trained_like(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, as after training (folding must carry them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def cifar_batch():
    from sparseopt.data import DATASETS
    from sparseopt.data.cifar import load_cifar

    images, _ = load_cifar(data_path("cifar-10-python.tar.gz").parent, "cifar10", train=False)
    info = DATASETS["cifar10"]
    x = images[:8].float() / 255
    return (x - torch.tensor(info.mean).reshape(1, 3, 1, 1)) / torch.tensor(info.std).reshape(1, 3, 1, 1)


@pytest.mark.parametrize("encoding_density", [0.001, 0.02, 0.2, 0.5])
def test_encodings_round_trip_and_the_smallest_is_chosen(encoding_density):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, 3, 3, generator=g)
    mask = torch.rand(weight.shape, generator=g) < encoding_density
    mask[3] = False  # a neuron with no input
    entry = encode(weight, mask)
    restored, restored_mask = decode(entry, tuple(weight.shape))
    assert torch.equal(restored_mask, mask) and torch.equal(restored, weight * mask)
    assert entry["encoding"] == ("bitmap" if encoding_density > 0.125 else "gaps")  # 1 bit a weight vs ~1 byte an active one
    codes = encode_gaps(torch.tensor([False] * 600 + [True] + [False] * 255 + [True]))  # gaps of 600 and 255
    assert codes.tolist() == [255, 255, 90, 255, 0]
    assert torch.equal(decode_gaps(codes, 857).nonzero().reshape(-1), torch.tensor([600, 856]))


def test_rows_encoding_for_narrow_layers_and_damage_is_refused():
    wide = torch.zeros(2, 40000, dtype=torch.bool)
    wide[:, :3] = True  # far apart: 156 escape bytes as gaps, 32 bytes as int32 columns + counts
    entry = encode(torch.arange(80000.0).reshape(2, 40000), wide)
    assert entry["encoding"] == "rows" and entry["columns"].dtype == torch.int32
    assert torch.equal(decode(entry, (2, 40000))[1], wide)
    rows = {"encoding": "rows", "values": torch.ones(3), "counts": torch.tensor([2, 1], dtype=torch.uint8),
            "columns": torch.tensor([0, 5, 9], dtype=torch.uint8)}
    with pytest.raises(ValueError, match="does not fit a weight of shape"):
        decode(rows, (2, 8))
    blobs, table = pack({"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.uint8)})
    assert unpack(blobs, table)["b"].shape == (2, 2)
    table[0][2] = 7
    with pytest.raises(ValueError, match="offset 7 \\+ 3 runs past the 3 stored float32 values"):
        unpack(blobs, table)


def _round_trip(model, masks, x, tmp_path, fresh=None, **meta):
    model.eval()
    with torch.no_grad():
        reference = model(x)
    path = tmp_path / "model.sparse.pt"
    summary = sparseopt.export_sparse(model, masks, path, **meta)
    restored = sparseopt.load_sparse(path, inference=False, model=fresh and fresh())
    fast = sparseopt.load_sparse(path, example_input=x, choose="csr", model=fresh and fresh())
    with torch.no_grad():
        assert (restored(x) - reference).abs().max() < 1e-5
        assert (fast(x) - reference).abs().max() < 1e-5
    return summary, fast


def test_resnet20_round_trip_on_a_real_batch(cifar_batch, tmp_path):
    torch.manual_seed(0)
    model = _trained_like(build_model("resnet20", 10))
    masks = sparseopt.sparsify(model, 0.95)
    summary, fast = _round_trip(model, masks, cifar_batch, tmp_path, model_name="resnet20", num_classes=10,
                                input_shape=(3, 32, 32), class_names=[str(i) for i in range(10)])
    assert summary["ratio"] <= 0.10
    assert fast.sparseopt_meta["class_names"][3] == "3" and len(fast.sparse_report["folded"]) == 21  # every BN
    kernels = {layer["kernel"] for layer in fast.sparse_report["layers"].values()}
    assert kernels == {"csr"}


def test_resnet50_round_trip(cifar_batch, tmp_path):
    torch.manual_seed(0)
    model = _trained_like(build_model("resnet50", 10))
    masks = sparseopt.sparsify(model, 0.95)
    x = nn.functional.interpolate(cifar_batch[:2], size=64, mode="bilinear")  # a real batch at a size the CPU test affords
    _round_trip(model, masks, x, tmp_path, model_name="resnet50", num_classes=10, input_shape=(3, 64, 64))


def test_mlp_and_a_user_model_round_trip(tmp_path):
    from sparseopt.data import load_bundled_mnist

    images, _ = load_bundled_mnist(False)
    x = (images[:16].float() / 255 - 0.1307) / 0.3081  # a real batch: the bundled MNIST subset
    torch.manual_seed(0)
    mlp = _trained_like(build_model("mlp", 10, in_shape=(1, 28, 28), hidden=[64, 32]))
    _round_trip(mlp, sparseopt.sparsify(mlp, 0.9), x, tmp_path, model_name="mlp", num_classes=10,
                model_kwargs={"hidden": [64, 32], "in_features": 784}, input_shape=(1, 28, 28))

    def user_model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model = _trained_like(user_model())
    masks = sparseopt.sparsify(model, 0.8)
    summary, fast = _round_trip(model, masks, x[:4], tmp_path, fresh=user_model)
    assert fast.sparse_report["kept_dense"] == ["3"]  # the grouped conv runs dense, and says why
    assert fast.sparse_report["kept_dense_reasons"]["3"].startswith("grouped convolution (groups=2)")
    with pytest.raises(ValueError, match=r"not registered \(Sequential\); pass it: load_sparse\(path, model=Sequential"):
        sparseopt.load_sparse(tmp_path / "model.sparse.pt")


def test_kernels_and_the_per_layer_choice(tmp_path):
    torch.manual_seed(0)
    model = _trained_like(build_model("resnet20", 10))
    masks = sparseopt.sparsify(model, 0.9, structure="constant_fan_in")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.eval()(x)
    for kernel in ("dense", "csr", "condensed"):
        fast = sparseopt.sparse_inference(model, masks, x, choose=kernel)
        assert {layer["kernel"] for layer in fast.sparse_report["layers"].values()} == {kernel}
        assert (fast(x) - reference).abs().max() < 1e-5
    timed = sparseopt.sparse_inference(model, masks, x)
    report = timed.sparse_report
    whole = report["whole_model_ms"]
    assert set(whole) == {"sparse", "sparse_channels_last", "dense", "dense_channels_last"}
    fastest = min(whole, key=whole.get)
    assert report["layout"] == ("channels_last" if fastest.endswith("channels_last") else "contiguous")
    compiled = {"direct"} if sparseopt.native.load()[1] is not None else set()
    for name, layer in report["layers"].items():
        assert set(layer["ms"]) == {"dense", "csr", "condensed"} | compiled
        # the fastest kernel of each layer, dense included; all dense when the dense model won as a whole
        expected = "dense" if fastest.startswith("dense") else min(layer["ms"], key=layer["ms"].get)
        assert layer["kernel"] == expected, name
    assert (timed(x) - reference).abs().max() < 1e-5
    assert model.training is False and all(m.weight_mask is not None for m in (model.conv1,))  # original untouched
    with pytest.raises(ValueError, match="unknown choose='fast'"):
        sparseopt.sparse_inference(model, masks, x, choose="fast")


def test_a_fold_that_would_change_the_output_is_refused():
    class Tap(nn.Module):  # the conv output feeds the BatchNorm *and* the residual: folding would be wrong
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    torch.manual_seed(0)
    model = _trained_like(Tap())
    masks = sparseopt.sparsify(model, 0.5)
    with pytest.raises(RuntimeError, match="sparse_inference changed the model's output"):
        sparseopt.sparse_inference(model, masks, torch.randn(2, 4, 6, 6), choose="csr")


def test_damaged_foreign_and_malicious_files_get_one_clear_error(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    masks = sparseopt.sparsify(model, 0.9)
    good = tmp_path / "good.pt"
    sparseopt.export_sparse(model, masks, good, model_name="resnet20", num_classes=10, input_shape=(3, 32, 32))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.pt is not a sparseopt sparse export, or it is damaged"):
        read_sparse(cut)
    foreign = tmp_path / "state.pt"
    torch.save(model.state_dict(), foreign)
    with pytest.raises(ValueError, match="is not a sparseopt sparse export \\(format None"):
        read_sparse(foreign)

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('ran')",))

    evil = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"format": "sparseopt-sparse-v1", "header": Boom()}, buffer, pickle_protocol=2)
    evil.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="objects other than tensors and plain data .* never unpickled"):
        read_sparse(evil)
    assert not (tmp_path / "pwned").exists()
    state = torch.load(good, weights_only=True)
    state["header"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    torch.save(state, tmp_path / "bad_header.pt")
    with pytest.raises(ValueError, match="is damaged: its header cannot be read"):
        read_sparse(tmp_path / "bad_header.pt")
    other = tmp_path / "other.pt"
    small = build_model("resnet20", 100)
    sparseopt.export_sparse(small, sparseopt.sparsify(small, 0.9), other, model_name="resnet20", num_classes=100,
                            input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"layer 'fc' has shape \(100, 64\) in the file, \(10, 64\) in the model"):
        sparseopt.load_sparse(other, model=build_model("resnet20", 10))
    assert pickle  # the module is imported for the reduce protocol above


def test_safetensors_file_has_the_same_contents_size_and_errors(cifar_batch, tmp_path, monkeypatch):
    pytest.importorskip("safetensors", reason="the safetensors format needs pip install 'sparseopt[safetensors]'")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _trained_like(build_model("resnet20", 10))
    masks = sparseopt.sparsify(model, 0.95)
    meta = {"model_name": "resnet20", "num_classes": 10, "input_shape": (3, 32, 32)}
    pt = sparseopt.export_sparse(model, masks, tmp_path / "m.pt", **meta)
    st = sparseopt.export_sparse(model, masks, tmp_path / "m.safetensors", **meta, format="safetensors")
    assert st["format"] == "safetensors" and st["bytes"] == (tmp_path / "m.safetensors").stat().st_size
    assert abs(st["bytes"] - pt["bytes"]) / pt["bytes"] < 0.02  # the same blobs; headers of about the same size
    a, b = read_sparse(tmp_path / "m.pt"), read_sparse(tmp_path / "m.safetensors")
    assert a["meta"] == b["meta"] and a["layers"] == b["layers"]
    assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    x = cifar_batch[:4]
    with torch.no_grad():
        reference = model.eval()(x)
        assert (sparseopt.load_sparse(tmp_path / "m.safetensors", inference=False)(x) - reference).abs().max() < 1e-5
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors is a damaged safetensors file"):
        read_sparse(tmp_path / "cut.safetensors")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="is a safetensors file but not a sparseopt sparse export"):
        read_sparse(tmp_path / "foreign.safetensors")
    (tmp_path / "noise.bin").write_bytes(b"\x07" * 64)
    with pytest.raises(ValueError, match="neither a torch.save container nor a safetensors file"):
        read_sparse(tmp_path / "noise.bin")
    with pytest.raises(ValueError, match="format must be one of \\['pt', 'safetensors'\\], got 'onnx'"):
        sparseopt.export_sparse(model, masks, tmp_path / "m.onnx", format="onnx")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # the extra not installed: one line
    with pytest.raises(ImportError, match="pip install 'sparseopt\\[safetensors\\]'"):
        read_sparse(tmp_path / "m.safetensors")


@pytest.mark.parametrize("sparsity, bound", [(0.95, 0.10), (0.98, 0.05)])
@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_size_targets(name, sparsity, bound, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, 10 if name == "resnet20" else 1000)
    summary = sparseopt.export_sparse(model, sparseopt.sparsify(model, sparsity), tmp_path / "m.pt", model_name=name)
    assert summary["ratio"] <= bound
    assert summary["bytes"] == (tmp_path / "m.pt").stat().st_size


def test_export_and_bench_commands_on_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "bundled_mnist", "--model", "mlp", "--epochs", "1", "--train-subset", "512",
                 "--test-subset", "200", "--delta-t", "2", "--structure", "constant_fan_in", "--out", str(run),
                 "--quiet", "--no-compare-optimizers"]) == 0
    assert main(["export", str(run)]) == 0
    assert "x the dense state_dict" in capsys.readouterr().out
    model = sparseopt.load_sparse(run / "model.sparse.pt")
    assert model.sparseopt_meta["class_names"] == [str(i) for i in range(10)]
    assert model.sparseopt_meta["normalization"] == {"mean": [0.1307], "std": [0.3081]}
    assert model.sparseopt_meta["structure"]["kind"] == "constant_fan_in"
    if importlib.util.find_spec("safetensors") is not None:
        assert main(["export", str(run), "--format", "safetensors"]) == 0
        st = sparseopt.load_sparse(run / "model.sparse.safetensors")
        assert st.sparseopt_meta == model.sparseopt_meta
    out = tmp_path / "bench.json"
    assert main(["bench-infer", "--run", str(run), "--batch-size", "4", "--threads", "1", "--rounds", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"dense_ms", "sparse_ms", "speedup", "max_abs_diff", "layers", "backend", "weight_memory"} <= set(result)
    assert result["backend"]["path"] == sparseopt.native.backend().path
    assert "compiled kernels: " in capsys.readouterr().out
    assert result["max_abs_diff"] < 1e-5 and result["batch_size"] == 4 and result["threads"] == 1
    assert result["reuse_memory"] is GLIBC  # both sides, as a serving process that calls reuse_freed_memory()
    assert main(["bench-infer", "--model", "resnet20", "--structure", "nm", "--nm", "2:4", "--sparsity", "0.5",
                 "--rounds", "1"]) == 2  # conv1's 27 inputs cannot be 2:4
    assert "not a multiple of M=4" in capsys.readouterr().err
