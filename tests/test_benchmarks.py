"""The GPU benchmarks run end to end as CPU rehearsals, so a device session never spends its minutes on a
script that crashes. Structure and bookkeeping only: timings are benchmarks' business, never a test's."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GLIBC

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script, *args):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_runs_per_gpu_rehearsal(tmp_path):
    out = run_benchmark("bench_runs_per_gpu.py", "--device", "cpu", "--runs", "1", "2", "--steps", "2",
                        "--warmup", "1", "--json", str(tmp_path / "runs.json"))
    result = json.loads((tmp_path / "runs.json").read_text())
    assert result["mode"] == "eager" and result["device"] == "cpu"
    assert [row["runs"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert len(row["per_run_images_per_s"]) == row["runs"] and all(v > 0 for v in row["per_run_images_per_s"])
        # the aggregate is images over the common span: never more than the runs' own rates added up
        assert 0 < row["aggregate_images_per_s"] <= sum(row["per_run_images_per_s"]) * (1 + 1e-9)
    assert "2 runs at once" in out


def test_step_benchmark_rehearsal(tmp_path):
    run_benchmark("bench_step.py", "--device", "cpu", "--batch", "4", "--repeats", "2", "--updates", "1",
                  "--memory-steps", "1", "--variants", "dense", "ours_masked", "ours_sparseopt",
                  "--json", str(tmp_path / "step.json"))
    result = json.loads((tmp_path / "step.json").read_text())
    variants = ["dense", "ours_masked", "ours_sparseopt"]
    assert sorted(result["median_step_s"]) == sorted(variants) and result["step_ratio_to_dense"]["dense"] == 1.0
    for name in variants:
        ratio = result["median_step_s"][name] / result["median_step_s"]["dense"]
        assert result["step_ratio_to_dense"][name] == pytest.approx(ratio, rel=1e-9)
        assert result["images_per_s"][name] == pytest.approx(4 / result["median_step_s"][name], rel=1e-9)
    assert sorted(result["topology_update_s"]) == ["ours_masked", "ours_sparseopt"]
    assert all(v > 0 for v in result["peak_memory_mb"].values())


def test_inference_benchmark_rehearsal(tmp_path):
    out = run_benchmark("bench_inference.py", "--models", "resnet20", "--sparsities", "0.98", "--batches", "2",
                        "--threads", "1", "--rounds", "1", "--json", str(tmp_path / "infer.json.gz"))
    record = json.loads(gzip.decompress((tmp_path / "infer.json.gz").read_bytes()))
    rows = record["rows"]
    assert [(r["structure"], r["batch"], r["threads"]) for r in rows] == [("unstructured", 2, 1), ("constant_fan_in", 2, 1)]
    for r in rows:
        assert r["max_abs_diff"] < 1e-5 and r["dense_ms"] > 0 and r["sparse_ms"] > 0
        assert len(r["layers"]) == 22  # every conv and the classifier of ResNet-20
    assert "| resnet20 | 0.98 | erk | constant_fan_in | 2 | 1 |" in out
    assert record["backend"]["path"] in ("avx512", "avx2", "portable", "torch")


def test_bench_train_rehearsal(tmp_path, native):
    """sparseopt bench-train: both sides, the amortised steps, the breakdown and the per-layer table."""
    from sparseopt.cli.main import main

    out = tmp_path / "train.json.gz"
    assert main(["bench-train", "--model", "mlp", "--mlp-hidden", "128", "--batch-size", "32", "--threads", "1",
                 "--steps", "2", "--rounds", "1", "--delta-t", "10", "--json", str(out)]) == 0
    r = json.loads(gzip.decompress(out.read_bytes()))
    assert r["masked_ms"] > 0 and r["sparse_ms"] > 0
    assert r["speedup"] == pytest.approx(r["masked_ms"] / r["sparse_ms"], rel=1e-2)
    for side in ("masked", "sparse"):
        b = r[f"{side}_breakdown"]
        # (delta_t - 2) plain steps and the update pair, over delta_t
        assert r[f"{side}_ms"] == pytest.approx((8 * b["plain_step_ms"] + b["update_pair_ms"]) / 10, rel=1e-3)
        assert set(b["parts_ms"]) == {"forward", "backward", "topology", "optimizer"}
        assert set(b["ops_ms"]) == {"convolution_and_linear", "batchnorm", "other"}
    assert 0 <= r["max_rel_loss_diff"] < 1e-3  # the same start and batches: rounding only
    assert [row["layer"] for row in r["layers"]] == ["1", "4"]
    assert {d["kernel"] for d in r["kernels"]["layers"].values()} == {"sparse"}
    assert r["reuse_memory"] is GLIBC  # both processes keep freed memory, as a CPU training run does
