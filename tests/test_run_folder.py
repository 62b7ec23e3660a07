"""Run folders: --overwrite only clears sparseopt's own files; one run per folder at a time."""

import multiprocessing
import os
import signal

import pytest

from sparseopt.train.run_folder import RunLock, clear_run_folder, foreign_entries, has_run_content


def _run_folder(path):
    path.mkdir(parents=True)
    for name in ("config.yaml", "env.json", "metrics.jsonl", "checkpoint.pt", "results.json", ".checkpoint.pt.x1.tmp"):
        (path / name).write_text("x")
    (path / "tensorboard").mkdir()
    (path / "tensorboard" / "events").write_text("x")
    return path


def test_overwrite_clears_only_a_run_folder(tmp_path):
    run = _run_folder(tmp_path / "run")
    assert foreign_entries(run) == []
    clear_run_folder(run)
    assert list(run.iterdir()) == []
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work")
    (docs / "config.yaml").write_text("x")
    with pytest.raises(ValueError, match=r"refuses to clear .*docs: it is not a sparseopt run folder \(it holds thesis.tex\)"):
        clear_run_folder(docs)
    assert (docs / "thesis.tex").read_text() == "years of work"  # nothing deleted
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        clear_run_folder(tmp_path / "file")


def test_compare_folder_is_a_run_folder_only_if_its_runs_are(tmp_path):
    top = tmp_path / "cmp"
    _run_folder(top / "sgd")
    _run_folder(top / "sparseopt")
    (top / "comparison.md").write_text("x")
    assert foreign_entries(top) == []
    (top / "sgd" / "notes.txt").write_text("mine")
    assert foreign_entries(top) == ["sgd/"]


def test_lock_file_alone_is_not_content(tmp_path):
    (tmp_path / ".lock").write_text("{}")
    assert not has_run_content(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}")
    assert has_run_content(tmp_path)


def _hold(folder, ready, done):
    RunLock(folder).acquire()
    ready.set()
    done.wait(30)


def test_lock_excludes_a_second_holder_and_dies_with_its_process(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, done))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(ValueError, match=rf"in use by another sparseopt run \(pid {holder.pid} on "):
        RunLock(tmp_path).acquire()
    os.kill(holder.pid, signal.SIGKILL)  # killed: no clean-up, the lock file stays behind
    holder.join(30)
    assert (tmp_path / ".lock").exists()
    lock = RunLock(tmp_path).acquire()  # a stale lock does not block
    lock.release()
    RunLock(tmp_path).acquire().release()  # released: free again
