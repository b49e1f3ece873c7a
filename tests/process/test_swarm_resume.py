"""A swarm whose every process is killed at once (SIGKILL of the launcher; its peers follow it) is started again
with the same command: with ``resume=auto`` its first epoch restores every stage from the newest complete
checkpoint and the run finishes, its losses after the restart those of the engine's uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from checkfree.core.checkpoint import CheckpointStore
from checkfree.core.metrics import read_jsonl
from checkfree.swarm.admission import TOKEN_ENV
from tests.helpers import kill_groups, left_behind, run_swarm, spawned_pids, tiny_config

pytestmark = pytest.mark.timeout(300)

STEPS = 40
EVERY = 4
ARGS = (f"num_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "swarm.num_spares=0")


def _kill_everything_after_a_checkpoint(tmp_path, name, at_least, overrides=()):
    """Start the swarm, wait for a complete checkpoint of step >= ``at_least``, SIGKILL the launcher's process
    group and wait until every peer it spawned is gone (they follow their launcher: PR_SET_PDEATHSIG)."""
    proc = run_swarm(tmp_path, name, *ARGS, *overrides, background=True)
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        (),
        # redundant: the restored stages' shadows are sent anew; checkpoint: writes in the foreground
        pytest.param(("recovery.strategy=redundant", "pipeline.swap=false"), marks=pytest.mark.long),
        pytest.param(("recovery.strategy=checkpoint",), marks=pytest.mark.long),
    ],
    ids=["default", "redundant", "checkpoint"],
)
def test_a_swarm_killed_entirely_resumes_from_its_newest_complete_checkpoint(tmp_path, strategy):
    from checkfree.engine.trainer import Trainer

    run_dir, store = _kill_everything_after_a_checkpoint(tmp_path, "resume", 2 * EVERY, strategy)
    saved = store.latest_complete()
    assert saved < STEPS, "the run finished before it was killed"
    code, out, _ = run_swarm(tmp_path, "resume", *ARGS, *strategy)
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
    if "recovery.strategy=redundant" in strategy:  # every restored stage's shadow was sent to its holder anew
        refreshed = [e["shadow_of"] for e in events if e["event"] == "shadow_refreshed"]
        assert sorted(refreshed) == [0, 1, 2, 3]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    after = [m for m in metrics if m["epoch"] >= first["new_epoch"]]
    assert [m["step"] for m in after] == list(range(resumed_at, STEPS))  # the metrics go on from the checkpoint
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["repeated_steps"] == [] and summary["skipped_steps"] == []
    assert summary["weights_step"] == STEPS and (run_dir / "model.safetensors").is_file()
    # the restored swarm trains as the uninterrupted run: the engine's losses, step for step
    reference = Trainer(tiny_config(tmp_path, *ARGS, *strategy, "run_name=reference"))
    reference.run()
    expected = {m["step"]: m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")}
    assert [m["loss/train"] for m in after] == pytest.approx([expected[m["step"]] for m in after], abs=1e-5)


def _complete(root, step, num_stages=4):
    """Files of every stage at ``step`` (their content is never read by the decisions below)."""
    store = CheckpointStore(root, num_stages)
    for stage in range(num_stages):
        store.save_bytes(step, stage, b"state")


def test_what_checkfree_swarm_does_with_a_run_directory_that_holds_a_run(tmp_path, capsys):
    """``core.run_dir.plan_run_dir`` carried out for a swarm, whose saved steps are its complete checkpoints."""
    from checkfree.cli.swarm import prepare_run_dir

    cfg = lambda *o: tiny_config(tmp_path, "run_name=r", "checkpoint.every_steps=4", "num_steps=20", *o)
    run_dir = cfg().run_dir
    assert prepare_run_dir(cfg()) is None  # no run there: go
    (run_dir / "peers").mkdir(parents=True)
    assert "resume=never" in prepare_run_dir(cfg("resume=never"))
    assert "no saved state to resume from" in prepare_run_dir(cfg())
    assert "no saved state to resume from" in prepare_run_dir(cfg("checkpoint.every_steps=0"))
    CheckpointStore(run_dir / "checkpoints", 4).save_bytes(12, 0, b"state")  # one stage's file: not a saved step
    assert "no saved state to resume from" in prepare_run_dir(cfg())
    _complete(run_dir / "checkpoints", 8)
    capsys.readouterr()
    assert prepare_run_dir(cfg()) is None
    assert f"resuming from step 8 saved in {run_dir / 'checkpoints'}" in capsys.readouterr().err
    assert prepare_run_dir(cfg("resume=never")) is not None  # never: refused whatever it holds
    _complete(run_dir / "checkpoints", 20)  # every peer saves the end: a finished run is refused
    assert "already reached step 20" in prepare_run_dir(cfg())
    assert prepare_run_dir(cfg("num_steps=30")) is None  # and extended
    # overwrite: the run directory goes, and stderr names the saved steps that go with it
    capsys.readouterr()
    assert prepare_run_dir(cfg("overwrite=true")) is None
    assert "[8, 20]" in capsys.readouterr().err and not run_dir.exists()
    # a checkpoint.dir outside the run directory: refused with resume=never, resumed from, or cleared by overwrite
    outside = tmp_path / "shared-checkpoints"
    _complete(outside, 12)
    assert "holds the saved steps [12]" in prepare_run_dir(cfg(f"checkpoint.dir={outside}", "resume=never"))
    assert prepare_run_dir(cfg(f"checkpoint.dir={outside}")) is None
    assert "resuming from step 12" in capsys.readouterr().err
    assert prepare_run_dir(cfg(f"checkpoint.dir={outside}", "overwrite=true")) is None
    assert str(outside) in capsys.readouterr().err and CheckpointStore(outside, 4).complete_steps() == []


@pytest.mark.long  # the default suite restarts a killed swarm with checkfree swarm (the test above)
def test_peers_started_by_hand_on_a_killed_run_resume_it(tmp_path):
    """The same restart without the launcher: ``checkfree peer`` per stage, by hand, on the run directory."""
    run_dir, store = _kill_everything_after_a_checkpoint(tmp_path, "by-hand", EVERY)
    saved = store.latest_complete()
    config = run_dir / "config.yaml"
    (run_dir / "maddrs.txt").unlink()  # the killed launcher's address: the first peer writes its own
    env = {**os.environ, TOKEN_ENV: (run_dir / "join_token").read_text().strip()}
    peer = [sys.executable, "-m", "checkfree", "peer", str(config), "--run-dir", str(run_dir)]
    procs = []
    try:
        procs.append(subprocess.Popen([*peer, "--stage", "0"], env=env, start_new_session=True))
        deadline = time.monotonic() + 60
        while not (run_dir / "maddrs.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        maddrs = (run_dir / "maddrs.txt").read_text().split()
        for stage in (1, 2, 3):
            cmd = [*peer, "--stage", str(stage), "--initial-peers", *maddrs]
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    assert codes == [0, 0, 0, 0]
    events = [e for path in run_dir.glob("peers/*/events.jsonl") for e in read_jsonl(path)]
    (first,) = [e for e in events if e["event"] == "epoch_published" and e["reason"] == "resume"]
    assert first["step"] >= saved
    rows = [r for path in run_dir.glob("peers/*/metrics.jsonl") for r in read_jsonl(path)]
    after = sorted({r["step"] for r in rows if r["epoch"] >= first["new_epoch"] and "loss/train" in r})
    assert after == list(range(first["step"], STEPS))
    done = [e for e in events if e["event"] == "done" and e["epoch"] >= first["new_epoch"]]
    assert sorted(e["stage_held"] for e in done) == [0, 1, 2, 3]


@pytest.mark.parametrize(("strategy", "stale"), [("checkfree_plus", ()), ("redundant", (0, 1, 2, 3))])
def test_the_first_epoch_of_a_restart_rolls_every_stage_back_to_the_checkpoint(strategy, stale):
    """The rule itself (``decide_epoch``, pure): no stage lost (no peer of this swarm lost one), every stage
    restored from the checkpoint, the redundant shadows sent anew; without a checkpoint, step 0 as ever."""
    from checkfree.swarm.coordinator import decide_epoch
    from checkfree.swarm.records import MemberRecord

    members = {
        pid: MemberRecord(run_id="r", fingerprint="f", peer_id=pid, stage=s, epoch=-1, state="waiting", step=0)
        for s, pid in enumerate("abcd")
    }
    d = decide_epoch(members, None, 4, strategy, "nearest", resume_step=12)
    assert (d.roster, d.step, d.rollback_to, d.lost, d.plans) == (list("abcd"), 12, 12, (), ())
    assert d.reason == "resume" and d.stale_shadows == stale
    d = decide_epoch(members, None, 4, strategy, "nearest", resume_step=None)
    assert (d.step, d.rollback_to, d.reason) == (0, None, "")
    waiting = decide_epoch({p: r for p, r in members.items() if p != "c"}, None, 4, strategy, "nearest", resume_step=12)
    assert waiting.roster is None and waiting.needs_peers  # a restart still waits for every stage
