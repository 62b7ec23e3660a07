"""scripts/same_numbers.py: the comparison that shows a refactoring left every number unchanged must see a change."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("same_numbers", REPO / "scripts" / "same_numbers.py")
same_numbers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(same_numbers)


def write_run(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_timings_are_left_out_and_a_changed_value_in_the_last_digit_is_reported(tmp_path):
    row = {"epoch": 1, "train_loss": 0.5170602066021773, "test_acc": 93.95, "epoch_seconds": 1.0,
           "images_per_s": 10.0, "scale/min": float("nan")}
    write_run(tmp_path / "a" / "sgd", [row])
    write_run(tmp_path / "b" / "sgd", [{**row, "epoch_seconds": 2.0, "images_per_s": 5.0}])
    write_run(tmp_path / "c" / "sgd", [{**row, "train_loss": 0.5170602066021774}])
    a, b, c = (same_numbers.metric_lines(tmp_path / k) for k in "abc")
    assert same_numbers.compare(a, b) == []  # timings differ, NaN equals NaN
    assert same_numbers.compare(a, c) == ["sgd line 1 train_loss: 0.5170602066021773 vs 0.5170602066021774"]
    assert same_numbers.final_losses(a) == {"sgd": {"epoch": 1, "train_loss": 0.5170602066021773, "test_loss": None,
                                                    "test_acc": 93.95}}


def test_a_missing_line_or_run_is_a_difference(tmp_path):
    write_run(tmp_path / "a" / "r", [{"epoch": 1}, {"epoch": 2}])
    write_run(tmp_path / "b" / "r", [{"epoch": 1}])
    write_run(tmp_path / "c" / "s", [{"epoch": 1}, {"epoch": 2}])
    a, b, c = (same_numbers.metric_lines(tmp_path / k) for k in "abc")
    assert same_numbers.compare(a, b) == ["r: 2 vs 1 metric lines"]
    assert same_numbers.compare(a, c) == ["run folders differ: ['r'] vs ['s']"]
