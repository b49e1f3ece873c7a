"""
Leader
======

The leader's job in a peer: while every member is stalled after a failure (or before the first epoch),
the peer that ``coordinator.leader_of`` names gathers the live members' records, asks
``coordinator.decide_epoch`` for the next epoch, hosts that epoch's rendezvous store and publishes the
epoch record; when no epoch can ever form, it publishes a stop record so every peer exits saying why.
The rules are pure functions in ``coordinator``; this module only gathers the view and acts.

``view.View`` is what makes that view trustworthy: a peer decides nothing until it has watched the members
for a heartbeat TTL (every live member has heartbeated into its view by then), a spare that never saw a
member of the current epoch alive does not declare them all lost before ``swarm.spare_wait_s`` (its DHT may
not have filled yet), and a member whose record still says "running" while the others report the step
broken is probed: a refused connection to its probe port confirms at once that its process is gone, and a
freeze is confirmed over ``membership.hang_s`` of unanswered probes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from checkfree.core.checkpoint import CheckpointStore
from checkfree.swarm.addressing import dial_host, listen
from checkfree.swarm.config import parse_port_range
from checkfree.swarm.coordinator import Decision, SwarmStopped, decide_epoch, next_iteration, stage_holders
from checkfree.swarm.gate import Gate
from checkfree.swarm.membership import Membership
from checkfree.swarm.probe import ProbeClient
from checkfree.swarm.records import EpochRecord, MemberRecord, known_rollbacks
from checkfree.swarm.restart import resume_step
from checkfree.swarm.view import View


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


class Leader:
    def __init__(
        self,
        cfg,
        peer_id: str,
        run_id: str,
        fingerprint: str,
        membership: Membership,
        ckpt: CheckpointStore | None,
        replicas_on: bool,
        emit: Callable[..., object],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg, self.peer_id, self.run_id, self.fingerprint = cfg, peer_id, run_id, fingerprint
        self.membership, self.ckpt, self.replicas_on, self.emit = membership, ckpt, replicas_on, emit
        self.clock = clock
        self.prober = ProbeClient(membership.admission)
        self.hosted: dict[int, dist.TCPStore] = {}  # epoch -> the rendezvous store this peer hosts
        self.gates: dict[int, Gate] = {}  # epoch -> the gate in front of that store
        self.reason = ""  # why no epoch is published yet (heartbeated as the peer's note)
        self.waiting_since: float | None = None  # monotonic time the leader started waiting for peers
        self.started = self.clock()
        self.excluded: set[str] = set()  # peers declared lost although alive (see ``blamed``)
        # the number of the first epoch: after the epochs of an earlier swarm of this run (see ``restart``)
        self.first_epoch = 0

    def step(
        self, members: dict[str, MemberRecord], current: EpochRecord | None, step: int, view: View | None = None
    ) -> None:
        """One round of leadership: publish the next epoch if one is due and can form, else record why not.
        ``view``: how much of the swarm this peer has seen; without it the records are taken as complete.

        Raises:
            SwarmStopped: no epoch can ever form (a stop record was published first).
        """
        cfg = self.cfg
        ckpt = self.ckpt
        members = {pid: r for pid, r in members.items() if pid not in self.excluded}
        if view is not None:
            why = None
            # a peer outside the roster (a spare leading because it sees no holder) never decides while a
            # holder answers; a roster member does after 3 TTLs (a holder that cannot heartbeat cannot serve)
            in_roster = current is not None and self.peer_id in current.roster
            hidden = view.hidden(members, current, bounded=in_roster) if current is not None else []
            if not view.settled:
                why = f"watching the members for membership.ttl_s={view.ttl_s} s before deciding"
            elif hidden:
                why = (
                    f"stages {hidden} are missing from this peer's view but answer their probes: not "
                    "deciding on a partial view"
                )
            elif (
                current is not None
                and not stage_holders(members, current)
                and current.epoch not in view.witnessed
                and not view.all_refused(current)
                and self.clock() - view.started < view.spare_wait_s
            ):
                why = (
                    f"no member of epoch {current.epoch} seen alive yet: not declaring them lost before "
                    f"swarm.spare_wait_s={view.spare_wait_s} s"
                )
            if why is None and current is not None and current.roster and not current.finished:
                # no split brain: rebuild only on a side that holds a majority of the last roster; a side that
                # cannot reach the others may be the minority of a partition, and then the majority goes on
                # (the voters are the roster and the spares the epoch recorded: spares break the tie of an even split)
                unreachable, voters = view.unreachable(members, current)
                reachable = voters - len(unreachable)
                if 2 * reachable <= voters:
                    stages = [current.roster.index(p) for p in unreachable if p in current.roster]
                    why = (
                        f"possible network partition: the peers of stages {stages} of epoch {current.epoch} "
                        f"({len(unreachable)} of its {voters} voters, spares included) are unreachable and only "
                        f"{reachable} are on this side (a majority, {voters // 2 + 1}, is needed to rebuild the "
                        "others): waiting, so that two sides never train two models"
                    )
            if why is not None:
                if why != self.reason:
                    self.reason = why
                    self.emit("leader_waiting", reason=why)
                return
        decision = decide_epoch(
            members,
            current,
            cfg.model.num_stages,
            cfg.recovery.strategy,
            cfg.recovery.adjacent_fallback,
            checkpoint_step=self._latest_complete(ckpt, current, members),
            checkpoint_every=cfg.checkpoint.every_steps if ckpt else 0,
            has_checkpoint=lambda s: ckpt is not None and ckpt.latest_for_stage(s) is not None,
            replicas_on=self.replicas_on,
            spares_for_first_epoch=self.clock() - self.started > cfg.swarm.first_epoch_grace_s,
            partner_rule=cfg.recovery.partner_rule,
            resume_step=resume_step(cfg, ckpt) if current is None else None,
        )
        if (
            decision.fatal
            and not decision.certain
            and view is not None
            and current is not None
            and view.answering(current, members)
        ):
            # stopping the swarm is final: never on a view in which the members' processes still answer
            decision = Decision(
                None, reason=f"{decision.reason}; but a member of epoch {current.epoch} answers its probe: waiting"
            )
        if decision.roster is None:
            if decision.reason != self.reason:
                self.reason = decision.reason
                self.emit("leader_waiting", reason=decision.reason)
            if decision.fatal:
                self.stop_swarm(current, decision.reason, step)
            if decision.needs_peers:
                self.waiting_since = self.waiting_since or self.clock()
                if self.clock() - self.waiting_since > cfg.swarm.spare_wait_s:
                    self.stop_swarm(
                        current, f"{decision.reason} for more than swarm.spare_wait_s={cfg.swarm.spare_wait_s} s", step
                    )
            return
        self.waiting_since = None
        epoch = self.first_epoch if current is None else current.epoch + 1
        reforms = 0
        own = current is not None and all(decision.roster[s] == current.roster[s] for s in decision.lost)
        if current is not None and own and decision.step == current.step:
            # the last epoch broke before its first commit and nobody new is needed: every member is the same
            # peer (at most rebuilding its own stage again); that cannot repeat forever
            reforms = current.reforms + 1
        if reforms > cfg.swarm.max_reforms:
            culprit = blamed(members, current)
            if culprit is not None:  # declare it lost: its stage is rebuilt on another peer, the count restarts
                pid, votes, voters = culprit
                self.excluded.add(pid)
                if view is not None:
                    view.exclude(pid)  # not "hidden" either: it is out, whatever its probe says
                self.emit(
                    "peer_excluded",
                    excluded=pid,
                    stage=current.roster.index(pid),
                    blamed_by=votes,
                    voters=voters,
                    reforms=reforms - 1,
                    reason=f"{reforms - 1} epochs in a row broke at step {decision.step}; {votes} of the other "
                    f"{voters} members blame stage {current.roster.index(pid)} (its data plane may be unreachable)",
                )
                return self.step(members, current, step, view)
            errors = sorted({f"{pid}: {members[pid].error}" for pid in decision.roster if members[pid].error})
            self.stop_swarm(
                current,
                f"{reforms} epochs in a row broke at step {decision.step} with every member alive "
                f"(swarm.max_reforms={cfg.swarm.max_reforms}): a member's data plane may be unreachable or a "
                f"step may break every time; last errors: {'; '.join(errors)[:800]}",
                step,
            )
        m = cfg.membership
        t_host = self.clock()
        # the store listens on loopback; the members reach it through a gate on a socket of ours (bound to
        # membership.host, in membership.port_range) that admits the epoch's roster only (see ``gate``)
        sock = listen(m.host, parse_port_range(m.port_range))
        port = sock.getsockname()[1]
        inner = listen("127.0.0.1", None)
        try:
            store = dist.TCPStore(
                "127.0.0.1",
                inner.getsockname()[1],
                cfg.model.num_stages,
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=cfg.transport.rendezvous_timeout_s),
                master_listen_fd=inner.fileno(),
            )
        except BaseException:
            sock.close()
            inner.close()
            raise
        inner.detach()  # the store owns (and closes) it from now on
        self.hosted[epoch] = store
        self.gates[epoch] = Gate(sock, store.port, self.membership.admission, decision.roster, epoch)
        for old in [e for e in self.hosted if e < epoch - 1]:
            del self.hosted[old]
            self.gates.pop(old).close()
        # the spares in view vote too when the next split comes (see View.unreachable)
        spares = sorted(p for p, r in members.items() if r.state == "spare" and p not in decision.roster)
        rec = EpochRecord(
            run_id=self.run_id,
            fingerprint=self.fingerprint,
            epoch=epoch,
            roster=decision.roster,
            store_host=dial_host(m.host, m.announce_host),
            store_port=port,
            step=decision.step,
            iteration=next_iteration(current, decision, members),
            leader=self.peer_id,
            lost=list(decision.lost),
            plans=list(decision.plans),
            rollback_to=decision.rollback_to,
            rollbacks=[
                *(ckpt.rollbacks if ckpt else []),
                *([(epoch, decision.rollback_to)] if decision.rollback_to is not None else []),
            ],
            probes=[(members[pid].host, members[pid].probe_port) for pid in decision.roster],
            spares=spares,
            spare_probes=[(members[pid].host, members[pid].probe_port) for pid in spares],
            reforms=reforms,
            stale_shadows=list(decision.stale_shadows),
            time=time.time(),
        )
        t0 = self.clock()
        self.membership.publish_epoch(rec)
        self.prober.knock(
            [a for pid, a in zip(rec.roster, rec.probes) if pid != self.peer_id], self.membership.seal_epoch(rec)
        )
        self.reason = ""
        self.emit(
            "epoch_published",
            publish_s=self.clock() - t0,
            host_s=t0 - t_host,
            new_epoch=epoch,
            roster=rec.roster,
            step=rec.step,
            lost=rec.lost,
            plans=[p.model_dump() for p in rec.plans],
            rollback_to=rec.rollback_to,
            reason=decision.reason,
        )

    @staticmethod
    def _latest_complete(
        ckpt: CheckpointStore | None, current: EpochRecord | None, members: dict[str, MemberRecord]
    ) -> int | None:
        """The newest step every stage saved in the current timeline (the rollbacks ``current`` lists, and
        any this peer learnt of before)."""
        if ckpt is None:
            return None
        if current is not None:
            ckpt.rollbacks = known_rollbacks(ckpt, current)
        # never forward: a rollback goes to a step the swarm has reached (a planted or stale later step is no target)
        reached = max([current.step, *(r.step for r in members.values())]) if current is not None else None
        return ckpt.latest_complete(at_most=reached)

    def stop_swarm(self, current: EpochRecord | None, reason: str, step: int) -> None:
        """Publish a stop record, so that every peer exits saying why, and stop this one."""
        self.membership.publish_epoch(
            EpochRecord(
                run_id=self.run_id,
                fingerprint=self.fingerprint,
                epoch=(current.epoch + 1) if current else 0,
                roster=[],
                store_host="",
                store_port=0,
                step=step,
                leader=self.peer_id,
                stop=reason,
                time=time.time(),
            )
        )
        raise SwarmStopped(reason)
