"""Failures that land while the swarm recovers, a blind spare, a flaky DHT and expiring epoch records, made
to happen for real: the launcher injects the first failure, and an outside driver in the test SIGKILLs (by
PID) a second peer the moment a peer's event says the recovery has reached the chosen point."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from checkfree.core.failures import Failure
from checkfree.core.metrics import read_jsonl
from tests.helpers import run_swarm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 60


def _peer_events(run_dir):
    out = []
    for f in sorted((run_dir / "peers").glob("*/events.jsonl")):
        try:
            out += read_jsonl(f)
        except (OSError, ValueError):  # a line being written
            pass
    return out


def _pids(run_dir):
    return {e["peer"]: e["pid"] for e in read_jsonl(run_dir / "launcher-events.jsonl") if e["event"] == "peer_spawned"}


def _kill_when(proc, run_dir, trigger, timeout_s=120.0):
    """Poll the peers' events until ``trigger(events)`` names a peer, then SIGKILL that peer's process
    group (the peer, its DHT and p2pd: a vanished machine). Returns the killed peer's id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        victim = trigger(_peer_events(run_dir))
        if victim is not None:
            os.killpg(_pids(run_dir)[victim], signal.SIGKILL)
            return victim
        time.sleep(0.005)
    raise AssertionError("the trigger never fired")


def _published(events, epoch):
    return next((e for e in events if e["event"] == "epoch_published" and e["new_epoch"] == epoch), None)


def _leader_after_publish(events):
    e = _published(events, 1)
    return e["peer"] if e else None


def _source_during_transfer(events):
    e = _published(events, 1)
    if e is None:
        return None
    (plan,) = [p for p in e["plans"] if p["stage"] == 1]
    return e["roster"][plan["sources"][-1]]  # stage 2: a source of the weighted average, not the leader


def _spare_during_join(events):
    e = _published(events, 1)
    return e["roster"][1] if e else None  # the spare named for the lost stage


def _rebuilt_before_first_step(events):
    e = next((e for e in events if e["event"] == "rebuilt"), None)
    return e["peer"] if e else None


def _finish(proc):
    try:
        out, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def _check_run(run_dir, num_steps):
    """Every step committed exactly once, and no peer trained a stage it did not hold valid weights for:
    a peer's metrics in an epoch come from an original stage peer, or from one whose stage was rebuilt on it
    in that epoch or an earlier one."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(num_steps))
    events = read_jsonl(run_dir / "events.jsonl")
    rebuilt_at = {}
    for e in events:
        if e["event"] == "rebuilt":
            rebuilt_at.setdefault(e["peer"], e["epoch"])
    originals = {e["peer"] for e in events if e["event"] == "epoch_joined" and e["joined_epoch"] == 0}
    for f in sorted((run_dir / "peers").glob("*/metrics.jsonl")):
        peer = f.parent.name
        epochs = {r["epoch"] for r in read_jsonl(f) if "loss/train" in r}
        if epochs and peer not in originals:
            assert peer in rebuilt_at and rebuilt_at[peer] <= min(epochs), (peer, epochs, rebuilt_at.get(peer))
    assert not any(e["event"] == "swarm_stopped" for e in events)
    return summary, events


@pytest.mark.parametrize(
    "trigger",
    [
        pytest.param(_leader_after_publish, marks=pytest.mark.long),  # the chaos soak lands it too
        pytest.param(_source_during_transfer, marks=pytest.mark.long),
        _spare_during_join,
        pytest.param(_rebuilt_before_first_step, marks=pytest.mark.long),
    ],
    ids=["leader-after-publish", "source-during-transfer", "spare-during-join", "rebuilt-before-first-step"],
)
def test_a_second_failure_during_the_recovery_is_survived(tmp_path, trigger):
    proc = run_swarm(
        tmp_path,
        "during",
        f"num_steps={STEPS}",
        "swarm.num_spares=3",
        "swarm.spare_delay_s=0.5",
        "recovery.strategy=checkfree",
        failures=[Failure(5, 1, "mid_forward", 0.5)],
        background=True,
    )
    run_dir = tmp_path / "during"
    try:
        victim = _kill_when(proc, run_dir, trigger)
        code, out = _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, out
    summary, events = _check_run(run_dir, STEPS)
    # the second loss was found in the peers' events and recovered, whoever it hit
    lost_peers = {r["lost_peer"] for r in summary["recovery_rows"] if r.get("completed")}
    assert victim in lost_peers, summary["recovery_rows"]
    assert summary["stage_losses"] >= 2


@pytest.mark.long  # ~35 s: keeps the default run under 15 minutes on 2 cores
def test_a_spare_whose_dht_view_is_empty_never_stops_a_healthy_swarm(tmp_path):
    """A spare arrives while the swarm trains, and for 8 s its DHT shows it no member record (as a freshly
    joined node whose routing table has not filled yet) but the epoch record. It would lead (no holder in its
    view) and find every stage lost; it must wait instead, and the run ends normally."""
    proc = run_swarm(tmp_path, "blind", "num_steps=100000", "swarm.num_spares=0", background=True)
    run_dir = tmp_path / "blind"
    spare = None
    try:
        deadline = time.monotonic() + 60
        while not _published(_peer_events(run_dir), 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        maddrs = (run_dir / "maddrs.txt").read_text().split()
        cmd = [sys.executable, "-m", "checkfree", "peer", str(run_dir / "config.yaml"), "membership.fault_blind_s=8"]
        cmd += ["--run-dir", str(run_dir), "--peer-id", "blind-spare", "--spare", "--initial-peers", *maddrs]
        spare = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60  # a loaded machine takes a while to start a peer
        started = lambda: any(
            e["event"] == "peer_started" and e["peer"].startswith("blind-spare.") for e in _peer_events(run_dir)
        )
        while not started() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started(), "the spare did not start within 60 s"
        time.sleep(10)  # the rest of its blind spell and then some
        assert proc.poll() is None, "the swarm stopped"
        events = _peer_events(run_dir)
        assert not any(e["event"] == "swarm_stopped" for e in events)
        # it published nothing: it read the members' records from their probe ports (so it did not lead), or
        # it held back because its view was partial
        published = [e for e in events if e["event"] in ("epoch_published", "swarm_stopped")]
        assert not any(e["peer"].startswith("blind-spare.") for e in published)
    finally:
        for p in (proc, spare):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in (proc, spare):
            if p is not None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)


@pytest.mark.long
def test_dht_timeouts_everywhere_are_retried_and_a_failure_still_recovers(tmp_path):
    """Every peer and the launcher see 30% of their DHT calls time out: no peer dies of it."""
    code, out, run_dir = run_swarm(
        tmp_path,
        "flaky",
        f"num_steps={STEPS}",
        "swarm.num_spares=1",
        "membership.fault_timeout_rate=0.3",
        "membership.dht_timeout_s=1",
        failures=[Failure(10, 2, "mid_forward", 0.5)],
    )
    assert code == 0, out
    summary, _ = _check_run(run_dir, STEPS)
    assert any(r["completed"] and r["stage"] == 2 for r in summary["recovery_rows"])
    assert set(summary["exit_codes"].values()) <= {0, -9, 143}  # nobody crashed (143: a spare ended at the end)


@pytest.mark.long
def test_the_epoch_record_is_refreshed_for_as_long_as_the_swarm_runs(tmp_path):
    """With a 2 s epoch expiry, the first failure comes long after the record would have expired: it is
    decided as the next epoch of a known swarm (not as a new swarm), and recovered."""
    code, out, run_dir = run_swarm(
        tmp_path,
        "refresh",
        "num_steps=200",
        "membership.epoch_ttl_s=2",
        "swarm.num_spares=1",
        failures=[Failure(150, 2, "mid_forward", 0.5)],
    )
    assert code == 0, out
    summary, events = _check_run(run_dir, 200)
    published = [e for e in events if e["event"] == "epoch_published"]
    assert [e["new_epoch"] for e in published][:2] == [0, 1] and published[1]["lost"] == [2]
    assert published[1]["time"] - published[0]["time"] > 4  # two expiries passed in between


@pytest.mark.long
@pytest.mark.timeout(900)
def test_chaos_thirty_events_with_failures_during_recoveries(tmp_path):
    """swarm.chaos lands 30 events of every kind (kills, bursts, waves, hangs, the leader after it publishes,
    a source during the transfer, a spare during its join, a rebuilt stage before its first step, spares
    killed and arriving) on one swarm: it finishes, every step committed once, no stage trained from
    weights not rebuilt for it, nothing left running; its final loss is printed beside the failure-free
    engine's on the same model, seed and steps."""
    from checkfree.engine.trainer import Trainer
    from tests.helpers import tiny_config

    steps = 1500
    code, out, run_dir = run_swarm(
        tmp_path,
        "chaos",
        f"num_steps={steps}",
        "eval_every_steps=500",
        "swarm.num_spares=3",
        "swarm.chaos.events=30",
        "swarm.chaos.seed=7",
        "swarm.chaos.mean_gap_s=1.0",
        timeout_s=800,
    )
    assert code == 0, out
    summary, events = _check_run(run_dir, steps)
    chaos = [e for e in read_jsonl(run_dir / "launcher-events.jsonl") if e["event"] == "chaos"]
    assert len(chaos) >= 30, f"only {len(chaos)} chaos events landed before the run ended"
    kinds = {e["kind"] for e in chaos}
    assert len(kinds) >= 6, kinds
    reference = Trainer(tiny_config(tmp_path, f"num_steps={steps}", "eval_every_steps=500", "run_name=reference"))
    ref = reference.run()
    print(
        f"chaos: {len(chaos)} events {sorted(kinds)}, {summary['stage_losses']} stage losses, final val loss "
        f"{summary['final_val_loss']:.4f} vs failure-free {ref['final_val_loss']:.4f}"
    )
    assert summary["final_val_loss"] < summary["first_train_loss"]


@pytest.mark.long  # ~48 s: the chaos soak's bursts and waves cover it; keeps the default run under 15 minutes
def test_a_burst_of_every_stage_but_one_is_rebuilt_from_the_survivor(tmp_path):
    """Stages 0, 1 and 2 of 4 killed in the same step (L-1 at once): everything is rebuilt from stage 3,
    the only source left, in one epoch, and each loss is recorded."""
    fails = [Failure(5, s, "mid_forward", 0.5) for s in (0, 1, 2)]
    code, out, run_dir = run_swarm(
        tmp_path, "burst", f"num_steps={STEPS}", "swarm.num_spares=3", "recovery.strategy=checkfree", failures=fails
    )
    assert code == 0, out
    summary, events = _check_run(run_dir, STEPS)
    rows = [r for r in summary["recovery_rows"] if r["completed"]]
    assert sorted(r["stage"] for r in rows) == [0, 1, 2]
    assert all(r["sources"] == [3] for r in rows), rows  # never from another lost stage
    assert len({r["epoch"] for r in rows}) == 1  # one epoch


@pytest.mark.long  # ~30 s
def test_a_peer_whose_data_plane_nobody_reaches_is_declared_lost(tmp_path):
    """From step 15 on, stage 2's peer heartbeats and answers its probe but its data plane is cut (its
    connections drop, no group forms). Every epoch with it breaks; after swarm.max_reforms
    re-formations the leader declares it lost (the other members blame it), a spare rebuilds stage 2, and
    the run ends normally: the swarm neither re-forms forever nor stops."""
    code, out, run_dir = run_swarm(
        tmp_path,
        "cut",
        f"num_steps={STEPS}",
        "swarm.num_spares=1",
        "swarm.max_reforms=2",
        "transport.fault_cut_peer=s2-03",
        "transport.fault_cut_at_step=15",
    )
    assert code == 0, out
    summary, events = _check_run(run_dir, STEPS)
    (excluded,) = [e for e in events if e["event"] == "peer_excluded"]
    assert excluded["excluded"].startswith("s2-03.") and excluded["stage"] == 2
    assert 2 * excluded["blamed_by"] > excluded["voters"] >= 1  # a majority of the members that reported
    rebuilt = [e for e in events if e["event"] == "rebuilt" and e["stage"] == 2]
    assert rebuilt and not rebuilt[0]["peer"].startswith("s2-03.")
    assert any(e["event"] == "replaced" and e["peer"].startswith("s2-03.") for e in events)
