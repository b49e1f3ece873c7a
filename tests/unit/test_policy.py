"""The leader's policy (``coordinator.lead``), a pure function of what the leader saw and the time: no
sockets, no sleeping. And the rules that keep a healed partition training: a stage goes only to a spare that
answered just now, and a holder replaced while it lived takes its stage back when the replacement never
trained."""

from checkfree.swarm.coordinator import (
    LeaderState,
    Rules,
    Seen,
    decide_epoch,
    lead,
    replacement_committed,
    returning_holders,
)
from tests.unit.test_coordinator import epoch, rec

RULES = Rules(num_stages=4, strategy="checkfree_plus", spare_wait_s=10.0, max_reforms=2)


def _broken(lost="d"):
    """Epoch 1 broke at step 5: every member but ``lost`` reports it."""
    current = epoch(1)
    members = {p: rec(p, s, "recovering", epoch=1) for s, p in enumerate("abcd") if p != lost}
    return members, current


def test_a_stage_goes_only_to_a_spare_that_answered_a_fresh_probe():
    members, current = _broken()
    members["far"] = rec("far", -1, "spare", epoch=-1, step=0)  # in the DHT view, across a partition now
    members["near"] = rec("near", -1, "spare", epoch=-1, step=0)
    seen = Seen(members, current, voters=5, reachable=frozenset({"a", "b", "c", "near"}))
    action, _ = lead(seen, RULES, LeaderState(started=0.0), now=1.0)
    assert action.kind == "publish" and action.decision.roster == ["a", "b", "c", "near"]
    seen = Seen(members, current, voters=5, reachable=frozenset({"a", "b", "c"}))
    action, state = lead(seen, RULES, LeaderState(started=0.0), now=1.0)
    assert action.kind == "wait" and "(0 available)" in action.reason and state.waiting_since == 1.0


def test_no_roster_names_a_peer_that_does_not_answer_now():
    """Before the first epoch, a peer cut off from the others still sees their records stored before the
    split: it must not publish an epoch 0 naming them (the other side may publish its own)."""
    members = {p: rec(p, s, "waiting", epoch=-1, step=0) for s, p in enumerate("abcd")}
    action, _ = lead(Seen(members, None, reachable=frozenset({"a"})), RULES, LeaderState(started=0.0), now=1.0)
    assert action.kind == "wait" and "['b', 'c', 'd'] named in the next roster do not answer" in action.reason


def test_a_record_older_than_the_epoch_members_report_is_not_decided_on():
    members, current = _broken()
    members["a"] = rec("a", 0, "recovering", epoch=2)  # this peer joined epoch 2; the DHT read says epoch 1
    action, _ = lead(Seen(members, current, voters=4), RULES, LeaderState(started=0.0), now=1.0)
    assert action.kind == "wait" and "members report epoch 2" in action.reason


def test_waiting_for_a_spare_stops_after_spare_wait_s_and_a_new_wait_starts_anew():
    members, current = _broken()
    seen = Seen(members, current, voters=4)
    state = LeaderState(started=0.0)
    action, state = lead(seen, RULES, state, now=100.0)
    assert action.kind == "wait" and state.waiting_since == 100.0
    action, state = lead(seen, RULES, state, now=109.0)
    assert action.kind == "wait"
    action, state = lead(seen, RULES, state, now=110.5)
    assert action.kind == "stop" and "for more than swarm.spare_wait_s=10.0 s" in action.reason


def test_the_gates_say_why_the_leader_waits():
    members, current = _broken()
    state = LeaderState(started=0.0)
    for seen, why in (
        (Seen(members, current, settled=False), "watching the members"),
        (Seen(members, current, hidden=(3,)), "stages [3] are missing from this peer's view"),
        (Seen(members, current, voters=5, unreachable=("c", "d", "x")), "possible network partition"),
        (Seen({}, current, witnessed=False, watched_s=1.0), "no member of epoch 1 seen alive yet"),
    ):
        action, _ = lead(seen, RULES, state, now=1.0)
        assert action.kind == "wait" and why in action.reason, action.reason


def test_a_fatal_verdict_waits_while_a_member_answers_and_stops_otherwise():
    members = {"a": rec("a", 0, "recovering", epoch=1, lineage=None)}
    members["a"] = members["a"].model_copy(update={"lineage": members["a"].lineage.model_copy(update={"kind": "none"})})
    current = epoch(1)
    action, _ = lead(Seen(members, current, answering=True), RULES, LeaderState(started=0.0), now=1.0)
    assert action.kind == "wait" and "answers its probe" in action.reason
    action, _ = lead(Seen(members, current), RULES, LeaderState(started=0.0), now=1.0)
    assert action.kind == "stop" and "every stage of epoch 1 is lost" in action.reason


def test_endless_re_formations_single_out_the_blamed_peer():
    current = epoch(1).model_copy(update={"reforms": 2})
    members = {p: rec(p, s, "recovering", epoch=1) for s, p in enumerate("abcd")}
    for p in "abc":
        members[p] = members[p].model_copy(update={"blame": [3]})
    members["e"] = rec("e", -1, "spare", epoch=-1, step=0)
    action, state = lead(Seen(members, current, voters=5), RULES, LeaderState(started=0.0), now=1.0)
    assert [x.peer for x in action.excluded] == ["d"] and state.excluded == {"d"}
    assert action.kind == "publish" and action.decision.roster == ["a", "b", "c", "e"]


def test_a_replaced_holder_takes_its_stage_back_when_the_replacement_never_trained():
    """Epoch 2 gave stage 3 to spare e (across a partition); it never formed. d, which held stage 3 with
    weights valid for step 5, is back: the next epoch gives d its stage again, no rebuild."""
    current = epoch(2, roster=("a", "b", "c", "e"))
    members = {p: rec(p, s, "recovering", epoch=2) for s, p in enumerate("abc")}
    members["d"] = rec("d", 3, "recovering", epoch=1)
    assert returning_holders(members, current, 5, 4, {0, 1, 2}) == {3: "d"}
    d = decide_epoch(members, current, 4, "checkfree_plus", "nearest")
    assert d.roster == ["a", "b", "c", "d"] and d.lost == () and d.step == 5
    # once the replacement committed a step, the old holder's weights are stale: it is not taken back
    members["d"] = rec("d", 3, "recovering", epoch=1, step=4)
    assert returning_holders(members, current, 5, 4, {0, 1, 2}) == {}


def test_a_replacement_commits_when_a_member_of_its_epoch_reports_a_later_step():
    current = epoch(2, roster=("a", "b", "c", "e"))
    members = {p: rec(p, s, "running", epoch=2) for s, p in enumerate("abc")}
    assert not replacement_committed(members, current)
    members["a"] = rec("a", 0, "running", epoch=2, step=6)
    assert replacement_committed(members, current)
    assert replacement_committed({}, current.model_copy(update={"finished": True}))
