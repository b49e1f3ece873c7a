"""The launcher's chaos injector on synthetic member records and event logs (no processes)."""

import json
import signal

from checkfree.swarm.config import ChaosConfig
from checkfree.swarm.records import EpochRecord, Lineage, MemberRecord
from launcher.chaos import Chaos


def _rec(pid, stage, state="running", lineage="initial"):
    return MemberRecord(
        run_id="r",
        fingerprint="f",
        peer_id=pid,
        stage=stage,
        epoch=0,
        state=state,
        step=5,
        lineage=Lineage(kind=lineage),
    )


def _epoch():
    return EpochRecord(
        run_id="r",
        fingerprint="f",
        epoch=0,
        roster=["a", "b", "c", "d"],
        store_host="h",
        store_port=1,
        step=5,
        leader="a",
    )


def _members():
    out = {p: _rec(p, s) for s, p in enumerate("abcd")}
    out["s1"] = _rec("s1", -1, "spare", "none")
    return out


def _drain(chaos, members, current, live, t0=0.0, seconds=60.0):
    actions, t = [], t0
    while t < t0 + seconds and not chaos.done:
        a = chaos.poll(t, members, current, live)
        if a is not None:
            actions.append((a.kind, tuple(a.victims), a.sig, a.spares))
        t += 0.05
    return actions


def test_a_seed_replays_the_same_sequence(tmp_path):
    (tmp_path / "peers").mkdir()
    kinds = ["kill", "burst", "wave", "hang", "spare_kill", "spare_arrival"]
    runs = []
    for _ in range(2):
        chaos = Chaos(ChaosConfig(events=12, seed=3, mean_gap_s=0.5, kinds=kinds), 4, tmp_path / "peers")
        runs.append(_drain(chaos, _members(), _epoch(), set(_members())))
    assert runs[0] == runs[1] and len(runs[0]) == 12
    assert len({a[0] for a in runs[0]}) >= 4  # several kinds drawn
    other = Chaos(ChaosConfig(events=12, seed=4, mean_gap_s=0.5, kinds=kinds), 4, tmp_path / "peers")
    assert _drain(other, _members(), _epoch(), set(_members())) != runs[0]


def test_bursts_and_waves_never_kill_the_last_valid_holder(tmp_path):
    (tmp_path / "peers").mkdir()
    members = _members()
    for p in "abc":  # only stage 3's peer has valid weights (the others are mid-rebuild)
        members[p] = members[p].model_copy(update={"lineage": Lineage(kind="none")})
    chaos = Chaos(
        ChaosConfig(events=20, seed=1, mean_gap_s=0.3, kinds=["burst", "wave", "kill"]), 4, tmp_path / "peers"
    )
    for kind, victims, sig, _ in _drain(chaos, members, _epoch(), set(members)):
        assert "d" not in victims and sig == signal.SIGKILL
        if kind == "burst":
            assert 2 <= len(victims) <= 3


def test_a_triggered_kind_waits_for_its_moment_in_the_peers_events(tmp_path):
    peers = tmp_path / "peers"
    (peers / "a").mkdir(parents=True)
    log = peers / "a" / "events.jsonl"
    log.write_text("")
    chaos = Chaos(ChaosConfig(events=2, seed=0, mean_gap_s=0.2, kinds=["leader_after_publish"]), 4, peers)
    members, current, live = _members(), _epoch(), set(_members())
    actions = [chaos.poll(t * 0.1, members, current, live) for t in range(20)]
    # drawn while the swarm is healthy: it first starts a recovery with a kill, then waits for the publish
    (kill,) = [a for a in actions if a is not None]
    assert kill.kind == "kill" and chaos.armed is not None and chaos.injected == 1
    published = {"event": "epoch_published", "time": 1.0, "peer": "b", "new_epoch": 1, "roster": list("abcd")}
    published.update(lost=[], plans=[], step=5)
    with open(log, "a") as f:
        f.write(json.dumps(published) + "\n")
    action = chaos.poll(2.5, members, current, live)
    assert action.kind == "leader_after_publish" and action.victims == ["b"] and chaos.done


def test_a_trigger_that_never_fires_is_dropped(tmp_path):
    (tmp_path / "peers").mkdir()
    cfg = ChaosConfig(events=2, seed=0, mean_gap_s=0.2, kinds=["rebuilt_before_first_step"], trigger_timeout_s=1.0)
    chaos = Chaos(cfg, 4, tmp_path / "peers")
    members = _members()
    members["b"] = members["b"].model_copy(update={"state": "recovering"})  # a recovery is under way: no kill
    _drain(chaos, members, _epoch(), set(members), seconds=3.0)
    assert chaos.dropped >= 1 and chaos.injected == 0


def test_a_wave_with_nobody_to_take_draws_again_later(tmp_path):
    (tmp_path / "peers").mkdir()
    members = {"d": _rec("d", 3)}  # only the protected valid holder is alive
    chaos = Chaos(ChaosConfig(events=1, seed=0, mean_gap_s=0.2, kinds=["wave"]), 4, tmp_path / "peers")
    assert _drain(chaos, members, _epoch(), {"d"}, seconds=2.0) == []
