"""summary.json's ``attacks``: the peers' counters summed, and the evictions of a peer no failure explains."""

import json
from types import SimpleNamespace

import pytest

from checkfree.core.events import EVENTS
from launcher.attacks import attacks, counter_totals, healthy_evictions
from launcher.report import merge_run

HANG_S = 1.5  # membership.hang_s
# what merge_run reads of a run's config
CFG = SimpleNamespace(recovery=SimpleNamespace(strategy="checkfree"), membership=SimpleNamespace(hang_s=HANG_S))


def _ev(t: float, event: str, **fields) -> dict:
    missing = set(EVENTS[event].required) - set(fields)
    assert not missing, f"{event} lacks {missing}"  # the fixtures follow the schema the peers write
    return {"time": t, "event": event, **fields}


def _peer(t: float, event: str, peer: str, epoch: int = 0, held: int | None = None, **fields) -> dict:
    return _ev(t, event, peer=peer, epoch=epoch, stage_held=held, **fields)


def _spawned(t: float, peer: str) -> dict:
    return _ev(t, "peer_spawned", peer=peer, pid=1000, stage=None)


def _started(t: float, peer: str) -> dict:
    return _peer(t, "peer_started", peer, role="stage", pid=1000)


def _counters(t: float, peer: str, **counts: int) -> dict:
    return _peer(t, "peer_counters", peer, counters=counts)


def _replaced(t: float, peer: str, stage: int, by_epoch: int) -> dict:
    return _peer(t, "replaced", peer, by_epoch - 1, stage, by_epoch=by_epoch)


def _failure(t: float, peer: str, stage: int, signal: str, injected_by: str = "launcher") -> dict:
    return _ev(t, "failure", stage=stage, peer=peer, pid=1000, signal=signal, step=5, epoch=0, iteration=5) | {
        "injected_by": injected_by
    }


def _chaos(t: float, kind: str, peers: list[str], signal: str) -> dict:
    return _ev(t, "chaos", kind=kind, peers=peers, signal=signal, spares=0)


def _by_time(*events: dict) -> list[dict]:
    return sorted(events, key=lambda e: e["time"])


def _published(t: float, new_epoch: int, roster: list[str], lost: list[int]) -> dict:
    fields = dict(new_epoch=new_epoch, roster=roster, step=4, lost=lost, plans=[], rollback_to=None, reason="recover")
    return _peer(t, "epoch_published", roster[0], new_epoch - 1, **fields)


def _healthy(peer: str, stage: int, epoch: int, t: float, how: str = "replaced", **fields) -> dict:
    """A row of ``healthy_evictions`` for a peer nothing benign hit, unless ``fields`` say otherwise."""
    row = {"peer": peer, "how": how, "stage": stage, "epoch": epoch, "time": t, "by_epoch": epoch}
    return row | {"excluded": False, "benign_chaos": [], "hits": []} | fields


# ---- counters ---------------------------------------------------------------------------------------
def test_each_peers_last_counters_are_summed_key_by_key():
    events = _by_time(
        _spawned(0.0, "p0"),
        _spawned(0.0, "p1"),
        _started(1.0, "p0"),
        _started(1.0, "p1"),
        _counters(50.0, "p0", asks=10, shed=2, gate_refused=1),
        _counters(51.0, "p1", asks=7, shed=0, records_foreign=3),
    )
    totals, with_counters, without = counter_totals(events)
    assert totals == {"asks": 17, "gate_refused": 1, "records_foreign": 3, "shed": 2}
    assert (with_counters, without) == (2, 0)


def test_a_peer_killed_before_it_wrote_counters_is_counted_as_without():
    events = _by_time(
        _spawned(0.0, "p0"),
        _spawned(0.0, "p1"),
        _spawned(0.0, "p2"),
        _started(1.0, "p0"),
        _started(1.0, "p1"),  # SIGKILL at 10 s: no peer_counters
        _failure(10.0, "p1", 1, "SIGKILL"),
        _counters(50.0, "p0", asks=10, timeouts=1),
        # p2 died before its first event
    )
    totals, with_counters, without = counter_totals(events)
    assert totals == {"asks": 10, "timeouts": 1} and (with_counters, without) == (1, 2)


def test_a_peer_id_restarted_counts_each_process_and_a_peer_the_launcher_did_not_spawn_counts_too():
    events = _by_time(
        _started(1.0, "p0"),  # a checkfree peer started by hand: only its own events
        _counters(20.0, "p0", asks=5, shed=1),
        _started(30.0, "p0"),  # the same id again: a new process, counting from 0
        _counters(60.0, "p0", asks=2, shed=4),
        _started(61.0, "p0"),  # a third one, still running at the report
    )
    totals, with_counters, without = counter_totals(events)
    assert totals == {"asks": 7, "shed": 5} and (with_counters, without) == (2, 1)


# ---- healthy evictions ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fault",
    [
        _failure(10.0, "p1", 1, "SIGSTOP"),  # frozen by the launcher's injection
        _failure(10.0, "p1", 1, "SIGSTOP", injected_by="peer"),  # frozen at its own drawn failure
        _failure(10.0, "p1", 1, "LINK_DOWN", injected_by="peer"),  # its host vanished
        _chaos(10.0, "hang", ["p1"], "SIGSTOP"),  # chaos, read from the chaos event alone
    ],
    ids=["launcher-hang", "self-hang", "self-vanish", "chaos-hang"],
)
def test_a_replaced_peer_with_a_fault_before_it_is_no_healthy_eviction(fault):
    events = _by_time(_started(1.0, "p1"), fault, _replaced(15.0, "p1", 1, by_epoch=2))
    assert healthy_evictions(events, HANG_S) == []


def test_a_replaced_peer_hung_by_chaos_is_not_healthy():
    events = _by_time(
        _started(1.0, "p1"),
        _chaos(10.0, "hang", ["p1"], "SIGSTOP"),
        _failure(10.0, "p1", 1, "SIGSTOP") | {"kind": "hang", "iteration": -1},
        _replaced(15.0, "p1", 1, by_epoch=2),
    )
    assert attacks(events, HANG_S)["num_healthy_evictions"] == 0


def test_a_replaced_peer_no_fault_explains_is_counted_and_listed():
    events = _by_time(
        _started(1.0, "p1"),
        _started(1.0, "p2"),
        _failure(10.0, "p2", 2, "SIGKILL"),  # another peer's fault explains nothing about p1
        _replaced(15.0, "p1", 1, by_epoch=3),
        _chaos(16.0, "kill", ["p1"], "SIGKILL"),  # after it learnt it was replaced, while leaving
    )
    summary = attacks(events, HANG_S)
    assert summary["num_healthy_evictions"] == 1
    assert summary["healthy_evictions"] == [_healthy("p1", 1, 3, 15.0)]


def test_a_peer_replaced_under_benign_chaos_is_a_healthy_eviction_that_names_it():
    """A starvation (SIGSTOP pulses shorter than membership.hang_s) or a probe flood fails nothing."""
    starve = _chaos(10.0, "starve", ["p1", "p2"], "SIGSTOP") | {"benign": True, "duration_s": 4.0}
    flood = _chaos(11.0, "probe_flood", ["p1"], "none") | {"benign": True, "target": ["127.0.0.1", 4000]}
    late_flood = _chaos(30.0, "probe_flood", ["p1"], "none") | {"benign": True}
    events = _by_time(_started(1.0, "p1"), starve, flood, _replaced(15.0, "p1", 1, by_epoch=2), late_flood)
    (row,) = healthy_evictions(events, HANG_S)
    assert (row["peer"], row["by_epoch"], row["benign_chaos"]) == ("p1", 2, ["starve", "probe_flood"])


def test_a_healthy_eviction_the_leader_decided_on_blame_says_so():
    excluded = _peer(
        14.0, "peer_excluded", "p0", 1, 0, excluded="p1", stage=1, blamed_by=2, voters=2, reforms=3, reason="blame"
    )
    events = _by_time(_started(1.0, "p1"), excluded, _replaced(15.0, "p1", 1, by_epoch=2))
    (row,) = healthy_evictions(events, HANG_S)
    assert row["excluded"] and row["by_epoch"] == 2


def test_a_peer_declared_lost_under_benign_chaos_is_a_healthy_eviction_of_the_report_too():
    """The soak's rule and the report's are one: a stage given away while a starvation hit its holder counts in
    summary.json, though the peer never got to log ``replaced``."""
    starve = _chaos(10.0, "starve", ["p1"], "SIGSTOP") | {"benign": True, "duration_s": 3.0}
    events = _by_time(_published(1.0, 0, ["p0", "p1"], []), starve, _published(14.0, 1, ["p0", "p2"], [1]))
    hit = {"kind": "starve", "start": 10.0, "end": 13.0}
    assert attacks(events, HANG_S)["healthy_evictions"] == [
        _healthy("p1", 1, 1, 14.0, how="lost", benign_chaos=["starve"], hits=[hit])
    ]
    late = _by_time(*events[:2], _published(30.0, 1, ["p0", "p2"], [1]))  # long after the starvation: a crash
    assert healthy_evictions(late, HANG_S) == []


def test_a_kill_logged_just_after_a_loss_explains_it_but_not_a_replaced_the_peer_logged_first():
    """The launcher logs a kill just after sending it, so the leader may publish the loss first; a peer that
    logged ``replaced`` was still running then, so a kill logged after it explains nothing."""
    starve = _chaos(10.0, "starve", ["p1"], "SIGSTOP") | {"benign": True, "duration_s": 3.0}
    lost = _by_time(
        _published(1.0, 0, ["p0", "p1"], []),
        starve,
        _published(14.0, 1, ["p0", "p2"], [1]),
        _chaos(14.3, "kill", ["p1"], "SIGKILL"),
    )
    assert healthy_evictions(lost, HANG_S) == []
    replaced = _by_time(
        _started(1.0, "p1"), _replaced(15.0, "p1", 1, by_epoch=2), _chaos(15.3, "kill", ["p1"], "SIGKILL")
    )
    assert healthy_evictions(replaced, HANG_S) == [_healthy("p1", 1, 2, 15.0)]


# ---- summary.json ---------------------------------------------------------------------------------
def test_the_summary_holds_the_attacks_next_to_the_fields_it_had(tmp_path):
    launcher = [_spawned(0.0, "p0"), _spawned(0.0, "p1"), _spawned(0.0, "p2"), _failure(10.0, "p2", 2, "SIGKILL")]
    peers = {
        "p0": [_started(1.0, "p0"), _counters(40.0, "p0", shed=3, gate_shed=1, knocks=9)],
        "p1": [_started(1.0, "p1"), _replaced(20.0, "p1", 1, by_epoch=1), _counters(21.0, "p1", shed=1, knocks=2)],
        "p2": [_started(1.0, "p2")],  # killed: no counters
    }
    (tmp_path / "launcher-events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in launcher))
    for pid, events in peers.items():
        (tmp_path / "peers" / pid).mkdir(parents=True)
        (tmp_path / "peers" / pid / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    summary = merge_run(tmp_path, CFG)
    assert summary["attacks"] == {
        "counters": {"gate_shed": 1, "knocks": 11, "shed": 4},
        "peers_with_counters": 2,
        "peers_without_counters": 1,
        "num_healthy_evictions": 1,
        "healthy_evictions": [_healthy("p1", 1, 1, 20.0)],
    }
    assert summary["injected_failures"] == 1 and summary["failures"] == 1  # the existing fields, as before
    assert json.loads(json.dumps(summary)) == summary
