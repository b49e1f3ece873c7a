"""The launcher's chaos injector on synthetic member records and event logs (no processes)."""

import json
import os
import selectors
import signal
import socket
import subprocess
import threading
import time

import pytest

from checkfree.swarm.config import ChaosConfig
from checkfree.swarm.records import EpochRecord, Lineage, MemberRecord
from launcher.attacks import healthy_evictions
from launcher.chaos import Action, Chaos
from launcher.effects import Effects, ProbeFlood, Starve
from tests.helpers import alive, poll


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


# ---- benign kinds: probe floods and starvations ------------------------------------------------------
def _with_probes(members):
    for s, p in enumerate("abcd"):
        members[p] = members[p].model_copy(update={"host": "127.0.0.1", "probe_port": 40000 + s})
    return members


def test_benign_kinds_draw_live_stage_peers_and_pulses_shorter_than_a_hang(tmp_path):
    (tmp_path / "peers").mkdir()
    members = _with_probes(_members())
    live = {"a", "c", "d", "s1"}  # b's process is gone (its record lingers)
    cfg = ChaosConfig(events=40, seed=5, mean_gap_s=0.3, kinds=["probe_flood", "starve"], num_pulses=4)
    chaos = Chaos(cfg, 4, tmp_path / "peers", hang_s=1.5)
    actions, t = [], 0.0
    while not chaos.done and t < 600:
        a = chaos.poll(t, members, _epoch(), live)
        if a is not None:
            actions.append((t, a))
        t += 0.05
    kinds = {a.kind for _, a in actions}
    assert kinds == {"probe_flood", "starve"} and len(actions) == 40
    for _, a in actions:
        assert a.benign and a.victims and set(a.victims) <= {"a", "c", "d"}  # live stage peers only
        if a.kind == "probe_flood":
            (victim,) = a.victims
            assert a.sig is None and a.target == ("127.0.0.1", members[victim].probe_port)
            assert a.duration_s == cfg.flood_s
        else:
            assert a.sig == signal.SIGSTOP and len(a.pulses) == 4
            assert all(0.3 * 1.5 <= stop <= 0.8 * 1.5 < 1.5 and run == 1.5 for stop, run in a.pulses)
            assert a.duration_s >= sum(stop + run for stop, run in a.pulses)
    # a peer under a starvation is not starved again before it ends (two at once could add up to a hang)
    starves = [(t, a) for t, a in actions if a.kind == "starve"]
    for i, (t, a) in enumerate(starves):
        for t2, b in starves[i + 1 :]:
            if t2 < t + a.duration_s:
                assert not set(a.victims) & set(b.victims)


def test_a_seed_replays_the_benign_draws_too(tmp_path):
    (tmp_path / "peers").mkdir()
    kinds = ["kill", "hang", "probe_flood", "starve"]
    runs = []
    for _ in range(2):
        chaos = Chaos(ChaosConfig(events=12, seed=9, mean_gap_s=0.5, kinds=kinds), 4, tmp_path / "peers")
        actions, t = [], 0.0
        while not chaos.done and t < 60:
            a = chaos.poll(t, _with_probes(_members()), _epoch(), set(_members()))
            if a is not None:
                actions.append((a.kind, tuple(a.victims), tuple(a.pulses)))
            t += 0.05
        runs.append(actions)
    assert runs[0] == runs[1] and {"probe_flood", "starve"} <= {k for k, _, _ in runs[0]}


def test_bad_benign_settings_are_refused():
    for bad in ({"pulse_max_frac": 1.0}, {"pulse_min_frac": 0.0}, {"pulse_min_frac": 0.9, "pulse_max_frac": 0.5}):
        with pytest.raises(ValueError, match="hang"):
            ChaosConfig(**bad)
    with pytest.raises(ValueError, match="flood_s"):
        ChaosConfig(flood_s=0)


class _Server:
    """A probe-like port that keeps every connection until the client closes it, and answers knocks."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.open = self.max_open = self.knocks = 0
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.closed.is_set():
            for key, _ in self.sel.select(0.05):
                if key.data is None:
                    try:
                        conn, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self.sel.register(conn, selectors.EVENT_READ, [b""])
                    self.open += 1
                    self.max_open = max(self.max_open, self.open)
                    continue
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                key.data[0] += data
                if not data or (key.data[0][:1] == b"!" and len(key.data[0]) >= 17):
                    if data:
                        self.knocks += 1
                        key.fileobj.send(b"k")
                    self.sel.unregister(key.fileobj)
                    key.fileobj.close()
                    self.open -= 1

    def close(self):
        self.closed.set()
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_probe_flood_holds_its_connections_knocks_and_closes_every_socket_when_it_ends():
    server = _Server()
    try:
        before = _fds()
        flood = ProbeFlood(("127.0.0.1", server.port), 200, 200.0, 1.5).start()
        assert poll(lambda: server.max_open >= 200, timeout_s=3.0)  # 200 held, plus the knocks in flight
        t0 = time.monotonic()
        assert flood.join(5.0), "the flood's thread did not end"
        assert time.monotonic() - t0 < 1.5
        c = flood.counts
        assert c["open"] == 0 and c["max_open"] >= 200 and c["refused"] == 0
        assert 150 <= c["knocks"] <= 320 and c["answered"] >= 100, c  # ~200 a second for 1.5 s
        assert poll(lambda: server.open == 0, timeout_s=3.0), f"{server.open} connections still open"
        assert _fds() == before  # every socket closed
        assert server.knocks == c["answered"]
    finally:
        server.close()


def test_a_probe_flood_stops_when_asked_and_refuses_addresses_beyond_this_machine():
    server = _Server()
    try:
        flood = ProbeFlood(("127.0.0.1", server.port), 50, 100.0, 60.0).start()
        flood.stop()
        assert flood.join(3.0) and flood.counts["open"] == 0
    finally:
        server.close()
    with pytest.raises(ValueError, match="loopback"):
        ProbeFlood(("8.8.8.8", 53), 10, 10.0, 1.0)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_starve_pulses_then_continues_its_peers_ends_its_busy_loops_and_never_continues_a_hang():
    peers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    effects = Effects(ChaosConfig())
    try:
        hung = peers[2]
        effects.hold(hung)  # chaos hangs it during the starvation
        os.kill(hung.pid, signal.SIGSTOP)
        starve = Starve(effects, peers, [(0.4, 0.3), (0.4, 0.3)], busy_s=1.0).start()
        assert poll(lambda: _state(peers[0].pid) == "T" and _state(peers[1].pid) == "T", timeout_s=1.0)
        assert poll(lambda: len(starve.busy_pids) == 3, timeout_s=2.0)  # one beside each peer
        busy = list(starve.busy_pids)
        assert all(alive(pid) for pid in busy)
        t0 = time.monotonic()
        assert starve.join(5.0)
        assert time.monotonic() - t0 < 3.0
        assert len(starve.stopped_s) == 2 and all(0.35 < s < 1.5 for s in starve.stopped_s), starve.stopped_s
        assert _state(peers[0].pid) != "T" and _state(peers[1].pid) != "T"  # continued
        assert _state(hung.pid) == "T"  # a hang stays a hang
        assert not any(alive(pid) for pid in busy)  # busy loops ended by PID
    finally:
        effects.close()
        for p in peers:
            p.kill()
            p.wait(5)


def test_closing_the_effects_ends_a_starvation_at_once_and_continues_its_peers():
    peer = subprocess.Popen(["sleep", "60"])
    effects = Effects(ChaosConfig())
    try:
        action = Action("starve", ["a"], sig=signal.SIGSTOP, pulses=[(1.2, 1.5)] * 3, busy_s=30.0, duration_s=30.0)
        starve = effects.start(action, [peer])
        assert poll(lambda: _state(peer.pid) == "T" and starve.busy_pids, timeout_s=2.0)
        effects.close(timeout_s=5.0)
        assert not starve.alive and _state(peer.pid) != "T"
        assert not any(alive(pid) for pid in starve.busy_pids)
    finally:
        peer.kill()
        peer.wait(5)


# ---- the soak's check: no peer evicted that chaos did not fail -------------------------------------------
def _published(epoch, t, lost, roster=("a", "b", "c", "d")):
    return {"event": "epoch_published", "time": t, "new_epoch": epoch, "roster": list(roster), "lost": lost}


def test_healthy_evictions_are_the_flooded_or_starved_peers_lost_and_any_unfailed_peer_replaced():
    events = [
        _published(0, 1.0, []),
        {"event": "chaos", "time": 10.0, "kind": "starve", "peers": ["b"], "signal": "SIGSTOP", "duration_s": 3.0},
        _published(1, 14.0, [1], ("a", "e", "c", "d")),  # b starved, then lost: a healthy eviction
        {"event": "chaos", "time": 20.0, "kind": "probe_flood", "peers": ["c"], "signal": "none", "duration_s": 3.0},
        {"event": "failure", "time": 21.0, "peer": "c", "stage": 2},
        {"event": "chaos", "time": 21.0, "kind": "hang", "peers": ["c"], "signal": "SIGSTOP"},
        _published(2, 23.0, [2], ("a", "e", "f", "d")),  # c flooded, but hung by chaos: a real failure
        _published(3, 60.0, [0], ("g", "e", "f", "d")),  # a: neither hit nor failed (a crash of its own)
        {"event": "replaced", "time": 70.0, "peer": "d", "by_epoch": 4, "stage_held": 3},  # never failed: healthy
        {"event": "chaos", "time": 80.0, "kind": "starve", "peers": ["e"], "signal": "SIGSTOP", "duration_s": 3.0},
        _published(4, 100.0, [1], ("g", "h", "f", "d")),  # e lost long after its starvation ended
        {"event": "chaos", "time": 110.0, "kind": "probe_flood", "peers": ["h"], "signal": "none", "duration_s": 3.0},
        # h's rebuild broke off (another peer died): its stage is lost again, and h rebuilds it again
        _published(5, 111.0, [1, 2], ("g", "h", "i", "d")),
    ]
    found = healthy_evictions(events, hang_s=1.5, grace_s=5.0)
    assert [(r["peer"], r["how"], r["stage"], r["epoch"]) for r in found] == [
        ("b", "lost", 1, 1),
        ("d", "replaced", 3, 4),
    ]
    assert found[0]["hits"] == [{"kind": "starve", "start": 10.0, "end": 13.0}]
    assert healthy_evictions(events[:2] + events[3:6], hang_s=1.5) == []
