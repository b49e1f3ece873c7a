from checkfree.swarm.coordinator import decide_epoch, leader_of
from checkfree.swarm.records import EpochRecord, Lineage, MemberRecord


def rec(pid, stage, state="running", epoch=0, step=5, pending=False, lineage=None):
    """A member record; a stage holder's weights are trained ones unless ``lineage`` says otherwise."""
    if lineage is None:
        lineage = Lineage(kind="initial" if stage >= 0 and state != "spare" else "none")
    return MemberRecord(
        run_id="r",
        fingerprint="f",
        peer_id=pid,
        stage=stage,
        epoch=epoch,
        state=state,
        step=step,
        pending=pending,
        lineage=lineage,
    )


def epoch(n=0, roster=("a", "b", "c", "d"), step=5):
    return EpochRecord(
        run_id="r",
        fingerprint="f",
        epoch=n,
        roster=list(roster),
        store_host="h",
        store_port=1,
        step=step,
        leader=roster[0],
    )


def test_first_epoch_waits_for_every_stage_then_forms():
    members = {p: rec(p, s, "waiting", -1, 0) for p, s in (("a", 0), ("b", 1), ("d", 3))}
    d = decide_epoch(members, None, 4, "checkfree_plus", "nearest")
    assert d.roster is None and "stages [2]" in d.reason
    members["x"] = rec("x", -1, "spare", -1, 0)
    assert decide_epoch(members, None, 4, "checkfree_plus", "nearest").roster is None  # stage peers get a grace time
    d = decide_epoch(members, None, 4, "checkfree_plus", "nearest", spares_for_first_epoch=True)
    assert d.roster == ["a", "b", "x", "d"] and d.step == 0
    assert leader_of(members, None) == "a"


def test_healthy_epoch_needs_no_decision():
    members = {p: rec(p, s) for s, p in enumerate("abcd")}
    assert decide_epoch(members, epoch(), 4, "checkfree", "nearest").reason == "epoch healthy"


def test_leader_waits_for_survivors_still_inside_the_step():
    members = {p: rec(p, s, "recovering") for s, p in enumerate("abd")}
    members["b"] = rec("b", 1, "running")
    members["s1"] = rec("s1", -1, "spare", -1, 0)
    d = decide_epoch(members, epoch(), 4, "checkfree", "nearest")
    assert d.roster is None and "waiting for stages [1]" in d.reason


def test_two_spares_racing_only_the_first_by_id_wins():
    members = {p: rec(p, s, "recovering") for s, p in zip((0, 1, 3), "abd")}
    members["zz"] = rec("zz", -1, "spare", -1, 0)
    members["mm"] = rec("mm", -1, "spare", -1, 0)
    d = decide_epoch(members, epoch(), 4, "checkfree", "nearest")
    assert d.roster == ["a", "b", "mm", "d"] and d.lost == (2,)
    assert [(p.stage, p.method, tuple(p.sources)) for p in d.plans] == [(2, "weighted_average", (1, 3))]
    # evaluated again by another peer on the same records: the same single winner
    assert decide_epoch(dict(reversed(list(members.items()))), epoch(), 4, "checkfree", "nearest").roster == d.roster


def test_no_spare_means_waiting():
    members = {p: rec(p, s, "recovering") for s, p in zip((0, 1, 3), "abd")}
    d = decide_epoch(members, epoch(), 4, "checkfree", "nearest")
    assert d.roster is None and "waiting for a spare for stages [2]" in d.reason and d.needs_peers and not d.fatal


def test_resume_step_is_the_furthest_commit_and_the_leader_moves_on():
    members = {
        "b": rec("b", 1, "recovering", step=6),
        "c": rec("c", 2, "recovering", step=5, pending=True),
        "d": rec("d", 3, "recovering", step=6),
        "s": rec("s", -1, "spare", -1, 0),
    }
    assert leader_of(members, epoch()) == "b"  # stage 0's peer is gone: stage 1 leads
    d = decide_epoch(members, epoch(), 4, "checkfree_plus", "nearest")
    assert d.step == 6 and d.roster == ["s", "b", "c", "d"]
    (plan,) = d.plans
    assert (plan.stage, plan.method, plan.sources, plan.edge) == (0, "copy", [1], "replica")


def test_adjacent_loss_in_the_swarm_never_reads_a_lost_stage():
    members = {
        "a": rec("a", 0, "recovering"),
        "d": rec("d", 3, "recovering"),
        "s": rec("s", -1, "spare", -1, 0),
        "t": rec("t", -1, "spare", -1, 0),
    }
    d = decide_epoch(members, epoch(), 4, "checkfree", "nearest")
    assert d.roster == ["a", "s", "t", "d"]
    assert [(p.stage, p.sources, p.path) for p in d.plans] == [
        (1, [0, 3], "fallback:nearest"),
        (2, [0, 3], "fallback:nearest"),
    ]


def test_transient_abort_without_loss_re_forms_the_same_roster():
    members = {p: rec(p, s, "recovering") for s, p in enumerate("abcd")}
    d = decide_epoch(members, epoch(), 4, "checkfree", "nearest")
    assert d.roster == list("abcd") and d.lost == () and d.reason == "re-form"


def test_checkpoint_strategy_rolls_everyone_back():
    members = {p: rec(p, s, "recovering") for s, p in zip((0, 1, 3), "abd")}
    members["s"] = rec("s", -1, "spare", -1, 0)
    d = decide_epoch(members, epoch(), 4, "checkpoint", "nearest", checkpoint_step=4)
    assert d.rollback_to == 4 and d.step == 4 and d.roster == ["a", "b", "s", "d"]


def test_a_committed_step_is_applied_from_the_survivors_pending_gradients_not_redone():
    """Epoch 21 resumed at step 489: stage 0 had committed step 488, stages 1 and 3 finished it but their
    commit broke (pending). Stages 0-2 are lost now: stage 3 applies its pending step and the swarm resumes at
    489 (as seen in a 200-event soak, where step 488 was redone and committed twice)."""
    members = {"d": rec("d", 3, "recovering", epoch=21, step=488, pending=True)}
    members.update({p: rec(p, -1, "spare", -1, 0) for p in ("x", "y", "z")})
    d = decide_epoch(members, epoch(21, step=489), 4, "checkfree_plus", "nearest")
    assert d.step == 489 and d.lost == (0, 1, 2) and d.roster == ["x", "y", "z", "d"]
    # a survivor that never finished step 488 cannot skip it: the step is redone
    members["d"] = rec("d", 3, "recovering", epoch=21, step=488, pending=False)
    assert decide_epoch(members, epoch(21, step=489), 4, "checkfree_plus", "nearest").step == 488


def test_checkpoint_strategy_never_restarts_from_step_0_when_checkpoints_were_saved_but_none_is_complete():
    members = {p: rec(p, s, "recovering") for s, p in zip((0, 1, 3), "abd")}  # at step 5
    members["s"] = rec("s", -1, "spare", -1, 0)
    # every stage saved step 4, yet no complete checkpoint is seen: the store is not shared; stop, say why
    d = decide_epoch(members, epoch(), 4, "checkpoint", "nearest", checkpoint_step=None, checkpoint_every=4)
    assert d.roster is None and d.fatal and d.certain
    assert "no complete checkpoint" in d.reason and "shared by every peer" in d.reason and "step 4" in d.reason
    # before the first checkpoint was due, the seed's initial state is the checkpoint: back to step 0
    d = decide_epoch(members, epoch(), 4, "checkpoint", "nearest", checkpoint_step=None, checkpoint_every=5)
    assert d.rollback_to == 0 and d.step == 0 and not d.fatal


def test_when_every_stage_is_lost_a_spare_leads_and_only_checkpointing_can_go_on():
    members = {p: rec(p, -1, "spare", -1, 0) for p in ("w", "x", "y", "z", "v")}
    assert leader_of(members, epoch()) == "v"  # no stage survives: the lowest spare decides
    assert leader_of(members, None) is None  # before the first epoch, stage peers lead
    d = decide_epoch(members, epoch(2), 4, "checkfree_plus", "nearest")
    assert d.roster is None and d.fatal
    assert "every stage of epoch 2 is lost" in d.reason and "recovery.strategy=checkfree_plus" in d.reason
    d = decide_epoch(members, epoch(2), 4, "checkpoint", "nearest", checkpoint_step=None)
    assert d.roster == ["v", "w", "x", "y"] and d.rollback_to == 0 and d.step == 0 and d.lost == (0, 1, 2, 3)
    assert not decide_epoch({}, epoch(2), 4, "checkpoint", "nearest").fatal  # no spare yet: wait for one
    # the stages that ran the last step have left: the run is over, not lost
    assert leader_of(members, epoch(2).model_copy(update={"finished": True})) is None


def test_a_lost_stage_under_strategy_none_stops_the_swarm():
    members = {p: rec(p, s, "recovering") for s, p in zip((0, 1, 3), "abd")}
    d = decide_epoch(members, epoch(), 4, "none", "nearest")
    assert d.roster is None and d.fatal and "recovery.strategy=none" in d.reason


def test_a_spare_whose_rebuild_broke_off_is_lost_and_never_a_source():
    """Epoch 1 named spare "s" for stage 0; its source died before the transfer, so "s" holds no weights
    (lineage none). Then stage 1 is lost too. Stage 0 must count as lost (rebuilt again, by "s" itself, which
    needs no spare) and stage 1 may not be averaged from it: the nearest valid stage is used instead."""
    members = {
        "s": rec("s", 0, "recovering", epoch=1, step=5),  # lineage none: never got its weights
        "c": rec("c", 2, "recovering", epoch=1),
        "d": rec("d", 3, "recovering", epoch=1),
        "t": rec("t", -1, "spare", -1, 0),
    }
    members["s"] = members["s"].model_copy(update={"lineage": Lineage(kind="none")})
    d = decide_epoch(members, epoch(1, roster=("s", "b", "c", "d")), 4, "checkfree", "nearest")
    assert d.lost == (0, 1) and d.roster == ["s", "t", "c", "d"]
    assert all(0 not in p.sources and 1 not in p.sources for p in d.plans)
    assert [(p.stage, p.sources) for p in d.plans] == [(0, [2]), (1, [2])]


def test_a_holder_left_behind_the_resume_step_is_rebuilt_not_a_reason_to_stop():
    members = {p: rec(p, s, "recovering", step=6) for s, p in enumerate("abcd")}
    members["c"] = rec("c", 2, "recovering", step=4)  # two steps behind: not even a pending step to apply
    d = decide_epoch(members, epoch(), 4, "checkfree", "nearest")
    assert d.step == 6 and d.lost == (2,) and d.roster == list("abcd")  # "c" rebuilds its own stage
    assert [(p.stage, p.sources) for p in d.plans] == [(2, [1, 3])]


def test_no_valid_weights_anywhere_stops_instead_of_restarting_silently():
    members = {p: rec(p, s, "recovering", epoch=3, lineage=Lineage(kind="none")) for s, p in enumerate("abcd")}
    d = decide_epoch(members, epoch(3), 4, "checkfree_plus", "nearest")
    assert d.roster is None and d.fatal and "no live holder has weights valid" in d.reason


def test_a_stale_shadow_is_never_a_rebuild_source_and_is_sent_anew():
    """redundant: stage 1's peer joined in a hand-over that broke off before its shadow (of stage 2) was
    sent. When stage 2 is lost, its shadow may not be used (the fallback rebuilds it), and a re-formed
    epoch sends the shadow anew."""
    members = {p: rec(p, s, "recovering") for s, p in zip((0, 1, 3), "abd")}
    members["b"] = members["b"].model_copy(update={"shadow_ok": False})
    members["s"] = rec("s", -1, "spare", -1, 0)
    d = decide_epoch(members, epoch(), 4, "redundant", "nearest")
    (plan,) = d.plans
    assert plan.stage == 2 and plan.method != "shadow" and plan.path == "fallback:nearest"
    assert d.stale_shadows == (2,)
    members["c"] = rec("c", 2, "recovering")
    d = decide_epoch(members, epoch(), 4, "redundant", "nearest")
    assert d.lost == () and d.stale_shadows == (2,)  # nothing lost: only the shadow is refreshed


def _leaving(pid, stage, step=5):
    r = rec(pid, stage, "leaving", step=step)
    return r.model_copy(update={"handoff_port": 4242, "host": "10.0.0.7"})


def test_a_peer_leaving_on_a_preemption_notice_hands_its_stage_to_a_spare_without_a_rebuild():
    """Its exact state is served: the plan is a hand-over from it (no averaging), the swarm resumes at the
    step it committed, and with recovery.strategy=checkpoint nothing rolls back."""
    members = {"a": rec("a", 0, "recovering"), "c": rec("c", 2, "recovering"), "d": rec("d", 3, "recovering")}
    members["b"] = _leaving("b", 1)
    assert leader_of(members, epoch()) == "a"  # the leaving peer never leads (it would host the rendezvous)
    d = decide_epoch(members, epoch(), 4, "checkfree_plus", "nearest")
    assert d.roster is None and "waiting for a spare for stages [1]" in d.reason
    members["s"] = rec("s", -1, "spare", -1, 0)
    for strategy in ("checkfree_plus", "checkpoint", "none"):
        d = decide_epoch(members, epoch(), 4, strategy, "nearest")
        assert d.roster == ["a", "s", "c", "d"] and d.step == 5 and d.rollback_to is None, (strategy, d.reason)
        (plan,) = d.plans
        assert (plan.stage, plan.method, plan.peer, plan.address) == (1, "handoff", "b", ("10.0.0.7", 4242))
        assert d.reason == "handoff"


def test_a_hand_over_and_a_crash_at_once_rebuild_the_crashed_stage_from_the_handed_over_one():
    members = {"a": rec("a", 0, "recovering"), "d": rec("d", 3, "recovering"), "b": _leaving("b", 1)}
    members.update({"s": rec("s", -1, "spare", -1, 0), "t": rec("t", -1, "spare", -1, 0)})
    d = decide_epoch(members, epoch(), 4, "checkfree", "nearest")
    assert d.roster == ["a", "s", "t", "d"] and d.lost == (1, 2)
    assert [(p.stage, p.method) for p in d.plans] == [(1, "handoff"), (2, "weighted_average")]
    assert sorted(d.plans[1].sources) == [1, 3]  # stage 1's handed-over weights are a source
    # a leaving peer whose state is not for the resume step is no source of a hand-over: rebuilt as lost
    members["b"] = _leaving("b", 1, step=4)
    d = decide_epoch(members, epoch(), 4, "checkfree", "nearest")
    assert all(p.method != "handoff" for p in d.plans)


def test_a_hand_over_survives_a_broken_epoch_and_marks_the_shadow_it_did_not_carry_stale():
    """The epoch that gave stage 1 to spare s broke before s had the state: the leaving peer b, no longer in the
    roster, still serves it and the next epoch plans the hand-over again. Under redundant computation the
    new holder's shadow of stage 2 is the initial one: stage 2, lost too, is not rebuilt from it."""
    members = {"a": rec("a", 0, "recovering"), "d": rec("d", 3, "recovering"), "b": _leaving("b", 1)}
    members.update({"s": rec("s", 1, "recovering", lineage=Lineage()), "t": rec("t", -1, "spare", -1, 0)})
    broke = epoch(1, roster=("a", "s", "c", "d"))
    d = decide_epoch(members, broke, 4, "redundant", "nearest")
    assert d.roster == ["a", "s", "t", "d"] and d.lost == (1, 2)
    by_stage = {p.stage: p for p in d.plans}
    assert by_stage[1].method == "handoff" and by_stage[1].peer == "b"
    assert by_stage[2].method != "shadow" and 2 in d.stale_shadows


def test_the_next_epoch_counts_the_attempts_its_survivors_started():
    from checkfree.swarm.coordinator import Decision, next_iteration

    current = epoch(n=2, step=5).model_copy(update={"iteration": 7})  # epoch 2 started at step 5, attempt 7
    decision = Decision(["a", "b", "c", "e"], step=9, lost=(3,))
    assert next_iteration(None, decision) == 0
    # no member left to say: 4 steps committed (attempts 7-10) and the interrupted one (11): 12 next
    assert next_iteration(current, decision, {}) == 12
    # survivors that heartbeat after the break know better, a discarded non-finite attempt included
    members = {p: rec(p, s, state="recovering", epoch=2, step=9) for s, p in enumerate("abc")}
    for r, it in zip(members.values(), (13, 13, 12), strict=True):
        r.iteration = it
    assert next_iteration(current, decision, members) == 13
    # an epoch that broke before its first attempt: its joiners still report the epoch's start
    for r in members.values():
        r.iteration = 7
    assert next_iteration(current, decision, members) == 7
    # members of another epoch (a spare, a stale record) say nothing about this one
    assert next_iteration(current, decision, {"x": rec("x", -1, state="spare", epoch=1)}) == 12
    # a rollback: counted from the step the broken epoch reached, not the one it resumes at
    rollback = Decision(["a", "b", "c", "e"], step=0, rollback_to=0, reached=9)
    assert next_iteration(current, rollback, {}) == 12


def test_hybrid_rebuilds_an_isolated_loss_and_rolls_back_neighbours_lost_together():
    """recovery.strategy=hybrid in the swarm: CheckFree+'s rebuild where live neighbours can rebuild the lost
    stage, and the whole pipeline back to the newest complete checkpoint where they cannot."""
    members = {p: rec(p, s, "recovering", step=11) for s, p in zip((0, 1, 3), "abd")}
    members["s"] = rec("s", -1, "spare", -1, 0)
    d = decide_epoch(members, epoch(step=11), 4, "hybrid", "nearest", checkpoint_step=8, checkpoint_every=4)
    assert d.rollback_to is None and d.step == 11 and d.reason == "recover"
    assert [(p.stage, p.method, tuple(p.sources)) for p in d.plans] == [(2, "weighted_average", (1, 3))]
    # stages 0 and 1 together: stage 0's swap partner is lost with it
    members = {p: rec(p, s, "recovering", step=11) for s, p in zip((2, 3), "cd")}
    members.update({p: rec(p, -1, "spare", -1, 0) for p in ("s", "t")})
    d = decide_epoch(members, epoch(step=11), 4, "hybrid", "nearest", checkpoint_step=8, checkpoint_every=4)
    assert d.rollback_to == 8 and d.step == 8 and d.reached == 11 and d.roster == ["s", "t", "c", "d"]
    # every stage at once: nothing to rebuild from, the checkpoint goes on (CheckFree+ alone stops here)
    members = {p: rec(p, -1, "spare", -1, 0) for p in ("w", "x", "y", "z")}
    d = decide_epoch(members, epoch(2, step=11), 4, "hybrid", "nearest", checkpoint_step=8, checkpoint_every=4)
    assert d.rollback_to == 8 and not d.fatal and d.lost == (0, 1, 2, 3)


def test_hybrid_rolls_back_past_a_write_lost_with_its_peer_but_never_restarts_a_swarm_that_saved():
    """A hybrid peer writes in the background, one write at a time: the write of a peer lost mid-write never
    completes, the one before it has. So no complete checkpoint at step 7 with saves every 4 steps can be
    that lost write (back to the seed's state), but at step 9 every stage has finished step 4's."""
    members = {p: rec(p, s, "recovering", step=7) for s, p in zip((2, 3), "cd")}
    members.update({p: rec(p, -1, "spare", -1, 0) for p in ("s", "t")})
    d = decide_epoch(members, epoch(step=7), 4, "hybrid", "nearest", checkpoint_step=None, checkpoint_every=4)
    assert d.rollback_to == 0 and not d.fatal
    members = {p: rec(p, s, "recovering", step=9) for s, p in zip((2, 3), "cd")}
    members.update({p: rec(p, -1, "spare", -1, 0) for p in ("s", "t")})
    d = decide_epoch(members, epoch(step=9), 4, "hybrid", "nearest", checkpoint_step=None, checkpoint_every=4)
    assert d.fatal and "recovery.strategy=hybrid" in d.reason and "shared by every peer" in d.reason


def test_hybrid_goes_back_to_the_start_when_writes_died_with_their_peers_but_the_store_is_shared():
    """No complete checkpoint, yet files of several stages: the store is shared and the missing files died
    with their writers; the swarm goes back as far as it must instead of stopping."""
    members = {p: rec(p, s, "recovering", step=11) for s, p in zip((2, 3), "cd")}
    members.update({p: rec(p, -1, "spare", -1, 0) for p in ("s", "t")})
    d = decide_epoch(
        members, epoch(step=11), 4, "hybrid", "nearest", checkpoint_step=None, checkpoint_every=4,
        has_checkpoint=lambda s: s in (2, 3),
    )  # fmt: skip
    assert d.rollback_to == 0 and not d.fatal
