"""The hybrid strategy: CheckFree+ rebuilds for isolated losses, asynchronous checkpoints written in the
background, and a rollback of the whole pipeline to the newest complete one only when neighbours are lost together."""

import subprocess
import sys

import pytest

from checkfree.core.checkpoint import AsyncSaver, CheckpointStore, payload_bytes
from checkfree.core.failures import Failure, write_trace
from checkfree.core.metrics import read_jsonl
from checkfree.engine.trainer import Trainer
from tests.helpers import TINY, tiny_config


def _run(tmp_path, failures, *extra):
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, failures, 4)
    mode = ["failures.mode=trace", f"failures.trace_path={trace}"] if failures else []
    cfg = tiny_config(tmp_path, "recovery.strategy=hybrid", "num_steps=24", *mode, *extra)
    summary = Trainer(cfg).run()
    return summary, read_jsonl(cfg.run_dir / "events.jsonl"), read_jsonl(cfg.run_dir / "metrics.jsonl")


def test_isolated_losses_are_rebuilt_and_neighbours_lost_together_roll_back(tmp_path):
    failures = [
        Failure(5, 2, "mid_forward", 0.5),
        Failure(12, 0, "mid_backward", 0.3),
        Failure(12, 1, "before_forward", 0.0),
    ]
    summary, events, metrics = _run(tmp_path, failures, "checkpoint.every_steps=4")
    rebuilt = [(e["stage"], e["step"], e["method"]) for e in events if e["event"] == "rebuilt"]
    assert rebuilt == [(2, 5, "weighted_average")]  # the isolated loss: rebuilt in place, no rollback
    rolled = [e for e in events if e["event"] == "rolled_back"]
    # stages 0 and 1 together cannot be rebuilt from live neighbours: back to step 8, the newest complete save
    assert [(e["step"], e["to_step"], e["stages"], e["strategy"]) for e in rolled] == [(11, 8, [0, 1], "hybrid")]
    saves = [e for e in events if e["event"] == "checkpoint_save"]
    assert all(e["background"] for e in saves[1:])  # the first (step 0) is written before training starts
    assert [m["step"] for m in metrics][:12] == list(range(11)) + [8]  # steps 8..10 redone after the rollback
    assert summary["steps"] == 24 and summary["failures"] == 3


def test_with_no_interval_a_checkpoint_is_written_whenever_the_last_write_is_done(tmp_path):
    _, events, _ = _run(tmp_path, [], "checkpoint.every_steps=0")
    saved = [e["step"] for e in events if e["event"] == "checkpoint_save"]
    assert saved[0] == 0 and len(saved) >= 3 and saved == sorted(saved)


def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", num_stages=1)
    saver = AsyncSaver(store)
    trainer = Trainer(tiny_config(tmp_path, "recovery.strategy=hybrid"))
    blob = payload_bytes(trainer.engine.payload(0, 3))
    if (tmp_path / "ckpt").exists():
        (tmp_path / "ckpt").rmdir()
    (tmp_path / "ckpt").write_text("a file where the checkpoint directory should be")
    saver.save(3, [(0, blob)])
    with pytest.raises(OSError, match="cannot save checkpoint"):
        saver.wait()


def test_a_failed_background_write_is_an_event_and_the_rollback_takes_an_older_checkpoint(tmp_path):
    """Step 12's write fails for real (a file sits where its directory goes): the run goes on, says so, and
    the rollback at step 14 goes back to step 8, the newest complete checkpoint, instead of 12."""
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "step_00000012").write_text("not a directory")
    failures = [Failure(14, 0, "mid_backward", 0.3), Failure(14, 1, "before_forward", 0.0)]
    summary, events, metrics = _run(tmp_path, failures, "checkpoint.every_steps=4", f"checkpoint.dir={ckpt}")
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert [e["step"] for e in failed] == [12, 12]  # before the rollback, and again when step 12 is redone
    assert all("step_00000012" in e["error"] for e in failed)
    (rolled,) = [e for e in events if e["event"] == "rolled_back"]
    assert (rolled["step"], rolled["to_step"]) == (14, 8)
    assert [m["step"] for m in metrics][:15] == list(range(14)) + [8]  # steps 8..13 redone
    assert summary["steps"] == 24


def test_a_saver_with_an_error_handler_hands_it_the_step_and_goes_on(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", num_stages=1)
    seen = []
    saver = AsyncSaver(store, on_error=lambda step, e: seen.append((step, type(e).__name__)))
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "step_00000003").write_text("not a directory")
    saver.save(3, [(0, b"x")])
    saver.save(4, [(0, b"y")])  # hands step 3's error over, then writes step 4
    saver.wait()
    assert [step for step, _ in seen] == [3] and store.complete_steps() == [4]


def test_the_swarm_refuses_a_hybrid_whose_stages_would_save_different_steps(tmp_path):
    """In the swarm each stage peer writes its own file: with no fixed interval they would save different
    steps and no step would ever be a complete checkpoint."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkfree",
            "swarm",
            *TINY,
            f"out_dir={tmp_path}",
            "recovery.strategy=hybrid",
            "checkpoint.every_steps=0",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        out.returncode == 2 and "checkpoint.every_steps=0" in out.stderr and "set checkpoint.every_steps" in out.stderr
    )


def test_correlated_neighbour_losses_roll_the_hybrid_back(tmp_path):
    """failures.neighbour_prob=1: every drawn loss takes a neighbour with it, which CheckFree+ cannot rebuild
    from live neighbours, so the hybrid rolls back for each of them, and the trace it writes holds the pairs."""
    draws = ["failures.mode=per_step", "failures.per_step_prob=0.03", "failures.neighbour_prob=1.0", "failures.seed=2"]
    summary, events, _ = _run(tmp_path, [], "checkpoint.every_steps=4", *draws)
    lost = [e for e in events if e["event"] == "failure"]
    by_iteration = {}
    for e in lost:
        by_iteration.setdefault(e["iteration"], set()).add(e["stage"])
    assert by_iteration and all(len(s) >= 2 for s in by_iteration.values())  # never a stage alone
    rolled = [e for e in events if e["event"] == "rolled_back"]
    assert len(rolled) == len(by_iteration) and not [e for e in events if e["event"] == "rebuilt"]
    assert summary["steps"] == 24
