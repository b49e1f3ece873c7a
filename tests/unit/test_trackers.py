"""Trackers: failures and recoveries as counters at their step (event_scalars), in TensorBoard through an
EventLog's tracker, and Weights & Biases as an option (metrics.wandb=true), checked in offline mode."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from checkfree.config import ConfigError, load_config
from checkfree.core.events import EVENTS, EventLog
from checkfree.core.metrics import MetricLogger, MetricsConfig, event_scalars
from tests.helpers import descendants, kill_and_reap, processes_left

REBUILT = dict.fromkeys(EVENTS["rebuilt"].required) | {"stage": 1, "step": 3, "duration_s": 0.25, "method": "mean"}
# what the engine writes around a lost stage 1 at step 3 and a rollback at step 5
ENGINE_EVENTS = [
    ("run_started", {"num_stages": 4, "strategy": "hybrid"}),
    ("failure", {"stage": 1, "step": 3, "iteration": 3}),
    ("step_discarded", {"step": 3, "reason": "stage lost"}),
    ("rebuilt", REBUILT),
    ("failure", {"stage": 1, "step": 5, "iteration": 6}),
    ("failure", {"stage": 2, "step": 5, "iteration": 6}),
    ("rolled_back", {"step": 5, "to_step": 4, "restore_s": 0.5, "lost_steps": 1, "stages": [1, 2]}),
]


def test_event_scalars_count_failures_and_recoveries_and_carry_their_durations():
    counts = Counter()
    out = [event_scalars({"event": name, **fields}, counts) for name, fields in ENGINE_EVENTS]
    assert out == [
        {},
        {"events/failures": 1},
        {"events/steps_discarded": 1},
        {"events/recoveries": 1, "recovery/duration_s": 0.25},
        {"events/failures": 2},
        {"events/failures": 3},
        {"events/rollbacks": 1, "events/recoveries": 3, "recovery/restore_s": 0.5, "recovery/lost_steps": 1},
    ]
    swarm = [
        {"event": "epoch_published", "lost": [0, 2], "new_epoch": 3},
        {"event": "epoch_published", "lost": [], "new_epoch": 4},
        {"event": "epoch_joined", "join_s": 1.5},
        {"event": "step_aborted", "step": 9},
        {"event": "rolled_back", "restore_s": 0.1, "to_step": 4},  # a swarm peer's: no stages named
    ]
    assert [event_scalars(e, counts) for e in swarm] == [
        {"events/stage_losses": 2},
        {},
        {"recovery/join_s": 1.5},
        {"events/steps_aborted": 1},
        {"events/rollbacks": 2, "recovery/restore_s": 0.1},
    ]


def test_an_event_log_with_a_metric_logger_as_tracker_puts_failures_into_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = MetricLogger(tmp_path / "metrics.jsonl", tmp_path / "tb")
    events = EventLog(tmp_path / "events.jsonl", tracker=metrics)
    for step in range(3):
        metrics.write({"step": step, "loss/train": 5.0 - step})
    for name, fields in ENGINE_EVENTS:
        events.emit(name, **fields)
    events.emit("checkpoint_save", save_s=0.125, step=4)
    events.emit("became_spare", reason="no stage")  # counts nothing: no scalar
    metrics.close()
    events.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in acc.Scalars(tag)]
    assert scalars("events/failures") == [(3, 1), (5, 2), (5, 3)]
    assert scalars("events/recoveries") == [(3, 1), (5, 3)]
    assert scalars("recovery/duration_s") == [(3, 0.25)]
    assert scalars("recovery/restore_s") == [(5, 0.5)]
    assert scalars("checkpoint/save_s") == [(4, 0.125)]
    assert scalars("loss/train") == [(0, 5.0), (1, 4.0), (2, 3.0)]
    assert [json.loads(line)["event"] for line in (tmp_path / "events.jsonl").read_text().splitlines()][-1] == (
        "became_spare"
    )


def test_an_event_without_a_step_is_drawn_at_the_last_metrics_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = MetricLogger(None, tmp_path / "tb")  # trackers only, no metrics.jsonl
    tracker.write({"step": 7, "loss/train": 3.0})
    tracker.track_event({"event": "epoch_joined", "join_s": 2.0, "joined_epoch": 2})
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("recovery/join_s")] == [(7, 2.0)]
    assert list(tmp_path.iterdir()) == [tmp_path / "tb"]


def _offline_run(run_dir) -> tuple[list[dict], dict]:
    """(the rows a W&B offline run logged, its config), read from its run-*.wandb file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(path))
    rows, config = [], {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = record.history.item  # a key with "/" is stored split into nested_key
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
        elif kind in ("run", "config"):  # the config given to init comes with the run record
            updates = record.run.config.update if kind == "run" else record.config.update
            config |= {item.key: json.loads(item.value_json) for item in updates}
    return rows, config


def test_wandb_offline_run_holds_the_metrics_and_the_failure_counters(tmp_path, monkeypatch):
    import wandb

    before = descendants(os.getpid())
    monkeypatch.setenv("WANDB_MODE", "offline")  # metrics.wandb_mode unset: wandb's own setting applies
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no crash reports sent anywhere from a test
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")  # else GitPython may leave a `git cat-file` child behind
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the run directory wins
    cfg = MetricsConfig(wandb=True, wandb_project="cf-test")
    run_config = load_config([], ["num_steps=4"])
    metrics = MetricLogger.from_config(tmp_path / "metrics.jsonl", cfg, tmp_path, "tiny", run_config=run_config)
    events = EventLog(tmp_path / "events.jsonl", tracker=metrics)
    try:
        for step in range(3):
            metrics.write({"step": step, "loss/train": 5.0 - step, "throughput/tokens_per_s": 100.0})
        events.emit("failure", stage=1, step=3, iteration=3)
        events.emit("rebuilt", **REBUILT)
        metrics.write({"step": 3, "loss/train": 1.5})
        metrics.close()
    finally:
        events.close()
        wandb.teardown()  # its service process should end with it; in a fresh CI venv it outlived 80 s twice
        for pid in processes_left(before, grace_s=10.0):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"wandb" in cmdline or cmdline.startswith(b"git\0"):  # wandb's service or its git reader: by PID
                kill_and_reap({pid}, keep=before)
    history, config = _offline_run(tmp_path)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in history]
    assert rows == [
        {"loss/train": 5, "throughput/tokens_per_s": 100, "step": 0},
        {"loss/train": 4, "throughput/tokens_per_s": 100, "step": 1},
        {"loss/train": 3, "throughput/tokens_per_s": 100, "step": 2},
        {"events/failures": 1, "step": 3},
        {"events/recoveries": 1, "recovery/duration_s": 0.25, "step": 3},
        {"loss/train": 1.5, "step": 3},
    ]
    assert not (tmp_path / "elsewhere").exists()
    assert config["num_steps"] == 4 and config["metrics"]["wandb"] is False  # the run's resolved config
    metrics.write({"step": 4, "loss/train": 1.0})  # after close: the file reopens, W&B is finished
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 5


def test_a_swarm_peer_gets_its_own_tensorboard_folder_and_wandb_run_name(tmp_path, monkeypatch):
    captured = {}
    monkeypatch.setattr("checkfree.core.metrics._start_wandb", lambda init: captured.update(init))
    cfg = MetricsConfig(tensorboard=True, wandb=True, wandb_mode="offline")
    peer = MetricLogger.from_config(tmp_path / "m.jsonl", cfg, tmp_path, "exp", peer="s1-02.abcd")
    assert peer.tb.log_dir == str(tmp_path / "tensorboard" / "s1-02.abcd")
    assert captured["name"] == "exp/s1-02.abcd" and captured["group"] == "exp" and captured["mode"] == "offline"
    assert captured["dir"] == str(tmp_path) and captured["project"] == "checkfree"
    peer.wandb = None
    peer.close()


def test_a_wandb_mode_that_does_not_exist_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics.wandb_mode='onlien': expected one of online, offline, disabled"):
        load_config([], ["metrics.wandb=true", "metrics.wandb_mode=onlien"])


def test_without_the_wandb_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="metrics.wandb=true needs the wandb package: pip install wandb"):
        MetricLogger.from_config(tmp_path / "m.jsonl", MetricsConfig(wandb=True), tmp_path, "tiny")
