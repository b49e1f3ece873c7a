"""checkfree.analysis.runs and tables: one reader of both executors' metrics, one table writer."""

import json

import pytest

from checkfree.analysis import runs
from checkfree.analysis.tables import markdown_table

ENGINE = [
    {"step": 0, "iteration": 0, "loss/train": 3.0, "time/train_s": 1.0},
    {"step": 1, "iteration": 2, "loss/val": 2.5, "time/train_s": 2.5},
    {"step": 3, "iteration": 4, "loss/val": 2.1, "time/train_s": 4.0},
    {"step": 5, "iteration": 6, "loss/val": float("nan"), "time/train_s": 6.0},
]
SWARM = [  # merged by the launcher: time/train_s counts from the launch (here 90.0), time/wall is unix time
    {"step": 0, "iteration": 0, "epoch": 1, "loss/val": 2.8, "time/wall": 101.0, "time/step_s": 1.0},
    {"step": 1, "iteration": 2, "epoch": 2, "loss/val": 2.4, "time/wall": 103.0, "time/step_s": 2.0},
]
SWARM = [{**r, "time/train_s": r["time/wall"] - 90.0} for r in SWARM]
OLD_SWARM = [{k: v for k, v in r.items() if k != "iteration"} for r in SWARM]  # before the swarm logged iterations


def test_engine_curve_carries_train_seconds_and_iterations():
    curve = runs.val_curve(ENGINE)
    assert curve == [runs.Point(2, 2.5, 2.5, 3), runs.Point(4, 2.1, 4.0, 5)]  # the NaN row is skipped
    assert runs.val_curve(ENGINE, times=[0.0, 9.0, 10.0, 11.0])[0].seconds == 9.0


def test_swarm_curve_counts_seconds_from_the_first_step_and_carries_iterations():
    assert runs.val_curve(SWARM) == [runs.Point(1, 2.8, 1.0, 1), runs.Point(2, 2.4, 3.0, 3)]


def test_a_swarm_run_from_before_iterations_were_logged_has_none():
    assert runs.val_curve(OLD_SWARM) == [runs.Point(1, 2.8, 1.0, None), runs.Point(2, 2.4, 3.0, None)]


def test_steps_to_target_is_the_first_point_at_or_below_it():
    curve = runs.val_curve(ENGINE)
    assert runs.steps_to_target(curve, 2.5) == runs.Point(2, 2.5, 2.5, 3)
    assert runs.steps_to_target(curve, 2.2).steps == 4
    assert runs.steps_to_target(curve, 2.0) is None
    assert runs.steps_to_target([(2, 1.5), (4, 1.7), (6, 1.4)], 1.5) == (2, 1.5)  # plain (steps, loss) tuples


def test_run_to_target_reads_a_run_directory(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ENGINE[:3]))
    assert runs.run_to_target(tmp_path, 2.2) == runs.Point(4, 2.1, 4.0, 5)
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        runs.read_metrics(tmp_path / "nope")


def test_markdown_table_is_a_github_pipe_table():
    text = markdown_table(["a", "b"], [["1.0", "x"]])
    assert text.splitlines()[0].startswith("| a") and text.splitlines()[1].startswith("|--")
    assert "1.0" in text and text.endswith("\n")
