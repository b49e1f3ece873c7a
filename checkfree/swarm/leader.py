"""
Leader
======

The leader's shell in a peer: while every member is stalled after a failure (or before the first epoch),
the peer that ``coordinator.leader_of`` names gathers what it has seen (the live members' records, its
view's probe answers, the checkpoint store), asks the pure policy ``coordinator.lead`` what to do, and
carries that out: host the next epoch's rendezvous store behind its gate and publish the epoch record,
or publish a stop record so every peer exits saying why, or record why it waits. Every rule lives in
``coordinator``; this module only gathers and acts.

``view.View`` is what makes that view trustworthy: a peer decides nothing until it has watched the members
for a heartbeat TTL, a spare that never saw a member of the current epoch alive does not declare them all
lost before ``swarm.spare_wait_s`` (its DHT may not have filled yet), a member whose record still says
"running" while the others report the step broken is probed (a refused connection confirms a crash at once,
a freeze takes ``membership.hang_s`` of unanswered probes), and a stage goes only to a spare that answered a
fresh probe in this round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import torch.distributed as dist

from checkfree.core.checkpoint import CheckpointStore
from checkfree.swarm.addressing import dial_host, listen
from checkfree.swarm.config import parse_port_range
from checkfree.swarm.coordinator import (
    Action,
    LeaderState,
    Rules,
    Seen,
    SwarmStopped,
    blamed,  # noqa: F401  (re-exported: tests and tools ask who the members blame)
    lead,
    next_iteration,
    stage_holders,
)
from checkfree.swarm.gate import Gate
from checkfree.swarm.membership import Membership
from checkfree.swarm.probe import ProbeClient
from checkfree.swarm.records import EpochRecord, MemberRecord, known_rollbacks
from checkfree.swarm.restart import resume_step
from checkfree.swarm.view import View

FRESH_PROBE_S = 0.5  # a peer may be named in a roster if it answered a probe this recently


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
        self.membership, self.ckpt, self.emit, self.clock = membership, ckpt, emit, clock
        self.rules = Rules.of(cfg, replicas_on, ckpt is not None)
        self.prober = ProbeClient(membership.admission)
        self.hosted: dict[int, dist.TCPStore] = {}  # epoch -> the rendezvous store this peer hosts
        self.gates: dict[int, Gate] = {}  # epoch -> the gate in front of that store
        self.reason = ""  # why no epoch is published yet (heartbeated as the peer's note)
        self.published: EpochRecord | None = None  # the last epoch this peer published (it need not read it back)
        self.state = LeaderState(started=clock())

    # the policy's memory, as the peer sets and reads it
    @property
    def waiting_since(self) -> float | None:
        return self.state.waiting_since

    @waiting_since.setter
    def waiting_since(self, value: float | None) -> None:
        self.state = replace(self.state, waiting_since=value)

    @property
    def first_epoch(self) -> int:
        return self.state.first_epoch

    @first_epoch.setter
    def first_epoch(self, value: int) -> None:  # after the epochs of an earlier swarm of this run (``restart``)
        self.state = replace(self.state, first_epoch=value)

    @property
    def excluded(self) -> frozenset[str]:
        return self.state.excluded

    def step(
        self, members: dict[str, MemberRecord], current: EpochRecord | None, step: int, view: View | None = None
    ) -> None:
        """One round of leadership: publish the next epoch if one is due and can form, else record why not.
        ``view``: how much of the swarm this peer has seen; without it the records are taken as complete.

        Raises:
            SwarmStopped: no epoch can ever form (a stop record was published first).
        """
        seen = self.gather(members, current, view)
        action, self.state = lead(seen, self.rules, self.state, self.clock())
        for x in action.excluded:
            if view is not None:
                view.exclude(x.peer)  # not "hidden" either: it is out, whatever its probe says
            self.emit(
                "peer_excluded",
                excluded=x.peer,
                stage=x.stage,
                blamed_by=x.votes,
                voters=x.voters,
                reforms=x.reforms,
                reason=x.reason,
            )
        if action.kind == "publish":
            self._publish(action, seen.members, current)
            return
        if action.reason != self.reason:
            self.reason = action.reason
            self.emit("leader_waiting", reason=action.reason)
        if action.kind == "stop":
            self.stop_swarm(current, action.reason, step)

    def gather(self, members: dict[str, MemberRecord], current: EpochRecord | None, view: View | None) -> Seen:
        """What the policy decides on: the records, the view's probe answers and the checkpoint store."""
        members = {pid: r for pid, r in members.items() if pid not in self.state.excluded}
        ckpt, L = self.ckpt, self.rules.num_stages
        store = dict(
            checkpoint_step=self._latest_complete(ckpt, current, members),
            with_checkpoint=frozenset(s for s in range(L) if ckpt is not None and ckpt.latest_for_stage(s) is not None),
            resume_step=resume_step(self.cfg, ckpt) if current is None else None,
        )
        if view is None:
            return Seen(members, current, **store)
        now = self.clock()
        # every peer that may be named in the roster answered a probe just now (this peer lives)
        reachable = frozenset(
            pid
            for pid, r in members.items()
            if pid == self.peer_id or view.answer(pid, r.host, r.probe_port, FRESH_PROBE_S) == "alive"
        )
        if current is None:
            return Seen(members, None, view.settled, watched_s=now - view.started, reachable=reachable, **store)
        # a peer outside the roster (a spare leading because it sees no holder) never decides while a holder
        # answers; a roster member does after 3 TTLs (a holder that cannot heartbeat cannot serve)
        hidden = tuple(view.hidden(members, current, bounded=self.peer_id in current.roster))
        witnessed = current.epoch in view.witnessed
        unreachable, voters = view.unreachable(members, current) if current.roster else ([], 0)
        return Seen(
            members,
            current,
            settled=view.settled,
            hidden=hidden,
            witnessed=witnessed,
            all_refused=not witnessed and not stage_holders(members, current) and view.all_refused(current),
            watched_s=now - view.started,
            unreachable=tuple(unreachable),
            voters=voters,
            answering=view.answering(current, members),
            reachable=reachable,
            **store,
        )

    def _publish(self, action: Action, members: dict[str, MemberRecord], current: EpochRecord | None) -> None:
        """Host epoch ``action.epoch``'s rendezvous store behind its gate, publish its record and knock the
        roster with it."""
        cfg, decision, epoch, ckpt = self.cfg, action.decision, action.epoch, self.ckpt
        m = cfg.membership
        t_host = self.clock()
        port = self._host(epoch, decision.roster)
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
            spares=list(action.spares),
            spare_probes=[(members[pid].host, members[pid].probe_port) for pid in action.spares],
            reforms=action.reforms,
            stale_shadows=list(decision.stale_shadows),
            time=time.time(),
        )
        t0 = self.clock()
        self.membership.publish_epoch(rec)
        self.published = rec
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

    def _host(self, epoch: int, roster: list[str]) -> int:
        """Start epoch ``epoch``'s rendezvous store on loopback and a gate in front of it that admits the
        roster only (see ``gate``), on a socket bound to membership.host in membership.port_range; returns
        the gate's port. The stores of epochs before the previous one are closed."""
        cfg, m = self.cfg, self.cfg.membership
        sock = listen(m.host, parse_port_range(m.port_range))
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
        self.gates[epoch] = Gate(sock, store.port, self.membership.admission, roster, epoch)
        for old in [e for e in self.hosted if e < epoch - 1]:
            del self.hosted[old]
            self.gates.pop(old).close()
        return sock.getsockname()[1]

    @staticmethod
    def _latest_complete(
        ckpt: CheckpointStore | None, current: EpochRecord | None, members: dict[str, MemberRecord]
    ) -> int | None:
        """The newest step every stage saved in the current timeline (the rollbacks ``current`` lists, and
        any this peer learnt of before), never past the step the swarm has reached (a planted or stale later
        step is no rollback target)."""
        if ckpt is None:
            return None
        if current is not None:
            ckpt.rollbacks = known_rollbacks(ckpt, current)
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
                # a peer outside the roster leads only when every holder is lost: its stop says so (see follows)
                lost=list(range(len(current.roster))) if current and self.peer_id not in current.roster else [],
                stop=reason,
                time=time.time(),
            )
        )
        raise SwarmStopped(reason)
