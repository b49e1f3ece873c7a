"""
Coordinator
===========

The leader's decisions, as pure functions over member and epoch records, so that every rule can be
tested in milliseconds and every peer that evaluates them on the same records reaches the same answer.

- ``leader_of``: the live stage-holding peer with the lowest stage (then lowest peer id). There is no
  fixed coordinator: when the leader is lost, the next one takes over once its record expires. When
  every stage is lost at once, the spare with the lowest id leads (to roll back from checkpoints, or to
  stop the swarm saying that nothing survives).
- ``decide_epoch``: whether a new epoch is due and, if so, its roster, the step to run, the lost stages
  and how each is rebuilt. A spare is assigned only here, by the leader, in peer-id order, so two
  spares can never both win a stage: the one the roster names joins, the other stays a spare (and a
  process group only forms when every roster member joins the same epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

from checkfree.core.recovery import beyond_rebuild, plan_recovery, replica_holder
from checkfree.swarm.records import EpochRecord, MemberRecord, PlanRecord


class SwarmStopped(RuntimeError):
    """The swarm cannot go on (no spare in time, recovery impossible); the run directory stays intact."""


class PeerCannotServe(RuntimeError):
    """This peer was given a stage it holds no valid weights for (its own hand-over broke off): it leaves, so
    that the stage counts as lost and is planned again, instead of training weights nobody rebuilt."""


@dataclass(frozen=True)
class Decision:
    """A new epoch to publish, or why none is published yet (``roster`` None)."""

    roster: list[str] | None
    step: int = 0
    lost: tuple[int, ...] = ()
    plans: tuple[PlanRecord, ...] = ()
    rollback_to: int | None = None
    reached: int | None = None  # the step the broken epoch had reached (before a rollback); None: ``step``
    stale_shadows: tuple[int, ...] = ()  # redundant: shadows to send anew (their holders' are stale)
    reason: str = ""
    fatal: bool = False  # no epoch can ever be formed: the leader stops the swarm with ``reason``
    # fatal whatever the view (a setup error, not a verdict on who is alive): stopped on even while members answer
    certain: bool = False
    needs_peers: bool = False  # waiting for peers to arrive: the leader gives up after swarm.spare_wait_s


def next_iteration(
    current: EpochRecord | None, decision: Decision, members: dict[str, MemberRecord] | None = None
) -> int:
    """The step attempts made before the new epoch's first. The broken epoch's members that heartbeat after
    it broke say how many they started (discarded non-finite steps, an epoch that broke before its first
    attempt and a commit only the lost stage finished included); when none of them is left, the broken
    epoch's committed steps and the one attempt its loss interrupted."""
    if current is None:
        return 0
    reported = [r.iteration for pid, r in (members or {}).items() if r.epoch == current.epoch and pid in current.roster]
    if reported:
        return max(current.iteration, *reported)
    reached = decision.step if decision.reached is None else decision.reached
    return current.iteration + max(0, reached - current.step) + 1


def stage_holders(members: dict[str, MemberRecord], current: EpochRecord | None) -> dict[int, str]:
    """stage -> peer id: the live roster members, or (before the first epoch) the peers asking for a stage."""
    if current is not None:  # a peer leaving on a preemption notice holds its stage no more (see handoffs)
        return {s: pid for s, pid in enumerate(current.roster) if pid in members and members[pid].state != "leaving"}
    holders: dict[int, str] = {}
    for pid in sorted(members):
        rec = members[pid]
        if rec.stage >= 0 and rec.stage not in holders and rec.state != "done":
            holders[rec.stage] = pid
    return holders


def leader_of(members: dict[str, MemberRecord], current: EpochRecord | None) -> str | None:
    holders = stage_holders(members, current)
    if holders:
        return holders[min(holders)]
    if current is not None and not current.finished:  # every stage lost at once: a spare decides what happens
        free = spares(members, set())
        return free[0] if free else None
    return None


def spares(members: dict[str, MemberRecord], taken: set[str]) -> list[str]:
    return sorted(pid for pid, r in members.items() if r.state == "spare" and pid not in taken)


def handoffs(members: dict[str, MemberRecord], step: int, num_stages: int) -> dict[int, PlanRecord]:
    """stage -> handoff plan, for the peers that leave on a preemption notice and serve their stage's exact
    state for ``step`` (see ``preemption``): members of the last roster, or of an earlier one (an epoch that
    broke while a spare fetched the state still finds it served)."""
    out = {}
    for pid in sorted(members):
        r = members[pid]
        s = r.stage
        if r.state == "leaving" and r.handoff_port and 0 <= s < num_stages and r.valid_for(step) and s not in out:
            address = (r.host, r.handoff_port)
            out[s] = PlanRecord(
                stage=s, method="handoff", sources=[s], path="preempted", edge=None, peer=pid, address=address
            )
    return out


def decide_epoch(
    members: dict[str, MemberRecord],
    current: EpochRecord | None,
    num_stages: int,
    strategy: str,
    fallback: str,
    checkpoint_step: int | None = None,
    checkpoint_every: int = 0,
    has_checkpoint=lambda stage: False,
    replicas_on: bool = True,
    spares_for_first_epoch: bool = False,
    partner_rule: str = "average",
    resume_step: int | None = None,
) -> Decision:
    """The next epoch, from the leader's view of the live members.

    Args:
        members: live member records (expired and tombstoned ones already removed).
        current: the newest epoch record, or None before the first epoch.
        num_stages: stages in the pipeline.
        strategy, fallback: the recovery strategy and adjacent-failure fallback.
        checkpoint_step: the newest step every stage has a checkpoint of (checkpoint and hybrid strategies).
        checkpoint_every: ``checkpoint.every_steps``: with no complete checkpoint although every stage has
            saved one (the swarm is past step ``checkpoint_every``), the store is not shared (or lost its
            files): the swarm stops saying so instead of restarting from step 0.
        has_checkpoint: whether one stage has a saved copy (adjacent fallback).
        replicas_on: whether neighbours hold copies of the embedding and head.
        partner_rule: ``recovery.partner_rule`` (checkfree_plus: how stages 1 and L-2 are rebuilt).
        spares_for_first_epoch: let spares fill stages that no stage peer asked for (after a grace time,
            so that stage peers that are still starting are not pre-empted).
        resume_step: the newest complete checkpoint of a swarm whose every peer was gone (``resume=auto``):
            the first epoch restores every stage from it and goes on from there (None: start at step 0).
    """
    holders = stage_holders(members, current)
    if current is None:
        roster = dict(holders)
        free = spares(members, set(roster.values())) if spares_for_first_epoch else []
        for s in range(num_stages):
            if s not in roster and free:
                roster[s] = free.pop(0)
        missing = [s for s in range(num_stages) if s not in roster]
        if missing:
            return Decision(None, reason=f"waiting for peers for stages {missing}", needs_peers=True)
        if resume_step:
            # a restart: a rollback of every stage to the checkpoint, no stage lost (no peer of this swarm
            # lost one); the redundant shadows are the initial ones, stale: each is sent anew
            stale = tuple(range(num_stages)) if strategy == "redundant" else ()
            return Decision(
                [roster[s] for s in range(num_stages)],
                step=resume_step,
                rollback_to=resume_step,
                stale_shadows=stale,
                reason="resume",
            )
        return Decision([roster[s] for s in range(num_stages)], step=0)

    alive = {s: members[pid] for s, pid in holders.items()}
    running = [s for s, r in alive.items() if r.epoch == current.epoch and r.state in ("running", "joining")]
    aborted = [s for s, r in alive.items() if r.epoch == current.epoch and r.state == "recovering"]
    if len(alive) == num_stages and not aborted:
        return Decision(None, reason="epoch healthy")
    if running:
        # survivors still inside the step will hit a transport error, an abort or a timeout and report
        return Decision(None, reason=f"waiting for stages {running} to abort step")
    # a holder counts only with weights valid for the step the swarm resumes at (its lineage says it holds
    # the stage, at that step): a spare whose rebuild broke off, or one left behind, is lost like a dead one
    holding = [r for r in alive.values() if r.lineage.kind != "none"]
    step = max((r.step for r in holding), default=current.step)
    if current.step > step and holding and all(r.valid_for(current.step) for r in holding):
        # the swarm committed step current.step - 1 (the epoch record says so), the holders that had moved past
        # it are lost since, and every survivor holds that step's finished gradients (pending): they apply them
        # and the swarm resumes at current.step, instead of redoing a committed step
        step = current.step
    valid = {s: r for s, r in alive.items() if r.valid_for(step)}
    lost = tuple(s for s in range(num_stages) if s not in valid)
    # lost, but their exact state is served: nothing to rebuild
    handed = {s: p for s, p in handoffs(members, step, num_stages).items() if s in lost}
    if strategy == "none" and set(lost) - set(handed):
        return Decision(None, reason=f"stages {list(lost)} lost and recovery.strategy=none", fatal=True)
    if not valid and strategy not in ("checkpoint", "hybrid"):
        return Decision(
            None,
            fatal=True,
            reason=(
                f"every stage of epoch {current.epoch} is lost at once (no live holder has weights valid for "
                f"step {step}): recovery.strategy={strategy} rebuilds a stage from live peers and none survives "
                "(only recovery.strategy=checkpoint or hybrid can restart from here)"
            ),
        )
    roster = list(current.roster)
    # a live holder without valid weights rebuilds its own stage (it needs no spare); dead ones need spares
    need = [s for s in lost if s not in alive]
    free = spares(members, set(roster))
    if len(free) < len(need):
        return Decision(None, reason=f"waiting for a spare for stages {need} ({len(free)} available)", needs_peers=True)
    for s in need:
        roster[s] = free.pop(0)
    # hybrid: CheckFree+ rebuilds what live neighbours can rebuild; anything else rolls every stage back
    # (handed-over stages are exact, live sources like any survivor)
    rollback = strategy == "checkpoint" or (
        strategy == "hybrid"
        and bool(set(lost) - set(handed))
        and beyond_rebuild(set(lost) - set(handed), num_stages, partner_rule)
    )
    # a hybrid peer writes in the background and starts a write only once its last one is done: the write
    # of a peer lost mid-write never completes, the one before it has (unless that peer died in it too)
    saved_by = checkpoint_every * (2 if strategy == "hybrid" else 1)
    if rollback:
        if set(lost) - set(handed) or any(r.step != step for r in valid.values()):
            # a store that is not shared shows this peer at most its own stage's files; one in which some
            # writes died with their peers shows others' files too, and goes back as far as it must
            seen = sum(1 for s in range(num_stages) if has_checkpoint(s))
            if checkpoint_step is None and checkpoint_every and step > saved_by and seen <= 1:
                return Decision(
                    None,
                    fatal=True,
                    certain=True,
                    reason=(
                        f"recovery.strategy={strategy} must roll back at step {step}, but checkpoint.dir holds no "
                        f"complete checkpoint (files of {seen} stage(s)) although every stage saved one by step "
                        f"{saved_by}: is checkpoint.dir "
                        "shared by every peer (a shared file system, or an s3:// URL)? Not restarting from step 0"
                    ),
                )
            # before the first checkpoint every stage saved, the initial state (from the seed) is the checkpoint
            return Decision(
                roster,
                step=checkpoint_step or 0,
                lost=lost,
                rollback_to=checkpoint_step or 0,
                reached=step,
                reason="rollback",
            )
        if handed:
            return Decision(roster, step=step, lost=lost, plans=tuple(handed.values()), reason="handoff")
        return Decision(roster, step=step, reason="re-form")
    plans: tuple[PlanRecord, ...] = ()
    # redundant: a live holder whose shadow was never sent (its join broke off) holds a stale copy
    stale = tuple(sorted((s + 1) % num_stages for s, r in valid.items() if not r.shadow_ok))
    # a hand-over carries the stage, not the shadow its peer held: the new holder's shadow is stale
    stale = tuple(sorted(set(stale) | {(s + 1) % num_stages for s in handed}))
    if strategy != "redundant":
        stale = ()
    rebuild = set(lost) - set(handed)  # the handed-over stages are exact: sources like any survivor
    if rebuild:
        # a handed-over holder of a replica does not hand the replica over: count it as lost here
        kinds = {k for k in ("embed", "head") if replicas_on and replica_holder(k, num_stages) not in lost}
        plans = tuple(
            PlanRecord(stage=p.stage, method=p.method, sources=list(p.sources), path=p.path, edge=p.edge)
            for p in plan_recovery(
                rebuild, num_stages, strategy, fallback, has_checkpoint, kinds, set(stale), partner_rule
            )
        )
    plans = tuple(handed.values()) + plans  # first: a handed-over stage may be a source of a rebuild
    reason = "recover" if rebuild else "handoff" if handed else "re-form"
    return Decision(roster, step=step, lost=lost, plans=plans, stale_shadows=stale, reason=reason)
