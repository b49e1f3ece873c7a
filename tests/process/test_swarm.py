"""Real multi-process swarms on the tiny config: peers are OS processes talking gloo over TCP and
heartbeating on a hivemind DHT; the launcher kills them with SIGKILL or freezes them with SIGSTOP."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from checkfree.core.failures import Failure
from checkfree.core.metrics import check_rows, read_jsonl
from tests.helpers import check_every_step_once, kill_groups, left_behind, run_swarm, spawned_pids, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_crashes_of_middle_first_and_last_stage_are_recovered(tmp_path):
    fails = [Failure(3, 1, "mid_forward", 0.5), Failure(8, 0, "mid_forward", 0.5), Failure(13, 3, "mid_forward", 0.5)]
    # enough steps after the last kill: the launcher waits swarm.min_gap_s after each resume, and toy steps
    # take milliseconds (with 20 steps the run could end before the third kill landed)
    code, out, run_dir = run_swarm(
        tmp_path,
        "crash",
        "num_steps=80",
        "swarm.num_spares=2",
        "metrics.tensorboard=true",
        "progress=true",
        "swarm.status_interval_s=0.2",
        failures=fails,
    )
    assert code == 0, out
    summary, _ = check_every_step_once(run_dir, 80)
    # the live status line counts recoveries as summary.json does (it once said 3 against 2)
    shown = re.findall(r"recoveries (\d+)", out)
    assert shown and int(shown[-1]) == summary["recoveries"] == 3, shown[-5:]
    # every peer that trained wrote its own TensorBoard run, at the steps it committed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_steps = set()
    for tb in (run_dir / "tensorboard").iterdir():
        acc = EventAccumulator(str(tb))
        acc.Reload()
        if "loss/train" in acc.Tags()["scalars"]:
            tb_steps |= {e.step for e in acc.Scalars("loss/train")}
    assert tb_steps == set(range(80))
    rows = summary["recovery_rows"]
    assert [(r["stage"], r["signal"], r["method"]) for r in rows] == [
        (1, "SIGKILL", "weighted_average"),
        (0, "SIGKILL", "copy"),
        (3, "SIGKILL", "copy"),
    ]
    assert all(r["detect_s"] is not None and r["rebuild_s"] is not None and r["resume_s"] is not None for r in rows)
    events = read_jsonl(run_dir / "events.jsonl")
    rebuilt = [e for e in events if e["event"] == "rebuilt"]
    assert len(rebuilt) == 3  # exactly one recovery per failure
    assert rebuilt[1]["edge"] == rebuilt[2]["edge"] == "replica"
    # stage 0's peer led and hosted the rendezvous: after its loss the next epoch formed elsewhere
    after_leader_loss = [e for e in events if e["event"] == "epoch_published" and e["lost"] == [0]][0]
    assert after_leader_loss["peer"] != rows[1]["killed_peer"]
    # two spares were idle at the first failure: the first by id won, the other stayed a spare
    assert rebuilt[0]["peer"].startswith("spare-05.")
    first_epoch = [e for e in events if e["event"] == "epoch_published" and e["lost"] == [1]][0]
    joined = {
        e["peer"] for e in events if e["event"] == "epoch_joined" and e["joined_epoch"] == first_epoch["new_epoch"]
    }
    names = {pid.partition(".")[0] for pid in joined}  # ids are NAME.HASH (the hash of the peer's key)
    assert "spare-05" in names and "spare-06" not in names


@pytest.mark.long  # the burst of L-1 stages (test_swarm_faults) covers the default run
def test_adjacent_stages_lost_at_once_are_rebuilt_from_the_nearest_live_stages(tmp_path):
    """Stages 1 and 2 killed in the same step: neither may read the other's (lost) weights, so both take the
    adjacent fallback (no checkpoint: the nearest live stage on each side, stages 0 and 3) in one epoch."""
    fails = [Failure(3, 1, "mid_forward", 0.5), Failure(3, 2, "mid_forward", 0.5)]
    code, out, run_dir = run_swarm(
        tmp_path, "adjacent", "num_steps=30", "swarm.num_spares=2", "recovery.strategy=checkfree", failures=fails
    )
    assert code == 0, out
    summary, metrics = check_every_step_once(run_dir, 30)
    rows = summary["recovery_rows"]
    assert sorted((r["stage"], r["method"], r["path"], tuple(r["sources"])) for r in rows) == [
        (1, "weighted_average", "fallback:nearest", (0, 3)),
        (2, "weighted_average", "fallback:nearest", (0, 3)),
    ]
    events = read_jsonl(run_dir / "events.jsonl")
    recoveries = [e for e in events if e["event"] == "epoch_published" and e["lost"]]
    assert [sorted(e["lost"]) for e in recoveries] == [[1, 2]]  # both seen in one epoch, one rendezvous
    kill_step = min(r["kill_step"] for r in rows)
    assert metrics[-1]["loss/train"] < metrics[kill_step]["loss/train"]  # training went on from the rebuilt stages


@pytest.mark.long
def test_redundant_swarm_with_adjacent_losses_falls_back_and_refreshes_the_stale_shadows(tmp_path):
    """Stages 1 and 2 killed at once under redundant computation: stage 1 fails over to the shadow stage 0
    holds, but stage 2's shadow died with stage 1, so stage 2 is rebuilt by the fallback; the shadows of
    stages 2 and 3 (held by the two replacements) are then sent anew, and a later loss of stage 2 fails
    over to the shadow of the *rebuilt* stage 2."""
    fails = [Failure(3, 1, "mid_forward", 0.5), Failure(3, 2, "mid_forward", 0.5), Failure(12, 2, "mid_forward", 0.5)]
    code, out, run_dir = run_swarm(
        tmp_path, "adj-redundant", "num_steps=60", "swarm.num_spares=3", "recovery.strategy=redundant", failures=fails
    )
    assert code == 0, out
    summary, _ = check_every_step_once(run_dir, 60)
    rows = summary["recovery_rows"]
    assert sorted((r["stage"], r["method"], r["path"], tuple(r["sources"])) for r in rows[:2]) == [
        (1, "shadow", "primary", (0,)),
        (2, "weighted_average", "fallback:nearest", (0, 3)),
    ]
    assert (rows[2]["stage"], rows[2]["method"], rows[2]["sources"]) == (2, "shadow", [1])
    events = read_jsonl(run_dir / "events.jsonl")
    epochs = [e["new_epoch"] for e in events if e["event"] == "epoch_published" and e["lost"]]
    refreshed = [(e["shadow_of"], e["stage_held"], e["epoch"]) for e in events if e["event"] == "shadow_refreshed"]
    # first recovery: stage 2 (rebuilt another way, its holder new) and stage 3 (its holder new); second:
    # stage 3 again (its holder, stage 2, replaced)
    assert sorted(refreshed) == sorted([(2, 1, epochs[0]), (3, 2, epochs[0]), (3, 2, epochs[1])])


def test_a_frozen_peer_is_detected_and_replaced(tmp_path):
    code, out, run_dir = run_swarm(
        tmp_path,
        "hang",
        "num_steps=12",
        "swarm.hang_fraction=1.0",
        "transport.timeout_s=60",  # the backstop only: the heartbeat's expiry must release everyone first
        failures=[Failure(3, 2, "mid_forward", 0.5)],
    )
    assert code == 0, out
    summary, _ = check_every_step_once(run_dir, 12)
    (row,) = summary["recovery_rows"]
    assert row["signal"] == "SIGSTOP" and row["method"] == "weighted_average"
    # a frozen peer is seen by its stalled record and silent probe (a 0.5 s probe timeout), not the 60 s
    # transport timeout
    assert 0.3 < row["detect_s"] + row["decide_s"] < 10.0
    events = read_jsonl(run_dir / "events.jsonl")
    assert any(e["event"] == "reaped" and e["peer"] == row["killed_peer"] for e in events)


def test_without_a_spare_the_swarm_waits_then_stops_with_its_run_directory_intact(tmp_path):
    code, out, run_dir = run_swarm(
        tmp_path,
        "nospare",
        "num_steps=40",  # time for the launcher to see the swarm train before it ends (toy steps are fast)
        "swarm.num_spares=0",
        "swarm.spare_delay_s=600",
        "swarm.spare_wait_s=3",
        failures=[Failure(3, 1, "mid_forward", 0.5)],
    )
    assert code == 3, out
    assert "swarm stopped: waiting for a spare for stages [1]" in out and "swarm.spare_wait_s=3" in out
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(len(metrics))) and len(metrics) >= 3
    events = read_jsonl(run_dir / "events.jsonl")
    assert any(e["event"] == "leader_waiting" and "waiting for a spare" in e["reason"] for e in events)
    assert sum(e["event"] == "swarm_stopped" for e in events) == 3  # every survivor says why it stopped


@pytest.mark.long  # ~25 s; rollbacks across processes are in the default run by the hybrid's replay
def test_checkpoint_strategy_rolls_the_swarm_back(tmp_path):
    code, out, run_dir = run_swarm(
        tmp_path,
        "ckpt",
        "num_steps=40",  # long enough that the launcher sees step 5 before the run ends, on a slow machine too
        "recovery.strategy=checkpoint",
        "checkpoint.every_steps=2",
        failures=[Failure(5, 2, "mid_forward", 0.5)],
    )
    assert code == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = [m["step"] for m in metrics]
    assert sorted(set(steps)) == list(range(40)) and summary["skipped_steps"] == []
    (row,) = summary["recovery_rows"]
    assert row["method"] == "checkpoint" and summary["recoveries"] == 1  # the rollback recovered the loss
    events = read_jsonl(run_dir / "events.jsonl")
    (published,) = [e for e in events if e["event"] == "epoch_published" and e["lost"] == [2]]
    target = published["rollback_to"]
    # the launcher's kill step is what it last polled from heartbeats and may lag the swarm by a step or two:
    # the bound is the last step the old epoch really committed
    last = max(m["step"] for m in metrics if m["epoch"] == published["epoch"])
    assert row["kill_step"] <= last + 1  # the launcher's step is the next one to run
    assert target is not None and target % 2 == 0 and target <= last + 1
    assert sum(e["event"] == "rolled_back" and e["to_step"] == target for e in events) == 4
    assert summary["repeated_steps"] == []  # on the final timeline, each step once
    assert set(summary["redone_steps"]) <= set(range(target, last + 1))  # redone after the rollback, by design


# checkpoint: ~33 s, -m long; every stage restarted from a checkpoint runs by default in test_swarm_resume.py
@pytest.mark.parametrize("strategy", ["checkfree_plus", pytest.param("checkpoint", marks=pytest.mark.long)])
def test_losing_every_stage_at_once(tmp_path, strategy):
    """All four peers killed in one step. Nothing survives to rebuild a stage from, so a per-stage strategy
    stops the swarm saying so (a spare leads, as no stage peer is left). Checkpointing restarts every stage
    on the spares; here before the first checkpoint (every 100 steps), so from step 0, the seed's initial
    state, which needs no file: the restarted run repeats the first steps bit for bit."""
    fails = [Failure(3, s, "mid_forward", 0.5) for s in range(4)]
    code, out, run_dir = run_swarm(
        tmp_path,
        f"all-{strategy}",
        "num_steps=30",
        f"recovery.strategy={strategy}",
        "checkpoint.every_steps=100",
        "swarm.num_spares=0",
        # killed from outside, all at once: with every peer gone no survivor knows how far the epoch got, so
        # peers injecting their own failures could not count iterations on (see checkfree/swarm/injection.py)
        "swarm.inject=launcher",
        failures=fails,
    )
    events = read_jsonl(run_dir / "events.jsonl")
    if strategy == "checkpoint":
        assert code == 0, out
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        assert sorted({m["step"] for m in metrics}) == list(range(30))
        (published,) = [e for e in events if e["event"] == "epoch_published" and e["lost"]]
        assert published["lost"] == [0, 1, 2, 3] and published["peer"].startswith("spare-")
        assert published["rollback_to"] == 0
        assert sum(e["event"] == "rolled_back" and e["to_step"] == 0 for e in events) == 4
        for step in (0, 1):
            losses = [m["loss/train"] for m in metrics if m["step"] == step]
            assert len(losses) == 2 and losses[0] == losses[1], losses
    else:
        assert code == 3, out
        assert "every stage of epoch 0 is lost at once" in out and f"recovery.strategy={strategy}" in out
        assert (run_dir / "metrics.jsonl").exists() and read_jsonl(run_dir / "metrics.jsonl")  # the record stays
        assert any(e["event"] == "swarm_stopped" and e["peer"].startswith("spare-") for e in events)


# both in the long group (~18 s each): test_replay.py's default run trains plain CheckFree on 1F1B in the swarm
# and checks the engine's losses step for step, with failures on top
@pytest.mark.parametrize(
    "schedule", [pytest.param("gpipe", marks=pytest.mark.long), pytest.param("1f1b", marks=pytest.mark.long)]
)
def test_swarm_reproduces_the_engine_on_plain_schedules(tmp_path, schedule):
    from checkfree.engine.trainer import Trainer

    overrides = [f"pipeline.schedule={schedule}", "recovery.strategy=checkfree", "num_steps=6"]
    code, out, run_dir = run_swarm(tmp_path, f"eq-{schedule}", *overrides, "swarm.num_spares=0")
    assert code == 0, out
    _, metrics = check_every_step_once(run_dir, 6)
    reference = Trainer(tiny_config(tmp_path, *overrides, "run_name=reference"))
    reference.run()
    expected = [m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")]
    assert [m["loss/train"] for m in metrics] == pytest.approx(expected, abs=1e-5)


def test_swarm_reproduces_the_engine_and_refuses_a_foreign_peer(tmp_path):
    from checkfree.engine.trainer import Trainer

    proc = run_swarm(tmp_path, "equiv", "num_steps=40", "swarm.num_spares=0", background=True)
    run_dir = tmp_path / "equiv"
    foreign = None
    try:
        deadline = time.time() + 60
        while not (run_dir / "maddrs.txt").exists() and time.time() < deadline:
            time.sleep(0.2)
        maddrs = (run_dir / "maddrs.txt").read_text().split()
        # a peer holding the swarm's token but with another config (seed): admitted to the DHT, refused as a member
        env = {**os.environ, "CHECKFREE_JOIN_TOKEN": (run_dir / "join_token").read_text().strip()}
        env["CHECKFREE_SWARM_ID"] = (run_dir / "swarm_id").read_text().strip()
        foreign = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "checkfree",
                "peer",
                str(run_dir / "config.yaml"),
                "seed=99",
                "--stage",
                "1",
                "--run-dir",
                str(tmp_path / "foreign"),
                "--peer-id",
                "intruder",
                "--initial-peers",
                *maddrs,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=env,
        )
        while not list((run_dir / "peers").glob("*/metrics.jsonl")) and time.time() < deadline:
            time.sleep(0.2)
        for _ in range(3):  # a snapshot: on a loaded machine one DHT read of the epoch may time out
            status = subprocess.run(
                [sys.executable, "-m", "checkfree", "status", "--run-id", "equiv", "--initial-peers", *maddrs],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            if "no epoch yet" not in status.stdout:
                break
        out, _ = proc.communicate(timeout=200)
        assert proc.returncode == 0, out
    finally:
        for p in (proc, foreign):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        kill_groups(spawned_pids(run_dir))
    _, metrics = check_every_step_once(run_dir, 40)
    # every row follows the metrics schema: each peer's own, and the run's merged step records
    for f in sorted((run_dir / "peers").glob("*/metrics.jsonl")):
        check_rows(read_jsonl(f), "peer")
    check_rows(read_jsonl(run_dir / "metrics.jsonl"))
    assert status.returncode == 0, status.stderr
    # an epoch of the swarm's own config, whatever its number (a loaded machine may re-form it once)
    assert re.search(r"run equiv: epoch \d+", status.stdout), status.stdout
    assert all(f"s{k}-0{k + 1}" in status.stdout for k in range(4)), status.stdout
    events = read_jsonl(run_dir / "events.jsonl")
    rosters = [pid for e in events if e["event"] == "epoch_published" for pid in e.get("roster", [])]
    assert not any(pid.startswith("intruder.") for pid in rosters)
    # the launcher reads the members all run long; a stage peer only while it waits for an epoch, which may
    # be over before the intruder's first heartbeat lands (on a loaded machine it was)
    logs = out + "".join(p.read_text() for p in (run_dir / "peers").glob("*.log"))
    assert "ignoring record intruder." in logs
    reference = Trainer(tiny_config(tmp_path, "num_steps=40", "run_name=reference"))
    reference.run()
    expected = [m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")]
    assert [m["loss/train"] for m in metrics] == pytest.approx(expected, abs=1e-5)


@pytest.mark.long  # ~40 s; the shadow hand-over itself is checked on thread ranks (tests/integration)
def test_redundant_swarm_fails_over_to_shadows_without_losing_anything(tmp_path):
    """Bamboo-style redundancy across real processes: middle, first and last stage killed; each fails over
    to the shadow its predecessor trained (the last stage holds the first's), the replacement's own
    shadow is sent to it, and every committed loss is the failure-free engine's."""
    from checkfree.engine.trainer import Trainer

    overrides = ["recovery.strategy=redundant", "recovery.lr_factor=1.5", "num_steps=40"]  # the 3rd failure lands
    fails = [Failure(3, 1, "mid_forward", 0.5), Failure(7, 0, "mid_forward", 0.5), Failure(11, 3, "mid_forward", 0.5)]
    code, out, run_dir = run_swarm(tmp_path, "redundant", *overrides, "swarm.num_spares=2", failures=fails)
    assert code == 0, out
    summary, metrics = check_every_step_once(run_dir, 40)
    rows = summary["recovery_rows"]
    assert [(r["stage"], r["method"], r["sources"]) for r in rows] == [
        (1, "shadow", [0]),
        (0, "shadow", [3]),
        (3, "shadow", [2]),
    ]
    events = read_jsonl(run_dir / "events.jsonl")
    refreshed = [(e["shadow_of"], e["stage_held"]) for e in events if e["event"] == "shadow_refreshed"]
    assert refreshed == [(2, 1), (1, 0), (0, 3)]  # each replacement got the shadow its predecessor had held
    reference = Trainer(tiny_config(tmp_path, *overrides, "failures.mode=none", "run_name=reference"))
    reference.run()
    expected = [m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")]
    assert [m["loss/train"] for m in metrics] == pytest.approx(expected, abs=1e-5)
    rebuilt_lrs = {e["lr"] for e in events if e["event"] == "rebuilt"}
    assert rebuilt_lrs == {reference.cfg.optim.lr}  # the shadow's learning rate, not a raised one


def test_a_killed_launcher_leaves_no_peer_running(tmp_path):
    """SIGKILL of `checkfree swarm` itself (no chance to clean up): every peer, running or frozen, and its
    DHT process exit on their own."""
    proc = run_swarm(
        tmp_path,
        "orphans",
        "num_steps=100000",
        "swarm.num_spares=1",
        "swarm.hang_fraction=1.0",
        failures=[Failure(3, 2, "mid_forward", 0.5)],
        background=True,
    )
    run_dir = tmp_path / "orphans"
    try:
        log = run_dir / "launcher-events.jsonl"
        deadline = time.time() + 90
        while time.time() < deadline and not (log.exists() and any(e["event"] == "failure" for e in read_jsonl(log))):
            time.sleep(0.5)
        assert time.time() < deadline, "the injector never froze a peer"
        pgids = spawned_pids(run_dir)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 20
        while left_behind(pgids) and time.time() < deadline:
            time.sleep(0.5)
        assert not left_behind(pgids), left_behind(pgids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_groups(spawned_pids(run_dir))
