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
import struct
import threading
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
from checkfree.swarm.records import EpochRecord, MemberRecord, known_rollbacks
from checkfree.swarm.restart import resume_step


def probe(host: str, port: int, timeout_s: float = 0.3) -> str:
    """Ask a peer's probe port whether its process lives: ``refused`` (the host answers, nothing listens:
    the process is gone), ``alive`` (it answered within ``timeout_s``), ``frozen`` (its host accepted the
    connection but the process did not answer: stopped, or stuck) or ``silent`` (no connection: a vanished
    host, a lost route, a network partition, or no address known). ``silent`` is the only answer that leaves
    open that the peer lives on the other side of a partition (see ``View.unreachable``)."""
    return _probe(host, port, timeout_s, PROBE_ASK)


NO_ANSWER = ("silent", "frozen")  # the probe answers that say the peer cannot serve now


def _probe(host: str, port: int, timeout_s: float, request: bytes) -> str:
    if not port:
        return "silent"
    try:
        conn = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "silent"
    try:
        conn.settimeout(timeout_s)
        conn.sendall(request)
        return "alive" if conn.recv(1) == PROBE_REPLY else "frozen"
    except OSError:
        return "frozen"
    finally:
        conn.close()


def read_probe(host: str, port: int, timeout_s: float = 0.5) -> tuple[str, bytes | None]:
    """Probe a peer and read the member record its probe port serves after the reply byte (the record of its
    last heartbeat, straight from the peer, sealed: see ``Membership.open_member``): (``probe``'s answer, the
    sealed record or None). A leader whose DHT view is partial (a freshly joined node, a node whose DHT
    neighbours were killed) learns a roster member's state this way, and the members of an epoch watch each
    other this way without reading the DHT."""
    if not port:
        return "silent", None
    buf = b""
    try:
        conn = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return "refused", None
    except OSError:
        return "silent", None
    try:
        conn.settimeout(timeout_s)
        conn.sendall(PROBE_ASK)
        while len(buf) <= MAX_RECORD_BYTES:
            chunk = conn.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError:
        pass
    finally:
        conn.close()
    if not buf.startswith(PROBE_REPLY):
        return "frozen", None
    body = buf[len(PROBE_REPLY) :]
    return "alive", body if body and len(buf) <= MAX_RECORD_BYTES else None


def knock(addresses: list[tuple[str, int]], epoch: bytes | None = None) -> None:
    """Wake the peers at these probe addresses, in a background thread: a knock (``PROBE_KNOCK`` sent to a
    peer's probe port) makes a peer that waits for an epoch read the swarm at once instead of at its next
    poll, and a peer that trains run its watch round at once (it reads the knocker's record there). A member
    that reports its epoch broken knocks the others (the leader among them); the leader knocks the roster it
    publishes with the epoch record itself (``PROBE_EPOCH``, its length, the record sealed by
    ``Membership.seal_epoch``), which the members join without waiting for a DHT round trip (the same record
    is in the DHT for everyone else)."""
    request = PROBE_KNOCK
    if epoch is not None:
        request = PROBE_EPOCH + struct.pack("!I", len(epoch)) + epoch

    def run() -> None:
        for host, port in addresses:
            _probe(host, port, 0.2, request)

    if addresses:
        threading.Thread(target=run, name="knock", daemon=True).start()


MAX_RECORD_BYTES = 1 << 16
# the probe protocol: the client sends one request byte, the peer answers PROBE_REPLY, then its member record
PROBE_ASK = b"?"  # read the record
PROBE_KNOCK = b"!"  # read it, and wake the peer: something changed (see ``knock``)
PROBE_EPOCH = b"E"  # a knock that carries the epoch record just published (see ``knock``)
PROBE_REPLY = b"k"
PROBE_TIMEOUT_S = 0.5  # a probe not answered in this time is "silent"


class View:
    """How much of the swarm this peer has seen (see the module doc). Shared by the peer's main thread
    (deciding) and its heartbeat thread (watching the epoch), so that a probe answer or a heartbeat seen by
    one serves the other."""

    def __init__(
        self, ttl_s: float, spare_wait_s: float, period_s: float | None = None, store_period_s: float | None = None
    ):
        """``period_s``: how often members' records are read through their probe ports (``membership.watch_s``);
        ``store_period_s``: how often they are stored in the DHT (``membership.period_s``)."""
        self.ttl_s, self.spare_wait_s = ttl_s, spare_wait_s
        self.period_s = period_s if period_s is not None else ttl_s / 4
        self.store_period_s = store_period_s if store_period_s is not None else ttl_s / 4
        self.started = time.monotonic()
        self.witnessed: set[int] = set()  # epochs in which this peer saw another roster member alive
        self.dead: set[str] = set()  # peers whose probe was refused, or frozen (see ``frozen``)
        self.excluded: set[str] = set()  # dead whatever their probe says (see Leader.excluded)
        self._probed: dict[int, tuple[float, bool]] = {}  # epoch -> (when, every roster probe refused)
        self._answers: dict[str, tuple[float, str]] = {}  # peer -> (when, its probe's last answer)
        self._missing_since: dict[str, float] = {}  # roster peers missing from the view, answering probes
        self._beats: dict[str, tuple[float, float]] = {}  # peer -> (its record's time, when first seen here)
        self._lock = threading.Lock()

    def answer(self, pid: str, host: str, port: int, max_age_s: float = 1.0) -> str:
        """``probe(host, port)`` of peer ``pid``, reusing an answer younger than ``max_age_s`` (a refusal is
        final). A silent probe waits ``PROBE_TIMEOUT_S``: a live process answers within milliseconds, also on a
        loaded machine (its probe thread does nothing else), so a silent one is frozen or cut off."""
        now = time.monotonic()
        with self._lock:
            when, answer = self._answers.get(pid, (-1e9, "silent"))
        if answer == "refused" or now - when < max_age_s:
            return answer
        answer = probe(host, port, PROBE_TIMEOUT_S)
        with self._lock:
            self._answers[pid] = (time.monotonic(), answer)
        if answer == "refused":
            self.dead.add(pid)
        return answer

    def note(self, members: dict[str, MemberRecord]) -> None:
        """Remember when each member's heartbeat was last seen to change (a record's ``time`` is new with
        every heartbeat); ``stalled`` reads it."""
        now = time.monotonic()
        with self._lock:
            for pid, r in members.items():
                seen = self._beats.get(pid)
                if seen is None or seen[0] != r.time:
                    self._beats[pid] = (r.time, now)

    def stalled(self, pid: str) -> bool:
        """No new heartbeat of ``pid`` seen for more than 1.5 heartbeat periods (a beat late or missed: then
        its probe decides, see ``frozen``); a peer never seen counts from the first time it is asked about."""
        with self._lock:
            seen = self._beats.setdefault(pid, (None, time.monotonic()))
        return time.monotonic() - seen[1] > 1.5 * self.period_s

    def heard(self, pid: str, answer: str) -> None:
        """Record a probe answer got elsewhere (the watch reads records through the probe port)."""
        with self._lock:
            self._answers[pid] = (time.monotonic(), answer)
        if answer == "refused":
            self.dead.add(pid)

    def frozen(self, pid: str, record: MemberRecord) -> bool:
        """A member whose heartbeat stalled and whose probe does not answer: its process is frozen (SIGSTOP,
        swapping, a stuck host) or gone with its host. Seen within ~2 heartbeat periods, instead of waiting
        for its record to expire after ``membership.ttl_s``. A peer merely slow to heartbeat (a busy DHT, a
        loaded machine) still answers its probe: its probe thread does nothing else."""
        if pid in self.dead:
            return True
        if not self.stalled(pid) or self.answer(pid, record.host, record.probe_port, self.period_s) not in NO_ANSWER:
            return False
        self.dead.add(pid)
        return True

    def hidden(self, members: dict[str, MemberRecord], current: EpochRecord, bounded: bool = True) -> list[int]:
        """Roster stages whose record this peer does not see but whose process answers its probe: this view
        is partial (a DHT that has not filled, or is slow), so no loss may be concluded from it. ``bounded``:
        a member that stays hidden for 3 heartbeat TTLs counts as lost anyway (a peer that answers but
        cannot heartbeat cannot serve)."""
        out, now = [], time.monotonic()
        for stage, pid in enumerate(current.roster):
            with self._lock:
                last = self._answers.get(pid, (0.0, "silent"))[1]
            # a peer found dead by silence alone (a frozen heartbeat and no connection) may have been across a
            # partition that healed: when it answers again, this view is partial, not it lost
            gone = pid in self.excluded or (pid in self.dead and last in ("refused", "frozen"))
            if pid in members or gone or stage >= len(current.probes):
                self._missing_since.pop(pid, None)
                continue
            answer = self.answer(pid, *current.probes[stage], 0.0 if pid in self.dead else 1.0)  # dead: ask anew
            if answer == "alive":
                since = self._missing_since.setdefault(pid, now)
                if not bounded or now - since < 3 * self.ttl_s:
                    out.append(stage)
        return out

    def unreachable(self, members: dict[str, MemberRecord], current: EpochRecord) -> tuple[list[str], int]:
        """The voters of ``current`` (its roster and the spares it recorded) that may live across a network
        partition: not known gone, and their host does not even accept a connection
        (``silent``); and how many voters there are. A peer refused (crashed) or accepted but mute (frozen) is
        on this side and surely lost, also once a frozen one's accept queue fills and it turns silent."""
        voters = list(zip(current.roster, current.probes)) + list(zip(current.spares, current.spare_probes))
        if len(current.probes) < len(current.roster):  # a record without probes: every voter unknown
            voters = [(pid, ("", 0)) for pid in current.roster]
        out = []
        for pid, (host, port) in voters:
            # by probe, never by the DHT view: a record stored before a split lingers there for up to ttl_s, and
            # counting such records (they expire at different moments) once let a minority pass for a majority
            with self._lock:
                last = self._answers.get(pid, (0.0, "silent"))[1]
            if pid in self.dead and last in ("refused", "frozen"):
                continue
            if self.answer(pid, host, port, self.period_s) == "silent":
                out.append(pid)
        return out, len(voters)

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
        """Watched long enough that every live member has stored its record into this view twice over (each
        stores one at its start and every ``membership.period_s``; expired ones are gone after ``ttl_s``)."""
        return time.monotonic() - self.started >= min(self.ttl_s, 2 * self.store_period_s)

    def observe(self, members: dict[str, MemberRecord], current: EpochRecord | None) -> None:
        self.note(members)
        if current is not None and any(pid in members for pid in current.roster):
            self.witnessed.add(current.epoch)

    def confirmed(self, members: dict[str, MemberRecord], current: EpochRecord | None) -> dict[str, MemberRecord]:
        """``members`` without the roster members whose process is confirmed gone: once a member reports the
        current epoch broken, every other member still heartbeating "running" or "joining" is probed; a
        refusal (a crash) or a stalled heartbeat with a silent probe (a hang) confirms it at once, without
        waiting for its record to expire."""
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
                if self.stalled(pid):
                    self.frozen(pid, r)
                else:
                    self.answer(pid, r.host, r.probe_port, 0.25)  # a refusal confirms a crash
        return {pid: r for pid, r in members.items() if pid not in self.dead}


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
    ):
        self.cfg, self.peer_id, self.run_id, self.fingerprint = cfg, peer_id, run_id, fingerprint
        self.membership, self.ckpt, self.replicas_on, self.emit = membership, ckpt, replicas_on, emit
        self.hosted: dict[int, dist.TCPStore] = {}  # epoch -> the rendezvous store this peer hosts
        self.gates: dict[int, Gate] = {}  # epoch -> the gate in front of that store
        self.reason = ""  # why no epoch is published yet (heartbeated as the peer's note)
        self.waiting_since: float | None = None  # monotonic time the leader started waiting for peers
        self.started = time.monotonic()
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
                and time.monotonic() - view.started < view.spare_wait_s
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
            checkpoint_step=self._latest_complete(ckpt, current),
            checkpoint_every=cfg.checkpoint.every_steps if ckpt else 0,
            has_checkpoint=lambda s: ckpt is not None and ckpt.latest_for_stage(s) is not None,
            replicas_on=self.replicas_on,
            spares_for_first_epoch=time.monotonic() - self.started > cfg.swarm.first_epoch_grace_s,
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
                self.waiting_since = self.waiting_since or time.monotonic()
                if time.monotonic() - self.waiting_since > cfg.swarm.spare_wait_s:
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
                    view.dead.add(pid)  # not "hidden" either: it is out, whatever its probe says
                    view.excluded.add(pid)
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
        t_host = time.monotonic()
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
        t0 = time.monotonic()
        self.membership.publish_epoch(rec)
        knock([a for pid, a in zip(rec.roster, rec.probes) if pid != self.peer_id], self.membership.seal_epoch(rec))
        self.reason = ""
        self.emit(
            "epoch_published",
            publish_s=time.monotonic() - t0,
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
    def _latest_complete(ckpt: CheckpointStore | None, current: EpochRecord | None) -> int | None:
        """The newest step every stage saved in the current timeline (the rollbacks ``current`` lists, and
        any this peer learnt of before)."""
        if ckpt is None:
            return None
        if current is not None:
            ckpt.rollbacks = known_rollbacks(ckpt, current)
        return ckpt.latest_complete()

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
