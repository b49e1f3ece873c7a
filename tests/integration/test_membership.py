"""Membership on a real hivemind DHT (two nodes on localhost, unique run ids per test)."""

import os
import time
import uuid

import pytest

from checkfree.swarm.config import MembershipConfig
from checkfree.swarm.membership import DHTUnavailable, EpochRecord, MemberRecord, Membership
from tests.helpers import descendants, kill_and_reap, poll, sigkill_dht_process

CFG = MembershipConfig(period_s=0.2, ttl_s=1.0, dht_timeout_s=3.0)


@pytest.fixture(scope="module")
def pair():
    run = "t-" + uuid.uuid4().hex[:6]
    a = Membership(CFG, run, "fp1")
    b = Membership(CFG, run, "fp1", a.visible_maddrs())
    yield a, b
    a.shutdown()
    b.shutdown()


def record(m: Membership, peer_id: str, fingerprint: str = "fp1", run_id: str | None = None) -> MemberRecord:
    return MemberRecord(
        run_id=run_id or m.run_id, fingerprint=fingerprint, peer_id=peer_id, stage=1, epoch=0, state="running", step=3
    )


def test_heartbeat_is_seen_by_another_peer_and_expires(pair):
    a, b = pair
    assert a.heartbeat(record(a, "p-expire"))
    seen = poll(lambda: b.members().get("p-expire"))
    assert seen is not None and seen.step == 3 and seen.stage == 1
    t0 = time.time()
    assert poll(lambda: "p-expire" not in b.members(), timeout_s=4.0)  # no more heartbeats: gone after the TTL
    assert time.time() - t0 < CFG.ttl_s + 3.0  # loose: a loaded 2-core machine delays the poll


def test_tombstone_removes_a_peer_at_once(pair):
    a, b = pair
    a.heartbeat(record(a, "p-leave"))
    assert poll(lambda: "p-leave" in b.members())
    a.tombstone("p-leave")
    assert poll(lambda: "p-leave" not in b.members(), timeout_s=0.5)


def test_records_of_another_run_or_model_and_malformed_ones_are_ignored(pair, caplog):
    a, b = pair
    a.heartbeat(record(a, "p-foreign", fingerprint="other-model"))
    a.heartbeat(record(a, "p-otherrun", run_id="someone-else"))
    a._store(f"{a.run_id}/members", "p-garbage", {"peer_id": "p-garbage", "stage": "two"}, 5)
    a.heartbeat(record(a, "p-good"))
    members = poll(lambda: (m := b.members()) and "p-good" in m and m)
    assert "p-good" in members and not {"p-foreign", "p-otherrun", "p-garbage"} & set(members)
    assert "ignoring record p-foreign" in caplog.text and "other-model" in caplog.text
    assert "ignoring malformed record p-garbage" in caplog.text


def test_epoch_records_are_per_fingerprint(pair):
    a, b = pair
    rec = EpochRecord(
        run_id=a.run_id, fingerprint="fp1", epoch=2, roster=["x", "y"], store_host="h", store_port=1, step=7, leader="x"
    )
    a.publish_epoch(rec)
    assert poll(lambda: b.current_epoch()) == rec
    intruder = Membership(CFG, a.run_id, "fp2", a.visible_maddrs())
    try:
        intruder.publish_epoch(rec.model_copy(update={"fingerprint": "fp2", "epoch": 2, "stop": "hijack"}))
        time.sleep(0.3)
        assert b.current_epoch() == rec  # this swarm's epoch 2 is untouched
    finally:
        intruder.shutdown()


def test_calls_fail_fast_when_the_dht_process_is_gone():
    m = Membership(CFG, "t-dead", "fp")
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
        Membership(cfg, "t-stuck", "fp")
    assert 3.5 < time.monotonic() - t0 < 30
    kill_and_reap(set(), keep=before)
    assert poll(lambda: not (descendants(os.getpid()) - before), timeout_s=5)


def test_timeouts_are_retried_and_a_dead_dht_process_is_told_apart():
    """Injected timeouts (membership.fault_timeout_rate) are retried with backoff, so most calls succeed;
    when the DHT process itself dies, every call says so (DHTGone) instead of timing out, and the peer leaves."""
    from checkfree.swarm.membership import DHTGone

    run = "t-" + uuid.uuid4().hex[:6]
    flaky = MembershipConfig(period_s=0.2, ttl_s=1.0, dht_timeout_s=3.0, dht_retries=3, fault_timeout_rate=0.3)
    m = Membership(flaky, run, "fp1")
    daemons = set(descendants(m.dht.pid))  # its p2pd, orphaned by the kill below: ended here as its host would
    try:
        ok = 0
        for i in range(8):
            try:
                ok += bool(m.heartbeat(record(m, f"p{i}")))
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
