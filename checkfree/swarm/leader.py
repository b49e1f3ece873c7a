"""
Leader
======

The leader's job in a peer: while every member is stalled after a failure (or before the first epoch),
the peer that ``coordinator.leader_of`` names gathers the live members' records, asks
``coordinator.decide_epoch`` for the next epoch, hosts that epoch's rendezvous store and publishes the
epoch record; when no epoch can ever form, it publishes a stop record so every peer exits saying why.
The rules are pure functions in ``coordinator``; this module only gathers the view and acts.

``View`` is what makes that view trustworthy: a peer decides nothing until it has watched the members for a
heartbeat TTL (every live member has heartbeated into its view by then), a spare that never saw a member
of the current epoch alive does not declare them all lost before ``swarm.spare_wait_s`` (its DHT may not
have filled yet), and a member whose record still says "running" while the others report the step broken
is probed: a refused connection to its probe port confirms at once that its process is gone.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from checkfree.core.checkpoint import CheckpointStore
from checkfree.swarm.coordinator import Decision, SwarmStopped, decide_epoch, stage_holders
from checkfree.swarm.membership import EpochRecord, MemberRecord, Membership


def probe(host: str, port: int, timeout_s: float = 0.3) -> str:
    """Ask a peer's probe port whether its process lives: ``refused`` (the host answers, nothing listens:
    the process is gone), ``alive`` (it answered within ``timeout_s``) or ``silent`` (no answer: a frozen
    process, a vanished host, a lost route, or none known)."""
    if not port:
        return "silent"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            return "alive" if conn.recv(1) == PROBE_REPLY else "silent"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "silent"


PROBE_REPLY = b"k"


class View:
    """How much of the swarm this peer has seen (see the module doc)."""

    def __init__(self, ttl_s: float, spare_wait_s: float):
        self.ttl_s, self.spare_wait_s = ttl_s, spare_wait_s
        self.started = time.monotonic()
        self.witnessed: set[int] = set()  # epochs in which this peer saw another roster member alive
        self.dead: set[str] = set()  # peers whose probe was refused
        self._probed: dict[int, tuple[float, bool]] = {}  # epoch -> (when, every roster probe refused)
        self._answers: dict[str, tuple[float, str]] = {}  # peer -> (when, its probe's last answer)
        self._missing_since: dict[str, float] = {}  # roster peers missing from the view, answering probes

    def hidden(self, members: dict[str, MemberRecord], current: EpochRecord, bounded: bool = True) -> list[int]:
        """Roster stages whose record this peer does not see but whose process answers its probe: this view
        is partial (a DHT that has not filled, or is slow), so no loss may be concluded from it. ``bounded``:
        a member that stays hidden for 3 heartbeat TTLs counts as lost anyway (a peer that answers but
        cannot heartbeat cannot serve)."""
        out, now = [], time.monotonic()
        for stage, pid in enumerate(current.roster):
            if pid in members or pid in self.dead or stage >= len(current.probes):
                self._missing_since.pop(pid, None)
                continue
            when, answer = self._answers.get(pid, (0.0, "silent"))
            if now - when >= 1.0:
                answer = probe(*current.probes[stage])
                self._answers[pid] = (now, answer)
            if answer == "refused":
                self.dead.add(pid)
            elif answer == "alive":
                since = self._missing_since.setdefault(pid, now)
                if not bounded or now - since < 3 * self.ttl_s:
                    out.append(stage)
        return out

    def answering(self, current: EpochRecord, members: dict[str, MemberRecord]) -> bool:
        """Whether a roster member missing from this view answers its probe. A stop is final: it is never
        published while one does, however long this view stays partial (a soak saw a spare's DHT show no
        member for 100 s while the swarm trained)."""
        return bool(self.hidden(members, current, bounded=False))

    def all_refused(self, current: EpochRecord) -> bool:
        """Whether every roster member's probe port refuses: all their processes are gone, seen without the
        member records (which a freshly joined node's DHT may not show yet). Probed at most once a second."""
        if len(current.probes) != len(current.roster):
            return False
        when, refused = self._probed.get(current.epoch, (0.0, False))
        if time.monotonic() - when >= 1.0:
            refused = all(probe(host, port) == "refused" for host, port in current.probes)
            self._probed[current.epoch] = (time.monotonic(), refused)
        return refused

    @property
    def settled(self) -> bool:
        return time.monotonic() - self.started >= self.ttl_s

    def observe(self, members: dict[str, MemberRecord], current: EpochRecord | None) -> None:
        if current is not None and any(pid in members for pid in current.roster):
            self.witnessed.add(current.epoch)

    def confirmed(self, members: dict[str, MemberRecord], current: EpochRecord | None) -> dict[str, MemberRecord]:
        """``members`` without the roster members whose process is confirmed gone."""
        if current is None:
            return members
        broken = any(
            members[pid].epoch == current.epoch and members[pid].state == "recovering"
            for pid in current.roster
            if pid in members
        )
        for pid in current.roster:
            r = members.get(pid)
            if broken and r is not None and pid not in self.dead and r.state in ("running", "joining"):
                if probe(r.host, r.probe_port) == "refused":
                    self.dead.add(pid)
        return {pid: r for pid, r in members.items() if pid not in self.dead}


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
    ):
        self.cfg, self.peer_id, self.run_id, self.fingerprint = cfg, peer_id, run_id, fingerprint
        self.membership, self.ckpt, self.replicas_on, self.emit = membership, ckpt, replicas_on, emit
        self.hosted: dict[int, dist.TCPStore] = {}  # epoch -> the rendezvous store this peer hosts
        self.reason = ""  # why no epoch is published yet (heartbeated as the peer's note)
        self.waiting_since: float | None = None  # monotonic time the leader started waiting for peers
        self.started = time.monotonic()

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
                and time.monotonic() - view.started < view.spare_wait_s
            ):
                why = (
                    f"no member of epoch {current.epoch} seen alive yet: not declaring them lost before "
                    f"swarm.spare_wait_s={view.spare_wait_s} s"
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
            checkpoint_step=ckpt.latest_complete() if ckpt else None,
            has_checkpoint=lambda s: ckpt is not None and ckpt.latest_for_stage(s) is not None,
            replicas_on=self.replicas_on,
            spares_for_first_epoch=time.monotonic() - self.started > cfg.swarm.first_epoch_grace_s,
        )
        if decision.fatal and view is not None and current is not None and view.answering(current, members):
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
                self.waiting_since = self.waiting_since or time.monotonic()
                if time.monotonic() - self.waiting_since > cfg.swarm.spare_wait_s:
                    self.stop_swarm(
                        current, f"{decision.reason} for more than swarm.spare_wait_s={cfg.swarm.spare_wait_s} s", step
                    )
            return
        self.waiting_since = None
        epoch = 0 if current is None else current.epoch + 1
        reforms = 0
        own = current is not None and all(decision.roster[s] == current.roster[s] for s in decision.lost)
        if current is not None and own and decision.step == current.step:
            # the last epoch broke before its first commit and nobody new is needed: every member is the same
            # peer (at most rebuilding its own stage again); that cannot repeat forever
            reforms = current.reforms + 1
        if reforms > cfg.swarm.max_reforms:
            errors = sorted({f"{pid}: {members[pid].error}" for pid in decision.roster if members[pid].error})
            self.stop_swarm(
                current,
                f"{reforms} epochs in a row broke at step {decision.step} with every member alive "
                f"(swarm.max_reforms={cfg.swarm.max_reforms}): a member's data plane may be unreachable or a "
                f"step may break every time; last errors: {'; '.join(errors)[:800]}",
                step,
            )
        host = cfg.membership.host
        store = dist.TCPStore(
            host,
            0,
            cfg.model.num_stages,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=cfg.transport.rendezvous_timeout_s),
        )
        self.hosted[epoch] = store
        for old in [e for e in self.hosted if e < epoch - 1]:
            del self.hosted[old]
        rec = EpochRecord(
            run_id=self.run_id,
            fingerprint=self.fingerprint,
            epoch=epoch,
            roster=decision.roster,
            store_host=cfg.membership.announce_host or host,
            store_port=store.port,
            step=decision.step,
            leader=self.peer_id,
            lost=list(decision.lost),
            plans=list(decision.plans),
            rollback_to=decision.rollback_to,
            probes=[(members[pid].host, members[pid].probe_port) for pid in decision.roster],
            reforms=reforms,
            stale_shadows=list(decision.stale_shadows),
            time=time.time(),
        )
        self.membership.publish_epoch(rec)
        self.reason = ""
        self.emit(
            "epoch_published",
            new_epoch=epoch,
            roster=rec.roster,
            step=rec.step,
            lost=rec.lost,
            plans=[p.model_dump() for p in rec.plans],
            rollback_to=rec.rollback_to,
            reason=decision.reason,
        )

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
