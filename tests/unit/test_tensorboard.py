"""metrics.tensorboard=true: every numeric metric of metrics.jsonl also lands in TensorBoard, at its step."""

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checkfree.core.metrics import MetricLogger, read_jsonl
from checkfree.engine.trainer import Trainer
from tests.helpers import tiny_config


def test_engine_writes_its_metrics_to_tensorboard(tmp_path):
    cfg = tiny_config(tmp_path, "num_steps=4", "eval_every_steps=2", "metrics.tensorboard=true")
    Trainer(cfg).run()
    acc = EventAccumulator(str(cfg.run_dir / "tensorboard"))
    acc.Reload()
    jsonl = read_jsonl(cfg.run_dir / "metrics.jsonl")
    train = acc.Scalars("loss/train")
    assert [e.step for e in train] == [0, 1, 2, 3]
    assert [e.value for e in train] == pytest.approx([m["loss/train"] for m in jsonl], rel=1e-6)
    assert [e.step for e in acc.Scalars("loss/val")] == [1, 3]
    assert "stage/3/grad_norm_raw" in acc.Tags()["scalars"]


def test_engine_failures_and_recoveries_land_in_tensorboard_at_their_steps(tmp_path):
    cfg = tiny_config(
        tmp_path, "num_steps=6", "failures.mode=per_step", "failures.per_step_prob=0.3", "metrics.tensorboard=true"
    )
    summary = Trainer(cfg).run()
    acc = EventAccumulator(str(cfg.run_dir / "tensorboard"))
    acc.Reload()
    failures = [e for e in read_jsonl(cfg.run_dir / "events.jsonl") if e["event"] == "failure"]
    assert summary["failures"] == len(failures) >= 1
    assert [(e.step, e.value) for e in acc.Scalars("events/failures")] == [
        (f["step"], n) for n, f in enumerate(failures, 1)
    ]
    assert acc.Scalars("events/recoveries")[-1].value == summary["recoveries"]
    assert "recovery/duration_s" in acc.Tags()["scalars"]


def test_without_the_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(ValueError, match=r"pip install 'checkfree\[tensorboard\]'"):
        MetricLogger(tmp_path / "m.jsonl", tmp_path / "tb")
