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

from dataclasses import dataclass, replace

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


def replacement_committed(members: dict[str, MemberRecord], current: EpochRecord) -> bool:
    """Whether epoch ``current`` has committed a step (a member of its roster reports a later step, or the
    run finished): a holder it replaced is no longer a valid holder then, and leaves."""
    return current.finished or any(
        members[pid].epoch == current.epoch and members[pid].step > current.step
        for pid in current.roster
        if pid in members
    )


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


def returning_holders(
    members: dict[str, MemberRecord], current: EpochRecord, step: int, num_stages: int, held: set[int]
) -> dict[int, str]:
    """stage -> peer, for stages no live roster member holds validly but a live peer outside the roster does:
    a holder that was replaced while it lived on (across a partition that healed, or frozen for a while)
    before its replacement's epoch committed a step. It holds the stage's weights for ``step``: it takes the
    stage back instead of a rebuild."""
    out: dict[int, str] = {}
    for pid in sorted(members):
        r = members[pid]
        s = r.stage
        if pid in current.roster or r.state != "recovering" or not 0 <= s < num_stages:
            continue
        if s not in held and s not in out and r.valid_for(step):
            out[s] = pid
    return out


def _first_epoch(
    members: dict[str, MemberRecord],
    holders: dict[int, str],
    num_stages: int,
    strategy: str,
    spares_for_first_epoch: bool,
    resume_step: int | None,
) -> Decision:
    """Epoch 0 of a swarm: the peers that asked for a stage, spares for the rest after a grace time."""
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


def _resume_at(alive: dict[int, MemberRecord], current: EpochRecord) -> int:
    """The step the next epoch runs: the furthest a live holder with weights got, or the current epoch's
    step when every survivor holds that step's finished gradients (the swarm committed step current.step - 1,
    the holders that had moved past it are lost since: the survivors apply their pending gradients instead
    of redoing a committed step)."""
    # a holder counts only with weights valid for the step the swarm resumes at (its lineage says it holds
    # the stage, at that step): a spare whose rebuild broke off, or one left behind, is lost like a dead one
    holding = [r for r in alive.values() if r.lineage.kind != "none"]
    step = max((r.step for r in holding), default=current.step)
    if current.step > step and holding and all(r.valid_for(current.step) for r in holding):
        step = current.step
    return step


def _beyond_recovery(
    current: EpochRecord,
    step: int,
    lost: tuple[int, ...],
    handed: dict[int, PlanRecord],
    valid: dict[int, MemberRecord],
    strategy: str,
) -> Decision | None:
    """The verdict when the strategy cannot recover what is lost (None: it can)."""
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
    return None


def _rollback(
    roster: list[str],
    step: int,
    lost: tuple[int, ...],
    handed: dict[int, PlanRecord],
    valid: dict[int, MemberRecord],
    strategy: str,
    checkpoint_step: int | None,
    checkpoint_every: int,
    seen: int,
) -> Decision:
    """The epoch of a rollback of every stage to ``checkpoint_step`` (or, with nothing lost but handed-over
    stages, a hand-over; with nothing at all lost, a re-formation). ``seen``: stages with a saved copy."""
    if set(lost) - set(handed) or any(r.step != step for r in valid.values()):
        # a hybrid peer writes in the background and starts a write only once its last one is done: the write
        # of a peer lost mid-write never completes, the one before it has (unless that peer died in it too)
        saved_by = checkpoint_every * (2 if strategy == "hybrid" else 1)
        # a store that is not shared shows this peer at most its own stage's files; one in which some
        # writes died with their peers shows others' files too, and goes back as far as it must
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


def _rebuild(
    roster: list[str],
    step: int,
    lost: tuple[int, ...],
    handed: dict[int, PlanRecord],
    valid: dict[int, MemberRecord],
    num_stages: int,
    strategy: str,
    fallback: str,
    has_checkpoint,
    replicas_on: bool,
    partner_rule: str,
) -> Decision:
    """The epoch that rebuilds the lost stages from live neighbours (CheckFree, CheckFree+, redundant)."""
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
        return _first_epoch(members, holders, num_stages, strategy, spares_for_first_epoch, resume_step)
    alive = {s: members[pid] for s, pid in holders.items()}
    running = [s for s, r in alive.items() if r.epoch == current.epoch and r.state in ("running", "joining")]
    aborted = [s for s, r in alive.items() if r.epoch == current.epoch and r.state == "recovering"]
    if len(alive) == num_stages and not aborted:
        return Decision(None, reason="epoch healthy")
    if running:
        # survivors still inside the step will hit a transport error, an abort or a timeout and report
        return Decision(None, reason=f"waiting for stages {running} to abort step")
    step = _resume_at(alive, current)
    valid = {s: r for s, r in alive.items() if r.valid_for(step)}
    back = returning_holders(members, current, step, num_stages, set(valid))
    valid.update({s: members[pid] for s, pid in back.items()})
    lost = tuple(s for s in range(num_stages) if s not in valid)
    # lost, but their exact state is served: nothing to rebuild
    handed = {s: p for s, p in handoffs(members, step, num_stages).items() if s in lost}
    fatal = _beyond_recovery(current, step, lost, handed, valid, strategy)
    if fatal is not None:
        return fatal
    roster = list(current.roster)
    for s, pid in back.items():
        roster[s] = pid
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
    if rollback:
        seen = sum(1 for s in range(num_stages) if has_checkpoint(s))
        return _rollback(roster, step, lost, handed, valid, strategy, checkpoint_step, checkpoint_every, seen)
    return _rebuild(
        roster, step, lost, handed, valid, num_stages, strategy, fallback, has_checkpoint, replicas_on, partner_rule
    )


# ---- the leader's policy: a pure function of what it has seen and the time -------------------------
@dataclass(frozen=True)
class Rules:
    """The configuration the leader's policy reads (``Rules.of(cfg)``)."""

    num_stages: int
    strategy: str
    fallback: str = "checkpoint"
    partner_rule: str = "average"
    replicas_on: bool = True
    checkpoint_every: int = 0
    spare_wait_s: float = 60.0
    first_epoch_grace_s: float = 0.0
    max_reforms: int = 3

    @classmethod
    def of(cls, cfg, replicas_on: bool, has_store: bool) -> Rules:
        return cls(
            num_stages=cfg.model.num_stages,
            strategy=cfg.recovery.strategy,
            fallback=cfg.recovery.adjacent_fallback,
            partner_rule=cfg.recovery.partner_rule,
            replicas_on=replicas_on,
            checkpoint_every=cfg.checkpoint.every_steps if has_store else 0,
            spare_wait_s=cfg.swarm.spare_wait_s,
            first_epoch_grace_s=cfg.swarm.first_epoch_grace_s,
            max_reforms=cfg.swarm.max_reforms,
        )


@dataclass(frozen=True)
class Seen:
    """What the leader's shell gathered this round (by probe, from the DHT and the checkpoint store).

    ``members``: live member records, confirmed losses removed. The view's gates: ``settled`` (watched
    long enough), ``hidden`` (roster stages missing from the records whose process answers: a partial view),
    ``witnessed`` (a member of the current epoch was seen alive), ``all_refused`` (every roster probe port
    refuses), ``watched_s`` (since the view started), ``unreachable`` and ``voters`` (the current epoch's
    voters that do not even accept a connection, and how many there are), ``answering`` (a roster member
    missing from the records answers: never stop then). ``reachable``: the spares that answered a fresh probe
    this round (only those may be named in a roster). The store: ``checkpoint_step`` (the newest complete step,
    never past the swarm's), ``with_checkpoint`` (stages with a saved copy), ``resume_step``."""

    members: dict[str, MemberRecord]
    current: EpochRecord | None
    settled: bool = True
    hidden: tuple[int, ...] = ()
    witnessed: bool = True
    all_refused: bool = False
    watched_s: float = 1e9
    unreachable: tuple[str, ...] = ()
    voters: int = 0
    answering: bool = False
    reachable: frozenset[str] | None = None  # None: every spare in ``members`` (no probing)
    checkpoint_step: int | None = None
    with_checkpoint: frozenset[int] = frozenset()
    resume_step: int | None = None


@dataclass(frozen=True)
class LeaderState:
    """What the leader remembers between rounds."""

    started: float  # when this peer started (the first epoch's grace for spares counts from it)
    first_epoch: int = 0  # the number of a new swarm's first epoch (after an earlier swarm of this run)
    waiting_since: float | None = None  # when it started waiting for peers to arrive
    excluded: frozenset[str] = frozenset()  # declared lost although alive (see ``blamed``)


@dataclass(frozen=True)
class Exclusion:
    peer: str
    stage: int
    votes: int
    voters: int
    reforms: int
    reason: str


@dataclass(frozen=True)
class Action:
    """The round's outcome: ``kind`` is ``wait`` (``reason`` says for what), ``stop`` (publish a stop record
    with ``reason``) or ``publish`` (epoch ``epoch`` from ``decision``, with ``reforms`` and the voting
    ``spares``); ``excluded``: the peers declared lost this round, before it."""

    kind: str
    reason: str = ""
    epoch: int = 0
    decision: Decision | None = None
    reforms: int = 0
    spares: tuple[str, ...] = ()
    excluded: tuple[Exclusion, ...] = ()


def blamed(members: dict[str, MemberRecord], current: EpochRecord) -> tuple[str, int, int] | None:
    """The roster member that a majority of the other members of ``current`` blame for its breaking (their
    records' ``blame``), as (peer id, votes, voters); None when no single member is blamed so. A peer that
    heartbeats and answers its probe but whose data plane nobody reaches breaks every epoch it is in: after
    ``swarm.max_reforms`` re-formations, this singles it out."""
    votes: dict[int, int] = {}
    voters: dict[int, int] = {}
    for stage, pid in enumerate(current.roster):
        r = members.get(pid)
        if r is None or r.epoch != current.epoch:
            continue
        for s in range(len(current.roster)):
            if s != stage:
                voters[s] = voters.get(s, 0) + 1
        for s in set(r.blame):
            if 0 <= s < len(current.roster) and s != stage:
                votes[s] = votes.get(s, 0) + 1
    if not votes:
        return None
    top = max(votes.values())
    leaders = [s for s, n in votes.items() if n == top]
    if len(leaders) != 1 or 2 * top <= voters[leaders[0]]:
        return None
    return current.roster[leaders[0]], top, voters[leaders[0]]


def gate(seen: Seen, rules: Rules) -> str | None:
    """Why the leader may not decide on this view yet (None: it may). A peer outside the roster (a spare
    leading because it sees no holder) never decides while a holder answers; no split brain: a side that
    cannot reach a majority of the last epoch's voters (its roster and the spares it recorded) may be the
    minority of a partition, and then the majority goes on."""
    current = seen.current
    newest = max((r.epoch for r in seen.members.values()), default=-1)
    if newest > (current.epoch if current is not None else -1):
        # a member (this peer included) joined an epoch newer than the newest record read: the read lags
        return f"members report epoch {newest}, newer than the newest epoch record read: waiting for the DHT"
    if not seen.settled:
        return "watching the members for membership.ttl_s before deciding"
    if seen.hidden:
        return (
            f"stages {list(seen.hidden)} are missing from this peer's view but not confirmed lost (they answer their "
            "probes, or have not been silent for membership.hang_s yet): not deciding on a partial view"
        )
    if current is None:
        return None
    if (
        not stage_holders(seen.members, current)
        and not seen.witnessed
        and not seen.all_refused
        and seen.watched_s < rules.spare_wait_s
    ):
        return (
            f"no member of epoch {current.epoch} seen alive yet: not declaring them lost before "
            f"swarm.spare_wait_s={rules.spare_wait_s} s"
        )
    if current.roster and not current.finished and seen.voters:  # voters 0: nobody probed (no view)
        reachable = seen.voters - len(seen.unreachable)
        if 2 * reachable <= seen.voters:
            stages = [current.roster.index(p) for p in seen.unreachable if p in current.roster]
            return (
                f"possible network partition: the peers of stages {stages} of epoch {current.epoch} "
                f"({len(seen.unreachable)} of its {seen.voters} voters, spares included) are unreachable and only "
                f"{reachable} are on this side (a majority, {seen.voters // 2 + 1}, is needed to rebuild the "
                "others): waiting, so that two sides never train two models"
            )
    return None


def _exclusion(culprit: tuple[str, int, int], current: EpochRecord, reforms: int, step: int) -> Exclusion:
    pid, votes, voters = culprit
    stage = current.roster.index(pid)
    why = (
        f"{reforms} epochs in a row broke at step {step}; {votes} of the other {voters} members blame stage "
        f"{stage} (its data plane may be unreachable)"
    )
    return Exclusion(pid, stage, votes, voters, reforms, why)


def lead(seen: Seen, rules: Rules, state: LeaderState, now: float) -> tuple[Action, LeaderState]:
    """One round of leadership, as a pure function: the action to carry out, and the state to keep."""
    current = seen.current
    why = gate(seen, rules)
    if why is not None:
        return Action("wait", why), state
    excluded: list[Exclusion] = []
    for _ in range(rules.num_stages + 1):  # each pass excludes one peer at most
        members = {p: r for p, r in seen.members.items() if p not in state.excluded}
        if seen.reachable is not None:  # a stage goes only to a spare that answered just now
            members = {p: r for p, r in members.items() if r.state != "spare" or p in seen.reachable}
        decision = decide_epoch(
            members,
            current,
            rules.num_stages,
            rules.strategy,
            rules.fallback,
            checkpoint_step=seen.checkpoint_step,
            checkpoint_every=rules.checkpoint_every,
            has_checkpoint=lambda s: s in seen.with_checkpoint,
            replicas_on=rules.replicas_on,
            spares_for_first_epoch=now - state.started > rules.first_epoch_grace_s,
            partner_rule=rules.partner_rule,
            resume_step=seen.resume_step if current is None else None,
        )
        if decision.fatal and not decision.certain and current is not None and seen.answering:
            # stopping the swarm is final: never on a view in which the members' processes still answer
            reason = f"{decision.reason}; but a member of epoch {current.epoch} answers its probe: waiting"
            decision = Decision(None, reason=reason)
        if decision.roster is None:
            done = tuple(excluded)
            if decision.fatal:
                return Action("stop", decision.reason, excluded=done), state
            if not decision.needs_peers:
                return Action("wait", decision.reason, excluded=done), state
            since = state.waiting_since if state.waiting_since is not None else now
            state = replace(state, waiting_since=since)
            if now - since > rules.spare_wait_s:
                reason = f"{decision.reason} for more than swarm.spare_wait_s={rules.spare_wait_s} s"
                return Action("stop", reason, excluded=done), state
            return Action("wait", decision.reason, excluded=done), state
        state = replace(state, waiting_since=None)
        reforms = 0
        own = current is not None and all(decision.roster[s] == current.roster[s] for s in decision.lost)
        if current is not None and own and decision.step == current.step:
            # the last epoch broke before its first commit and nobody new is needed: every member is the same
            # peer (at most rebuilding its own stage again); that cannot repeat forever
            reforms = current.reforms + 1
        if reforms <= rules.max_reforms:
            mute = [p for p in decision.roster if seen.reachable is not None and p not in seen.reachable]
            if mute:  # never name a peer that did not answer just now (across a split, or gone)
                return Action("wait", f"peers {mute} named in the next roster do not answer a probe now"), state
            epoch = state.first_epoch if current is None else current.epoch + 1
            # the spares in view vote too when the next split comes (see View.unreachable)
            spares = tuple(sorted(p for p, r in members.items() if r.state == "spare" and p not in decision.roster))
            return Action("publish", decision.reason, epoch, decision, reforms, spares, tuple(excluded)), state
        culprit = blamed(members, current)
        if culprit is None:
            errors = sorted({f"{pid}: {members[pid].error}" for pid in decision.roster if members[pid].error})
            reason = (
                f"{reforms} epochs in a row broke at step {decision.step} with every member alive "
                f"(swarm.max_reforms={rules.max_reforms}): a member's data plane may be unreachable or a "
                f"step may break every time; last errors: {'; '.join(errors)[:800]}"
            )
            return Action("stop", reason, excluded=tuple(excluded)), state
        # declare it lost: its stage is rebuilt on another peer, and the count restarts
        excluded.append(_exclusion(culprit, current, reforms - 1, decision.step))
        state = replace(state, excluded=state.excluded | {culprit[0]})
    raise AssertionError("unreachable: every pass excludes a roster member")
