"""The leader's waiting, on an injected clock (no sleeping): it stops the swarm (publishing why) only after
waiting swarm.spare_wait_s for a spare in one wait, and a new wait starts the clock anew."""

import pytest

from checkfree.swarm.coordinator import SwarmStopped
from checkfree.swarm.leader import Leader
from checkfree.swarm.records import Lineage, MemberRecord
from tests.fakes import Clock, Membership, lost_stage_3
from tests.helpers import tiny_config


def _waiting_leader(tmp_path):
    """A leader, on an injected clock, that has just started waiting for a spare (swarm.spare_wait_s=0.3)."""
    cfg = tiny_config(tmp_path, "swarm.spare_wait_s=0.3")
    membership = Membership()
    clock = Clock()
    leader = Leader(cfg, "a", "l", "fp", membership, None, True, lambda *a, **k: None, clock=clock)
    members, current = lost_stage_3()
    leader.step(members, current, 3)
    return leader, membership, members, current, clock


def test_no_spare_for_longer_than_spare_wait_s_stops_the_swarm_with_a_stop_record(tmp_path):
    leader, membership, members, current, clock = _waiting_leader(tmp_path)
    assert "waiting for a spare for stages [3]" in leader.reason and not membership.published
    clock.t += 0.25
    leader.step(members, current, 3)
    assert not membership.published  # not yet
    clock.t += 0.1
    with pytest.raises(SwarmStopped, match="for more than swarm.spare_wait_s=0.3 s"):
        leader.step(members, current, 3)
    (stop,) = membership.published
    assert stop.stop and stop.epoch == 1 and "waiting for a spare" in stop.stop


def test_a_new_wait_starts_the_clock_anew(tmp_path):
    leader, membership, members, current, clock = _waiting_leader(tmp_path)
    clock.t += 0.35
    leader.waiting_since = None  # what the peer does at the start of each wait for an epoch
    leader.step(members, current, 3)
    assert not membership.published


def test_re_formations_at_one_step_with_nobody_lost_are_bounded(tmp_path):
    """Every member alive and valid, every epoch breaking before its first commit (say, a member whose data
    plane nobody can reach): the leader re-forms swarm.max_reforms times, then stops the swarm saying why."""
    cfg = tiny_config(tmp_path, "swarm.max_reforms=2")
    membership = Membership()
    leader = Leader(cfg, "a", "l", "fp", membership, None, True, lambda *a, **k: None)
    members, current = lost_stage_3()
    members["d"] = members["c"].model_copy(update={"peer_id": "d", "stage": 3, "error": "rendezvous timed out"})
    for n in (1, 2):
        leader.hosted.clear()
        leader.step(members, current, 3)
        current = membership.published[-1]
        assert current.reforms == n and current.step == 3 and current.lost == []
        members = {p: r.model_copy(update={"epoch": current.epoch}) for p, r in members.items()}
    with pytest.raises(SwarmStopped, match=r"3 epochs in a row broke at step 3 .* d: rendezvous timed out"):
        leader.step(members, current, 3)
    assert membership.published[-1].stop


def test_a_peer_every_other_member_blames_is_declared_lost_instead_of_stopping(tmp_path):
    """The re-formations run out, and the other members all blame stage 3 (its peer heartbeats and answers
    its probe, but nobody reaches its data plane): the leader declares that peer lost and the next epoch
    rebuilds stage 3 on a spare, instead of stopping the swarm."""
    cfg = tiny_config(tmp_path, "swarm.max_reforms=1")
    membership = Membership()
    events = []
    leader = Leader(cfg, "a", "l", "fp", membership, None, True, lambda name, **f: events.append((name, f)))
    members, current = lost_stage_3()
    members["d"] = members["c"].model_copy(update={"peer_id": "d", "stage": 3})
    members["e"] = members["c"].model_copy(update={"peer_id": "e", "stage": -1, "state": "spare", "epoch": -1})
    leader.step(members, current, 3)
    current = membership.published[-1]
    assert current.reforms == 1 and current.roster == ["a", "b", "c", "d"]
    members = {p: r.model_copy(update={"epoch": current.epoch}) if p != "e" else r for p, r in members.items()}
    for p in "abc":
        members[p] = members[p].model_copy(update={"blame": [3]})
    members["d"] = members["d"].model_copy(update={"blame": [0]})  # its own view: it blames someone else
    leader.hosted.clear()
    leader.step(members, current, 3)
    new = membership.published[-1]
    assert not new.stop and new.lost == [3] and new.roster == ["a", "b", "c", "e"] and new.reforms == 0
    ((name, fields),) = [e for e in events if e[0] == "peer_excluded"]
    assert fields["excluded"] == "d" and fields["blamed_by"] == 3 and fields["voters"] == 3


def test_no_peer_is_singled_out_without_a_majority():
    from checkfree.swarm.leader import blamed

    members, current = lost_stage_3()
    members["d"] = members["c"].model_copy(update={"peer_id": "d", "stage": 3})
    assert blamed(members, current) is None  # nobody blames anyone
    members["a"] = members["a"].model_copy(update={"blame": [3]})
    assert blamed(members, current) is None  # 1 of 3
    members["b"] = members["b"].model_copy(update={"blame": [3]})
    assert blamed(members, current) == ("d", 2, 3)  # 2 of 3
    members["c"] = members["c"].model_copy(update={"blame": [1, 2]})  # its own stage does not count
    members["d"] = members["d"].model_copy(update={"blame": [1]})
    assert blamed(members, current) is None  # stages 1 and 3 blamed alike


def test_a_committed_step_resets_the_count(tmp_path):
    cfg = tiny_config(tmp_path, "swarm.max_reforms=2")
    membership = Membership()
    leader = Leader(cfg, "a", "l", "fp", membership, None, True, lambda *a, **k: None)
    members, current = lost_stage_3()
    members["d"] = members["c"].model_copy(update={"peer_id": "d", "stage": 3})
    current = current.model_copy(update={"reforms": 2})
    members = {p: r.model_copy(update={"step": 4}) for p, r in members.items()}  # step 3 was committed
    leader.step(members, current, 4)
    assert membership.published[-1].reforms == 0


def test_a_peer_that_keeps_failing_to_rebuild_its_own_stage_is_bounded_too(tmp_path):
    """Stage 3's peer holds no weights (its rebuild keeps breaking off, e.g. its source sends a state the
    transport refuses): every epoch re-plans stage 3 on the same peer at the same step; that is counted."""
    cfg = tiny_config(tmp_path, "swarm.max_reforms=1")
    membership = Membership()
    leader = Leader(cfg, "a", "l", "fp", membership, None, True, lambda *a, **k: None)
    members, current = lost_stage_3()
    members["d"] = members["c"].model_copy(update={"peer_id": "d", "stage": 3, "lineage": Lineage(kind="none")})
    leader.step(members, current, 3)
    current = membership.published[-1]
    assert current.lost == [3] and current.roster[3] == "d" and current.reforms == 1
    members = {p: r.model_copy(update={"epoch": current.epoch}) for p, r in members.items()}
    leader.hosted.clear()
    with pytest.raises(SwarmStopped, match="2 epochs in a row broke at step 3"):
        leader.step(members, current, 3)


class _AnsweringView:
    """A settled view in which every member of the epoch still answers its probe."""

    settled, witnessed, dead, started, spare_wait_s, ttl_s = True, {0}, set(), 0.0, 60.0, 1.0

    def hidden(self, members, current, bounded=False):
        return []

    def answer(self, pid, host, port, max_age_s=1.0):
        return "alive"

    def all_refused(self, current):
        return False

    def answering(self, current, members):
        return True

    def unreachable(self, members, current):
        return [], len(current.roster)  # every member answers: none is across a partition


def test_a_checkpoint_store_that_is_not_shared_stops_the_swarm_instead_of_restarting_from_step_0(tmp_path):
    """Every stage saved step 2 into its own directory (as on separate disks): the leader's store holds no
    complete checkpoint at step 3. Members still answer, yet this is no verdict on who lives: the swarm stops."""
    from checkfree.core.checkpoint import CheckpointStore

    cfg = tiny_config(tmp_path, "recovery.strategy=checkpoint", "checkpoint.every_steps=2")
    store = CheckpointStore(tmp_path / "leader-only", cfg.model.num_stages)
    membership = Membership()
    leader = Leader(cfg, "a", "l", "fp", membership, store, False, lambda *a, **k: None)
    members, current = lost_stage_3()
    members["s"] = MemberRecord(run_id="l", fingerprint="fp", peer_id="s", stage=-1, epoch=-1, state="spare", step=0)
    with pytest.raises(
        SwarmStopped, match=r"no complete checkpoint .* saved one by step 2.*Not restarting from step 0"
    ):
        leader.step(members, current, 3, _AnsweringView())
    (stop,) = membership.published
    assert "shared by every peer" in stop.stop
