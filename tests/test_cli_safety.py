"""The CLI never loses a user's data and never surprises them (issue 11): overwrite, locks, signals,
resume bookkeeping, one-line errors, flags, schedules, the README snippet."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sparseopt.cli.main import main
from sparseopt.runs import read_metrics
from sparseopt.train import records as records_mod
from sparseopt.train import trainer as trainer_mod
from sparseopt.train.run_folder import RunLock

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--epochs", "1", "--quiet", "--no-compare-optimizers", "--train-subset", "512"]


def results(out):
    return json.loads((Path(out) / "results.json").read_text())


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("keep me")
    assert main(["train", *QUICK, "--out", str(docs), "--overwrite"]) == 2
    assert "holds files that sparseopt did not write (notes.txt; no .sparseopt-run marker)" in capsys.readouterr().err
    assert (docs / "notes.txt").read_text() == "keep me" and sorted(p.name for p in docs.iterdir()) == ["notes.txt"]
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(run)]) == 0
    first = results(run)["seconds"]
    assert main(["train", *QUICK, "--out", str(run), "--overwrite", "--seed", "1"]) == 0  # its own run folder: replaced
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1 and results(run)["seconds"] != first


def test_a_users_own_config_and_logs_are_never_replaced_or_deleted(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my commented config\nsparsity: 0.5\n")
    for flag in ("--resume", "--overwrite", None):
        capsys.readouterr()
        assert main(["train", *QUICK, "--out", str(mine), *([flag] if flag else [])]) == 2
        assert "holds files that sparseopt did not write (config.yaml; no .sparseopt-run marker)" in capsys.readouterr().err
    assert (mine / "config.yaml").read_text() == "# my commented config\nsparsity: 0.5\n"
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"]  # no .lock, nothing else
    logs = tmp_path / "logs"
    (logs / "tensorboard").mkdir(parents=True)
    (logs / "tensorboard" / "events.out").write_text("my curves")
    assert main(["train", *QUICK, "--out", str(logs), "--overwrite"]) == 2
    assert (logs / "tensorboard" / "events.out").read_text() == "my curves"
    # a run writes its marker with its id; a replaced run gets a new id
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(run)]) == 0
    first = json.loads((run / ".sparseopt-run").read_text())["run_id"]
    assert main(["train", *QUICK, "--out", str(run), "--overwrite"]) == 0
    assert json.loads((run / ".sparseopt-run").read_text())["run_id"] != first


def test_a_locked_folder_refuses_a_second_run_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(run)]) == 0
    lock = RunLock(run).acquire()  # another process holds the folder
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert main(["train", *QUICK, "--out", str(run), *extra]) == 2
            assert f"run folder {run} is in use by a running sparseopt process (pid {os.getpid()}" in capsys.readouterr().err
    finally:
        lock.release()
    assert results(run)["status"] == "completed"  # untouched


def _start(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "sparseopt", "train", "--epochs", "30", "--quiet",
                             "--no-compare-optimizers", "--out", str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, timeout=120):
    start = time.time()
    while not path.exists():
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_cleanly_with_status_and_resume_hint(tmp_path, signum):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for(out / "checkpoint.pt")  # at least one epoch done
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, output
    assert "Traceback" not in output
    res = results(out)
    assert res["status"] == "interrupted" and res["epochs_completed"] >= 1
    assert f"resume with: sparseopt train --config {out / 'config.yaml'} --resume" in output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == res["epochs_completed"]  # the last complete epoch is kept
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines if "event" not in m] == list(range(1, ckpt["epoch"] + 1))


def test_resume_keeps_invocation_history_and_accumulates_time(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--epochs", "2", "--quiet", "--no-compare-optimizers", "--train-subset", "512", "--out", str(out)]
    real_save = records_mod.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(records_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    first = torch.load(out / "checkpoint.pt", weights_only=True)["seconds"]
    monkeypatch.setattr(records_mod, "save_checkpoint", real_save)
    with open(out / "metrics.jsonl", "a") as f:  # killed in the middle of the next epoch's append
        f.write('{"epoch": 2, "train_lo')
    assert [m["epoch"] for m in read_metrics(out)] == [1]  # the report reads what is whole
    assert main([*args, "--resume"]) == 0
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]
    (out / "metrics.jsonl").write_text('{"epoch": 1\n' + (out / "metrics.jsonl").read_text())
    with pytest.raises(ValueError, match="metrics.jsonl, line 1: not a JSON record"):
        read_metrics(out)  # damage before the last line is not a torn append: said, not skipped
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text().split("\n", 1)[1])
    assert main([*args, "--resume"]) == 0  # already finished: nothing to train, bookkeeping kept
    env = json.loads((out / "env.json").read_text())
    assert [i["resumed_from_epoch"] for i in env["invocations"]] == [0, 1, 2]
    assert "--resume" not in env["invocations"][0]["argv"] and env["invocations"][1]["argv"][-1] == "--resume"
    res = results(out)
    assert res["seconds"] > first > 0 and res["invocations"] == 3


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", *QUICK, "--out", str(out)]

    def killed(self, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    assert (out / "config.yaml").is_file() and not (out / "checkpoint.pt").exists()
    capsys.readouterr()
    assert main(args) == 0  # the same command starts it again (nothing to resume, nothing of the user's there)
    assert "stopped before its first checkpoint: starting it from scratch" in capsys.readouterr().out
    monkeypatch.setattr(trainer_mod.Trainer, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--overwrite"])
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert "stopped before its first checkpoint: starting it from scratch" in capsys.readouterr().out
    assert results(out)["status"] == "completed"
    assert main(["train", *QUICK, "--out", str(tmp_path / "never"), "--resume"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_divergence_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path, monkeypatch, capsys):
    real_setup = trainer_mod.Trainer.setup

    def setup(self):
        real_setup(self)
        self.criterion = lambda out, y: out.sum() * float("nan")

    monkeypatch.setattr(trainer_mod.Trainer, "setup", setup)
    assert main(["train", *QUICK, "--out", str(tmp_path / "nan")]) == 1
    err = capsys.readouterr().err
    assert "no epoch had finished, so there is no checkpoint to resume from" in err and "(epoch 0)" not in err


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["--out", "/proc/sparseopt-run"], "/proc/sparseopt-run"),  # a location nothing can be created in
    (lambda t: ["--out", str(t / "file" / "run")], "is a file, not a folder"),
    (lambda t: ["--config", str(t / "bad.yaml")], "is not valid YAML"),
    (lambda t: ["--device", "cuda:abc"], "device must be auto, cpu, cuda or cuda:<index>"),
    (lambda t: ["--delta-t-batch", "0"], "delta_t_batch must be >= 1 or none"),
])
def test_errors_are_one_line_with_exit_code_2_and_nothing_written(tmp_path, capsys, make_args, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.yaml").write_text("sparsity: [0.9\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", *QUICK, *make_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_any_other_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    from sparseopt.train import records

    monkeypatch.setattr(records, "atomic_write", full)
    assert main(["train", *QUICK, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: No space left on device: {tmp_path / 'run' / 'config.yaml'}\n"


def test_analyses_check_the_output_before_computing(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    import sparseopt.analysis.skew as skew

    monkeypatch.setattr(skew, "run_skew", lambda *a, **k: pytest.fail("computed before checking the output"))
    assert main(["skew", "--out", str(tmp_path / "file" / "skew")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "file" / "r")]) == 2


def test_abbreviated_flags_are_refused(tmp_path, capsys):
    assert main(["train", "--sparsi", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "unknown option '--sparsi' (did you mean '--sparsity'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--ou", str(tmp_path / "r")])


def test_help_shows_docs_defaults_and_choices_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sparsity FLOAT global sparsity S in [0, 1) over all masked weights (default: 0.9)" in text
    assert "{sgd, sparseopt, sparseopt_paper} (default: sparseopt)" in text
    assert "--prune-score NAME" in text and "{auto, magnitude, scaled, normalized}" in text
    assert main(["--version"]) == 0
    assert re.fullmatch(r"sparseopt \d+\.\d+\.\d+\n", capsys.readouterr().out)


def test_schedules_that_mean_nothing_are_warned_and_counted(tmp_path, capsys):
    out = tmp_path / "short"
    # 4 steps of 128 in all, 5 warmup epochs, delta_t 100: no warmup end, no topology update
    assert main(["train", "--epochs", "1", "--warmup-epochs", "5", "--train-subset", "512", "--quiet",
                 "--no-compare-optimizers", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "WARNING: warmup (20 steps) is at least as long as the run (4 steps)" in printed
    assert "WARNING: rigl never updates the topology: delta_t = 20 steps but updates stop at step t_end = 3" in printed
    res = results(out)
    assert res["topology_updates_planned"] == 0 and res["topology_updates"] == 0
    ok = tmp_path / "ok"
    assert main(["train", "--epochs", "2", "--train-subset", "1024", "--delta-t", "3", "--quiet",
                 "--no-compare-optimizers", "--out", str(ok)]) == 0
    assert "WARNING" not in capsys.readouterr().out
    res = results(ok)
    assert res["topology_updates_planned"] == res["topology_updates"] == 3  # t = 3, 6, 9 < t_end = 12


def test_readme_library_snippet_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    snippet = re.search(r"## Library in one screen.*?```python\n(.*?)```", text, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = proc.stdout
    assert "'density': 0.1" in stats and "itop" in stats


def test_batch_rescaled_delta_t_that_never_fires_is_warned(tmp_path, capsys, monkeypatch):
    # delta_t given at batch 4096 (the ImageNet recipe), run at batch 128: the default job's 20 becomes 640 steps
    assert main(["train", "--delta-t-batch", "4096", "--epochs", "1", "--train-subset", "1024", "--quiet",
                 "--no-compare-optimizers", "--out", str(tmp_path / "r")]) == 0
    assert "WARNING: rigl never updates the topology: delta_t = 640 steps" in capsys.readouterr().out
    from sparseopt.train.data import default_workers
    from sparseopt.train.distributed import DistEnv

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers(DistEnv(0, 2, 0)) == 7  # 16 CPUs over 2 local ranks, one left for the rank itself
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_workers(DistEnv()) == 1


def test_sweep_resumes_an_interrupted_run(tmp_path):
    from sparseopt.sweep.grid import run_state

    run = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(run)]) == 0
    res = results(run)
    (run / "results.json").write_text(json.dumps({**res, "status": "interrupted"}))
    assert run_state(run) == "resumable"  # the sweep runner resumes it from its checkpoint
    (run / "checkpoint.pt").unlink()
    assert run_state(run) == "new"  # interrupted before a checkpoint: started again (its own files are cleared)


def test_epoch_axes_have_integer_ticks_and_skew_reports_progress(tmp_path):
    from matplotlib.ticker import MaxNLocator

    from sparseopt.analysis.skew import mnist_inputs, run_skew
    from sparseopt.data import load_bundled_mnist
    from sparseopt.figures import epoch_axis, pyplot

    fig, ax = pyplot().subplots()
    ax.plot([1, 2, 3], [0.1, 0.2, 0.3])
    epoch_axis(ax)
    ticks = ax.get_xticks()
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator) and all(float(t).is_integer() for t in ticks)
    images, labels = load_bundled_mnist(True)
    calls = []
    run_skew(mnist_inputs(images[:512]), labels[:512], tmp_path, norms=("batchnorm",), sparsities=(0.5, 0.9), batches=2,
             inits=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]  # (2 sparsities + the per-neuron view) x 2 inits


def test_the_comparison_job_resumes_as_one_job_with_one_command(tmp_path, monkeypatch, capsys):
    import signal as signals

    from sparseopt.train import compare as compare_mod

    out = tmp_path / "cmp"
    args = ["train", "--compare-optimizers", "--epochs", "2", "--train-subset", "512", "--test-subset", "256", "--quiet",
            "--out", str(out)]
    real_epoch = trainer_mod.Trainer.train_epoch

    def ctrl_c_in_the_baseline(self, progress):
        metrics = real_epoch(self, progress)
        if self.cfg.optimizer == "sgd":
            self.stop.signum = signals.SIGINT  # Ctrl-C during the sgd half's first epoch
        return metrics

    monkeypatch.setattr(trainer_mod.Trainer, "train_epoch", ctrl_c_in_the_baseline)
    assert main(args) == 130
    monkeypatch.undo()
    said = capsys.readouterr().out
    assert f"resume the whole job with: sparseopt train {' '.join(args[1:])} --resume" in said
    assert not (out / "sparseopt").exists() and not (out / "comparison.json").exists()
    assert main([*args, "--resume"]) == 0  # the printed command: finishes the baseline, trains SparseOpt, compares
    assert json.loads((out / "sgd" / "results.json").read_text())["invocations"] == 2
    assert json.loads((out / "sparseopt" / "results.json").read_text())["status"] == "completed"
    assert (out / "comparison.json").is_file()
    # Ctrl-C while the comparison is written: one line, exit 130, and --resume writes it without training again
    (out / "comparison.json").unlink()
    monkeypatch.setattr(compare_mod, "plot_comparison", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 130
    said = capsys.readouterr()
    assert "stopped while writing the comparison; both runs are complete. Write it with:" in said.out
    assert "Traceback" not in said.out + said.err
    monkeypatch.undo()
    seconds = json.loads((out / "sgd" / "results.json").read_text())["seconds"]
    assert main([*args, "--resume"]) == 0
    assert "finished earlier, kept" in capsys.readouterr().out and (out / "comparison.json").is_file()
    assert json.loads((out / "sgd" / "results.json").read_text())["seconds"] == seconds  # not trained again


def test_a_full_disk_is_one_line_saying_where_and_how_much_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    import shutil as shutil_mod
    from collections import namedtuple

    from sparseopt import files as io_mod

    out = tmp_path / "run"
    args = ["train", "--epochs", "2", "--quiet", "--no-compare-optimizers", "--train-subset", "512", "--out", str(out)]
    real_save, saves = torch.save, []

    def save(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 2:  # the second epoch's checkpoint: the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/3: "
                               "file write failed")
        return real_save(obj, f, *a, **k)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io_mod.torch, "save", save)
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 200 << 10))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: disk full: the checkpoint {out / 'checkpoint.pt'} needs about ")
    assert "MB and 0.2 MB are free there; the previous checkpoint is kept. Free some space and run the same command with " \
           "--resume" in err[0]
    monkeypatch.setattr(io_mod.shutil, "disk_usage", shutil_mod.disk_usage)
    monkeypatch.setattr(io_mod.torch, "save", real_save)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # still resumable
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert main([*args, "--resume"]) == 0 and results(out)["status"] == "completed"


def test_a_malicious_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *QUICK, "--out", str(out)]
    assert main(args) == 0

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"format": "sparseopt-checkpoint-v1", "x": Payload()}, out / "checkpoint.pt")
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be loaded safely: it contains objects other than tensors and plain data (posix.system)" \
        in err[0] and "weights_only=False" not in err[0]
    assert not (tmp_path / "pwned").exists()


def test_a_torn_metrics_line_of_the_checkpointed_epoch_comes_back_on_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--epochs", "3", "--quiet", "--no-compare-optimizers", "--train-subset", "512", "--out", str(out)]
    real_save, saves = records_mod.save_checkpoint, []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after epoch 2's checkpoint

    monkeypatch.setattr(records_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    epoch2 = [json.loads(line) for line in lines if json.loads(line).get("epoch") == 2]
    (out / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # torn
    assert main([*args, "--resume"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "event" not in r] == [1, 2, 3]
    assert [r for r in records if r["epoch"] == 2] == epoch2  # restored from the checkpoint's copy, exactly


def test_extending_a_finished_run_is_refused_with_the_reason_and_the_way(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *QUICK, "--out", str(out)]
    assert main(args) == 0
    assert main([*args, "--resume", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{out} is a 1-epoch run: its learning rate follows a cosine to lr_min over 1 epoch and" in err
    assert "Train the longer run as its own: the same command with --epochs 3 and another --out (or --overwrite)" in err
    assert results(out)["status"] == "completed" and results(out)["epochs_completed"] == 1  # untouched


def test_key_value_options_take_yaml_lists_and_say_which_pair_is_wrong():
    """`--model-kwargs "in_shape=[1,28,28]"` was split at its commas into a YAML traceback."""
    from sparseopt.train.config import coerce

    assert coerce("model_kwargs", "hidden=[64,32] norm=none") == {"hidden": [64, 32], "norm": "none"}
    assert coerce("dst_kwargs", "a=1,b=[1,2], c={x: 1}") == {"a": 1, "b": [1, 2], "c": {"x": 1}}
    assert coerce("model_kwargs", ["hidden=[8,4]", "norm=none"]) == {"hidden": [8, 4], "norm": "none"}
    for bad, message in (("hidden=[32,16", "the value of 'hidden' is not valid YAML"),
                         ("oops", "takes key=value pairs, got 'oops'"), (5, "takes a mapping or key=value pairs")):
        with pytest.raises(ValueError, match=message):
            coerce("model_kwargs", bad)
    assert main(["train", "--model", "mlp", "--dataset", "bundled_mnist", "--model-kwargs", "in_shape=[1,28,28]"]) == 2
