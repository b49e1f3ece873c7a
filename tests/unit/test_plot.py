"""The loss plot's wall-clock panel marks each failure when it happened (checkfree.plot.failure_marks)."""

import json

import pytest

from checkfree.plot import failure_marks, plot_runs


def rows(times, first_step=0, **extra):
    return [
        {"step": first_step + k, "iteration": first_step + k, "loss/train": 5.0 - k / 10, "time/train_s": t, **extra}
        for k, t in enumerate(times)
    ]


def test_an_engine_failure_is_marked_at_its_training_time_and_the_stall_runs_to_the_next_commit():
    metrics = rows([1.0, 2.0, 3.0]) + [
        {"step": 3, "iteration": 4, "loss/train": 4.7, "time/train_s": 6.5}  # redone after the loss
    ]
    events = [{"event": "failure", "step": 3, "iteration": 3, "stage": 1, "time": 1e9, "train_s": 3.4}]
    assert failure_marks(metrics, events) == [(3.4, 6.5)]


def test_an_engine_run_without_train_s_marks_the_last_commit_before_the_failed_iteration():
    metrics = rows([1.0, 2.0, 3.0])
    metrics.append({"step": 3, "iteration": 5, "loss/train": 4.7, "time/train_s": 8.0})
    events = [
        {"event": "failure", "step": 3, "iteration": 3, "stage": 1, "time": 1e9},
        {"event": "failure", "step": 3, "iteration": 4, "stage": 2, "time": 1e9 + 1},  # lost again while redoing
    ]
    assert failure_marks(metrics, events) == [(3.0, 8.0), (3.0, 8.0)]


def test_a_swarm_failure_is_marked_at_the_kill_not_where_the_failed_step_was_committed_after_the_stall():
    t0 = 1_700_000_000.0
    metrics = [
        {"step": s, "epoch": 0, "loss/train": 5.0, "time/wall": t0 + w, "time/train_s": w}
        for s, w in enumerate([2.0, 2.5, 3.0])
    ]
    metrics.append({"step": 3, "epoch": 1, "loss/train": 4.9, "time/wall": t0 + 9.0, "time/train_s": 9.0})
    kill = {"event": "failure", "step": 3, "iteration": 3, "stage": 0, "peer": "s0-01.ab", "time": t0 + 3.2}
    [(at, resumed)] = failure_marks(metrics, [{"event": "epoch_published", "time": t0 + 5}, kill])
    assert at == pytest.approx(3.2) and resumed == pytest.approx(9.0)


def test_a_failure_after_the_last_commit_has_no_end_to_its_stall():
    events = [{"event": "failure", "step": 2, "iteration": 2, "stage": 0, "time": 1e9, "train_s": 2.5}]
    assert failure_marks(rows([1.0, 2.0]), events) == [(2.5, None)]


def test_plot_runs_writes_a_png_with_the_marks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = rows([1.0, 2.0, 3.0]) + [{"step": 3, "iteration": 4, "loss/train": 4.7, "time/train_s": 6.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    failure = {"event": "failure", "step": 3, "iteration": 3, "stage": 1, "time": 1e9, "train_s": 3.4}
    (run / "events.jsonl").write_text(json.dumps(failure) + "\n")
    out = plot_runs([run], tmp_path / "loss.png")
    assert out.stat().st_size > 10_000


def test_a_real_engine_run_marks_each_failure_inside_the_stall_it_caused(tmp_path):
    from checkfree.core.metrics import read_jsonl
    from checkfree.engine.trainer import Trainer
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path, "num_steps=6", "failures.mode=per_step", "failures.per_step_prob=0.3")
    Trainer(cfg).run()
    metrics, events = read_jsonl(cfg.run_dir / "metrics.jsonl"), read_jsonl(cfg.run_dir / "events.jsonl")
    failures = [e for e in events if e["event"] == "failure"]
    assert failures
    for e, (at, resumed) in zip(failures, failure_marks(metrics, events)):
        before = max((m["time/train_s"] for m in metrics if m["iteration"] < e["iteration"]), default=0.0)
        after = min(m["time/train_s"] for m in metrics if m["iteration"] > e["iteration"])
        assert before <= at < resumed == after
