"""Membership on a real hivemind DHT (two nodes on localhost, unique run ids per test)."""

import os
import time
import uuid

import pytest

from checkfree.swarm.config import MembershipConfig
from checkfree.swarm.membership import DHTUnavailable, Membership
from checkfree.swarm.records import EpochRecord, MemberRecord
from tests.helpers import TEST_TOKEN, admission, descendants, kill_and_reap, poll, sigkill_dht_process

CFG = MembershipConfig(period_s=0.2, ttl_s=1.0, dht_timeout_s=3.0)


@pytest.fixture(scope="module")
def pair():
    run = "t-" + uuid.uuid4().hex[:6]
    a = Membership(CFG, run, "fp1", admission=admission("a"))
    b = Membership(CFG, run, "fp1", a.visible_maddrs(), admission=admission("b"))
    yield a, b
    a.shutdown()
    b.shutdown()


def record(m: Membership, fingerprint: str = "fp1", run_id: str | None = None, step: int = 3) -> MemberRecord:
    """A member record of ``m``'s own id (a node stores records under its own id only)."""
    return MemberRecord(
        run_id=run_id or m.run_id,
        fingerprint=fingerprint,
        peer_id=m.admission.peer_id,
        stage=1,
        epoch=0,
        state="running",
        step=step,
    )


@pytest.fixture
def third(pair):
    """A third node of the pair's swarm, with an identity of its own."""
    c = Membership(CFG, pair[0].run_id, "fp1", pair[0].visible_maddrs(), admission=admission("c"))
    yield c
    c.shutdown()


def test_heartbeat_is_seen_by_another_peer_and_expires(pair, third):
    a, b = pair
    me = third.admission.peer_id
    assert third.heartbeat(record(third))
    seen = poll(lambda: b.members().get(me))
    assert seen is not None and seen.step == 3 and seen.stage == 1
    t0 = time.time()
    assert poll(lambda: me not in b.members(), timeout_s=4.0)  # no more heartbeats: gone after the TTL
    assert time.time() - t0 < CFG.ttl_s + 3.0  # loose: a loaded 2-core machine delays the poll


def test_tombstone_removes_a_peer_at_once(pair, third):
    a, b = pair
    me = third.admission.peer_id
    third.heartbeat(record(third))
    assert poll(lambda: me in b.members())
    third.tombstone(me)
    assert poll(lambda: me not in b.members(), timeout_s=0.5)


def test_records_of_another_model_are_ignored_and_of_another_run_or_malformed_refused(pair, third, caplog):
    a, b = pair
    third.heartbeat(record(third, fingerprint="other-model"))
    foreign = third.admission.peer_id
    assert poll(lambda: foreign not in b.members() and "ignoring record " + foreign in caplog.text)
    assert "other-model" in caplog.text
    assert foreign not in b.members()
    # refused by the nodes' validators: neither stored nor returned
    assert not third.heartbeat(record(third, run_id="someone-else"))
    assert not third._store(f"{a.run_id}/members", foreign, {"peer_id": foreign, "stage": "two"}, 5)
    # over the size bound: refused before it reaches the DHT process (whose pipe a message this large once
    # tore); the nodes' own refusal of an over-size sealed blob is checked on the validator below
    assert not third._store(f"{a.run_id}/members", foreign, {"x": "y" * 140_000}, 5)
    assert "over the bound" in caplog.text
    assert not third._store(f"{a.run_id}/other-key", "x", 1, 5)  # a key this swarm does not use
    assert not third._store(f"{a.run_id}/members", foreign, record(third).model_dump(), 7200)  # expires too late
    a.heartbeat(record(a))
    members = poll(lambda: (m := b.members()) and a.admission.peer_id in m and m)
    assert foreign not in members


def test_a_heartbeat_under_another_peers_id_is_refused(pair, third):
    """A holder of the token cannot speak for another peer: the subkey must be its own id (the hash of its
    key), and a record naming another id is refused by every node that would store or return it."""
    a, b = pair
    victim = a.admission.peer_id
    forged = record(third).model_copy(update={"peer_id": victim, "step": 999})
    assert not third._store(f"{a.run_id}/members", victim, forged.model_dump(), 5)
    assert not third._store(f"{a.run_id}/members", third.admission.peer_id, forged.model_dump(), 5)
    a.heartbeat(record(a, step=5))
    assert poll(lambda: (r := b.members().get(victim)) and r.step == 5)
    time.sleep(0.3)
    assert b.members()[victim].step == 5


def test_a_node_without_the_token_can_neither_plant_nor_serve_records(pair):
    """An outsider joins the DHT (its addresses are public) with another token: whatever it stores stays on its
    own node, and the swarm's nodes refuse the records it returns to their queries."""
    from checkfree.swarm.admission import new_token

    a, b = pair
    outsider = Membership(CFG, a.run_id, "fp1", a.visible_maddrs(), admission=admission("o", token=new_token()))
    try:
        me = outsider.admission.peer_id
        outsider.heartbeat(record(outsider))
        stop = EpochRecord(
            run_id=a.run_id,
            fingerprint="fp1",
            epoch=99,
            roster=[],
            store_host="",
            store_port=0,
            step=0,
            leader=me,
            stop="hijack",
        )
        outsider.publish_epoch(stop)
        assert me in outsider.members()  # its own node holds it ...
        for _ in range(10):
            assert me not in b.members() and me not in a.members()  # ... no node of the swarm returns it
            current = b.current_epoch()
            assert current is None or current.stop is None
            time.sleep(0.1)
        # nor does a record it seals pass as a probe answer or a pushed epoch
        assert b.open_member(outsider.seal_member(record(outsider)), me) is None
        assert b.open_epoch(outsider.seal_epoch(stop)) is None
        # a record sealed by one member is not accepted as another's probe answer
        assert b.open_member(a.seal_member(record(a)), me) is None
        assert b.open_member(a.seal_member(record(a)), a.admission.peer_id) is not None
    finally:
        outsider.shutdown()


def test_a_node_of_another_swarm_with_the_same_token_and_run_id_can_neither_plant_nor_serve_records(pair):
    """A second swarm started with the same token and run id (an exported token reused, a restart in one run
    directory) has another swarm id: its records, a stop among them, are refused by this swarm's nodes."""
    from checkfree.swarm.admission import Admission, Identity

    a, b = pair
    assert a.admission.swarm_id is None  # the pair seals without an id; the other swarm with one
    other = Admission(TEST_TOKEN, Identity("o"), "f" * 32)
    outsider = Membership(CFG, a.run_id, "fp1", a.visible_maddrs(), admission=other)
    try:
        me = outsider.admission.peer_id
        outsider.heartbeat(record(outsider))
        stop = EpochRecord(
            run_id=a.run_id, fingerprint="fp1", epoch=99, roster=[], store_host="", store_port=0, step=0, leader=me
        ).model_copy(update={"stop": "replayed"})
        outsider.publish_epoch(stop)
        assert me in outsider.members()
        for _ in range(10):
            assert me not in b.members() and me not in a.members()
            current = b.current_epoch()
            assert current is None or current.stop is None
            time.sleep(0.1)
        assert b.open_epoch(outsider.seal_epoch(stop)) is None
        assert b.tally.counts()[0] > 0  # counted as foreign, like another token's: a joiner is told why
    finally:
        outsider.shutdown()


def test_epoch_records_count_only_from_their_leader_or_roster(pair, third):
    a, b = pair
    me = third.admission.peer_id
    rec = EpochRecord(
        run_id=a.run_id, fingerprint="fp1", epoch=3, roster=[me, "y"], store_host="h", store_port=1, step=7, leader=me
    )
    assert third.publish_epoch(rec)
    assert poll(lambda: (e := b.current_epoch()) and e.epoch == 3) and b.current_epoch() == rec
    # a stop signed by a node that is neither the leader nor in the roster is refused
    stop = rec.model_copy(update={"epoch": 4, "roster": [], "leader": "x", "stop": "hijack"})
    assert not third.publish_epoch(stop)
    # pushed epochs (probe knocks) are checked the same way
    assert b.open_epoch(third.seal_epoch(rec)) == rec
    assert b.open_epoch(third.seal_epoch(stop)) is None
    time.sleep(0.3)
    assert b.current_epoch().epoch == 3


def test_epoch_records_are_per_fingerprint(pair):
    a, b = pair
    me = a.admission.peer_id
    rec = EpochRecord(
        run_id=a.run_id, fingerprint="fp1", epoch=2, roster=[me, "y"], store_host="h", store_port=1, step=7, leader=me
    )
    a.publish_epoch(rec)
    assert poll(lambda: (e := b.current_epoch()) and e.epoch >= 2)
    before = b.current_epoch()
    intruder = Membership(CFG, a.run_id, "fp2", a.visible_maddrs(), admission=admission("i"))
    try:
        intruder.publish_epoch(rec.model_copy(update={"fingerprint": "fp2", "epoch": 2, "stop": "hijack"}))
        time.sleep(0.3)
        assert b.current_epoch() == before  # this swarm's epochs are untouched
    finally:
        intruder.shutdown()


def test_calls_fail_fast_when_the_dht_process_is_gone():
    m = Membership(CFG, "t-dead", "fp", admission=admission())
    sigkill_dht_process(m.dht)
    assert poll(lambda: not m.dht.is_alive(), timeout_s=5)
    t0 = time.time()
    with pytest.raises(DHTUnavailable):
        m.members()
    assert time.time() - t0 < 1.0


def test_a_dht_process_that_never_becomes_ready_is_ended_and_reported():
    """The DHT process cannot report that it is ready (the lock it sends under is held here, as a killed
    sibling process could leave it): the peer gets DHTUnavailable after 2 x startup_timeout_s, not a hang,
    and neither the DHT process nor its p2p daemon is left running."""
    from hivemind.utils.mpfuture import MPFuture

    before = descendants(os.getpid())
    cfg = MembershipConfig(period_s=0.2, ttl_s=1.0, dht_timeout_s=3.0, startup_timeout_s=2.0)
    t0 = time.monotonic()
    with MPFuture._update_lock, pytest.raises(DHTUnavailable, match=r"not ready within 4.0 s"):
        Membership(cfg, "t-stuck", "fp", admission=admission())
    assert 3.5 < time.monotonic() - t0 < 30
    kill_and_reap(set(), keep=before)
    assert poll(lambda: not (descendants(os.getpid()) - before), timeout_s=30)  # slow to exit on a loaded machine


def test_timeouts_are_retried_and_a_dead_dht_process_is_told_apart():
    """Injected timeouts (membership.fault_timeout_rate) are retried with backoff, so most calls succeed;
    when the DHT process itself dies, every call says so (DHTGone) instead of timing out, and the peer leaves."""
    from checkfree.swarm.membership import DHTGone

    run = "t-" + uuid.uuid4().hex[:6]
    flaky = MembershipConfig(period_s=0.2, ttl_s=1.0, dht_timeout_s=3.0, dht_retries=3, fault_timeout_rate=0.3)
    m = Membership(flaky, run, "fp1", admission=admission())
    daemons = set(descendants(m.dht.pid))  # its p2pd, orphaned by the kill below: ended here as its host would
    try:
        ok = 0
        for i in range(8):
            try:
                ok += bool(m.heartbeat(record(m, step=i)))
            except DHTUnavailable:
                pass  # all 4 attempts failed: p = 0.3^4 per call
        assert ok >= 6
        sigkill_dht_process(m.dht)
        assert poll(lambda: not m.dht.is_alive(), timeout_s=5)
        with pytest.raises(DHTGone, match="DHT process has exited"):
            m.members()
    finally:
        m.shutdown()
        kill_and_reap(daemons, keep=descendants(os.getpid()) - daemons)


@pytest.fixture
def trio():
    """Three nodes of a swarm of their own (no epochs of other tests)."""
    run = "t-" + uuid.uuid4().hex[:6]
    a = Membership(CFG, run, "fp1", admission=admission("a"))
    nodes = [a] + [Membership(CFG, run, "fp1", a.visible_maddrs(), admission=admission(n)) for n in "bc"]
    yield nodes
    for m in nodes:
        m.shutdown()


def test_a_token_holder_cannot_stop_the_swarm_with_a_record_of_its_own(trio):
    """A spare holds the token: it may store a stop record naming itself leader (its seal is valid), at epoch
    99999999 or at the next epoch. Neither is the swarm's current epoch: the first lies past any gap the chain
    allows, the second comes from a peer the epoch before does not allow to stop it. The real next epoch,
    from a member, still goes on past it; a finish mark counts only from the finished epoch's roster."""
    a, b, third = trio
    me, spare = a.admission.peer_id, third.admission.peer_id
    base = EpochRecord(
        run_id=a.run_id,
        fingerprint="fp1",
        epoch=20,
        roster=[me, "y"],
        store_host="h",
        store_port=1,
        step=7,
        leader=me,
        spares=[spare],
    )
    assert a.publish_epoch(base)
    assert poll(lambda: (e := b.current_epoch()) and e.epoch == 20)
    for n in (99999999, 21):
        stop = base.model_copy(update={"epoch": n, "roster": [], "leader": spare, "stop": "hijack", "spares": []})
        assert third.publish_epoch(stop)  # sealed by its named leader: stored
    time.sleep(0.5)
    assert b.current_epoch().epoch == 20 and b.current_epoch().stop is None
    assert third.mark_finished(20)  # a spare is not in epoch 20's roster
    time.sleep(0.5)
    assert not b.current_epoch().finished
    assert a.publish_epoch(base.model_copy(update={"epoch": 22, "step": 9}))  # the real next epoch
    assert poll(lambda: (e := b.current_epoch()) and e.epoch == 22)
    assert a.mark_finished(22)
    assert poll(lambda: b.current_epoch().finished)
