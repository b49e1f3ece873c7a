"""A swarm whose every process is killed at once (SIGKILL of the launcher; its peers follow it) is started again
with the same command: with ``resume=auto`` its first epoch restores every stage from the newest complete
checkpoint and the run finishes, its losses after the restart those of the engine's uninterrupted run."""

import os
import signal
import time

import pytest

from checkfree.core.checkpoint import CheckpointStore
from checkfree.core.metrics import read_jsonl
from tests.helpers import kill_groups, left_behind, run_swarm, spawned_pids, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 40
EVERY = 4
ARGS = (f"num_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "swarm.num_spares=0")


def _kill_everything_after_a_checkpoint(tmp_path, name, at_least):
    """Start the swarm, wait for a complete checkpoint of step >= ``at_least``, SIGKILL the launcher's process
    group and wait until every peer it spawned is gone (they follow their launcher: PR_SET_PDEATHSIG)."""
    proc = run_swarm(tmp_path, name, *ARGS, background=True)
    run_dir = tmp_path / name
    store = None  # opened once the launcher made the directory (an open store creates it: a run directory in use)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if store is None and (run_dir / "checkpoints").is_dir():
                store = CheckpointStore(run_dir / "checkpoints", 4)
            if store is not None and (store.latest_complete() or 0) >= at_least:
                break
            time.sleep(0.05)
        assert store is not None and (store.latest_complete() or 0) >= at_least, "no complete checkpoint in time"
        pgids = spawned_pids(run_dir)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while left_behind(pgids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left_behind(pgids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        kill_groups(spawned_pids(run_dir))
    return run_dir, store


def test_a_swarm_killed_entirely_resumes_from_its_newest_complete_checkpoint(tmp_path):
    from checkfree.engine.trainer import Trainer

    run_dir, store = _kill_everything_after_a_checkpoint(tmp_path, "resume", at_least=2 * EVERY)
    saved = store.latest_complete()
    assert saved < STEPS, "the run finished before it was killed"
    code, out, _ = run_swarm(tmp_path, "resume", *ARGS)
    assert code == 0, out
    events = read_jsonl(run_dir / "events.jsonl")
    (first,) = [e for e in events if e["event"] == "epoch_published" and e["reason"] == "resume"]
    # the restart starts at a complete step at least as new as the one seen before the kill (it may have saved
    # another in between), numbered after every epoch of the killed swarm
    resumed_at = first["step"]
    assert saved <= resumed_at < STEPS and first["rollback_to"] == resumed_at
    old_epochs = [e["epoch"] for e in events if e.get("epoch", -1) >= 0 and e["time"] < first["time"]]
    assert first["new_epoch"] > max(old_epochs)
    assert sorted(e["stage_held"] for e in events if e["event"] == "rolled_back") == [0, 1, 2, 3]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    after = [m for m in metrics if m["epoch"] >= first["new_epoch"]]
    assert [m["step"] for m in after] == list(range(resumed_at, STEPS))  # the metrics go on from the checkpoint
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["repeated_steps"] == [] and summary["skipped_steps"] == []
    assert summary["weights_step"] == STEPS and (run_dir / "model.safetensors").is_file()
    # the restored swarm trains as the uninterrupted run: the engine's losses, step for step
    reference = Trainer(tiny_config(tmp_path, *ARGS, "run_name=reference"))
    reference.run()
    expected = {m["step"]: m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")}
    assert [m["loss/train"] for m in after] == pytest.approx([expected[m["step"]] for m in after], abs=1e-5)
