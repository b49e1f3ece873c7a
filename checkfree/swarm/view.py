"""
View
====

How much of the swarm a peer has seen, and which members it has confirmed lost. Shared by the peer's main
thread (deciding, while it leads) and its watch thread (watching the epoch's members), so that a probe
answer or a heartbeat seen by one serves the other.

A member is confirmed lost only by evidence that a live process cannot produce:
- **refused**: its probe port refuses a connection (the host answers, nothing listens: the process is gone);
- **frozen**: its heartbeat stalled, and probes carrying fresh nonces went unanswered for ``hang_s`` on end
  (the last one still in flight until that window closes, so a process stopped for less than ``hang_s``, by a
  SIGSTOP pulse, a GC pause or a starved CPU, answers it when it resumes and is never declared lost).
A peer found frozen that heartbeats or answers a fresh probe again is taken off the dead list: it is a
candidate again (as a holder or a spare), never a ghost. Time comes from an injectable ``clock``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from checkfree.swarm.probe import NO_ANSWER, PROBE_TIMEOUT_S, ProbeClient
from checkfree.swarm.records import EpochRecord, MemberRecord


class View:
    def __init__(
        self,
        ttl_s: float,
        spare_wait_s: float,
        period_s: float | None = None,
        store_period_s: float | None = None,
        prober: ProbeClient | None = None,
        hang_s: float = 1.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``period_s``: how often members' records are read through their probe ports (``membership.watch_s``);
        ``store_period_s``: how often they are stored in the DHT (``membership.period_s``); ``hang_s``: how long
        a member must stay unanswering to be found frozen (``membership.hang_s``)."""
        self.ttl_s, self.spare_wait_s, self.hang_s, self.clock = ttl_s, spare_wait_s, hang_s, clock
        self.prober = prober
        self.period_s = period_s if period_s is not None else ttl_s / 4
        self.store_period_s = store_period_s if store_period_s is not None else ttl_s / 4
        self.started = clock()
        self.witnessed: set[int] = set()  # epochs in which this peer saw another roster member alive
        self.dead: set[str] = set()  # confirmed lost: refused, frozen or excluded (see ``why_dead``)
        self.why_dead: dict[str, str] = {}
        self.excluded: set[str] = set()  # dead whatever their probe says (see Leader.excluded)
        self.revived = 0  # peers found frozen that answered again (each would have been a healthy eviction)
        self._probed: dict[int, tuple[float, bool]] = {}  # epoch -> (when, every roster probe refused)
        self._answers: dict[str, tuple[float, str]] = {}  # peer -> (when, its probe's last answer)
        self._missing_since: dict[str, float] = {}  # roster peers missing from the view, answering probes
        self._beats: dict[str, tuple[float | None, float]] = {}  # peer -> (its record's time, when first seen)
        self._unanswered_since: dict[str, float] = {}  # peer -> when the first of its unanswered probes was sent
        self._last_unanswered: dict[str, float] = {}  # peer -> when its last unanswered probe ended
        self._lock = threading.Lock()

    # ---- probing -------------------------------------------------------------------------------
    def _probe(self, pid: str, host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> str:
        if self.prober is None:
            return "silent" if not port else "alive"  # a view without a prober (unit tests) sees no probe
        return self.prober.probe(host, port, pid, timeout_s)

    def answer(self, pid: str, host: str, port: int, max_age_s: float = 1.0) -> str:
        """The probe answer of peer ``pid``, reusing one younger than ``max_age_s`` (a refusal is final)."""
        now = self.clock()
        with self._lock:
            when, answer = self._answers.get(pid, (-1e9, "silent"))
        if answer == "refused" or now - when < max_age_s:
            return answer
        sent = self.clock()
        return self.heard(pid, self._probe(pid, host, port), sent)

    def heard(self, pid: str, answer: str, sent: float | None = None) -> str:
        """Record a probe answer (of a probe sent at ``sent``; the watch reads records through the probe port)."""
        now = self.clock()
        with self._lock:
            self._answers[pid] = (now, answer)
            if answer == "alive":
                self._unanswered_since.pop(pid, None)
            elif answer in NO_ANSWER:
                start = now - PROBE_TIMEOUT_S if sent is None else sent
                last = self._last_unanswered.get(pid)
                if last is None or start - last > self.hang_s:  # not one stretch with the earlier ones: anew
                    self._unanswered_since[pid] = start
                else:
                    self._unanswered_since.setdefault(pid, start)
                self._last_unanswered[pid] = now
        if answer == "refused":
            self._mark(pid, "refused")
        elif answer == "alive":
            self._revive(pid)
        return answer

    def _mark(self, pid: str, why: str) -> None:
        with self._lock:
            self.dead.add(pid)
            self.why_dead.setdefault(pid, why)

    def _revive(self, pid: str) -> None:
        """A peer found frozen lives: it is a candidate again (refused and excluded peers stay out)."""
        with self._lock:
            if self.why_dead.get(pid) == "frozen" and pid not in self.excluded:
                self.dead.discard(pid)
                del self.why_dead[pid]
                self.revived += 1

    def exclude(self, pid: str) -> None:
        with self._lock:
            self.excluded.add(pid)
            self.dead.add(pid)
            self.why_dead[pid] = "excluded"

    # ---- heartbeats ----------------------------------------------------------------------------
    def note(self, members: dict[str, MemberRecord]) -> None:
        """Remember when each member's heartbeat was last seen to change (a record's ``time`` is new with every
        heartbeat, and only the member can seal a new one): a new one is a sign of life."""
        now, fresh = self.clock(), []
        with self._lock:
            for pid, r in members.items():
                self._missing_since.pop(pid, None)  # seen: a later gap counts from its own start
                seen = self._beats.get(pid)
                if seen is None or seen[0] != r.time:
                    if seen is not None and seen[0] is not None and r.time > seen[0]:
                        fresh.append(pid)
                        self._unanswered_since.pop(pid, None)
                    self._beats[pid] = (r.time, now)
        for pid in fresh:
            self._revive(pid)

    def stalled(self, pid: str) -> bool:
        """No new heartbeat of ``pid`` seen for more than 1.5 watch periods; a peer never seen counts from the
        first time it is asked about."""
        with self._lock:
            seen = self._beats.setdefault(pid, (None, self.clock()))
        return self.clock() - seen[1] > 1.5 * self.period_s

    def frozen(self, pid: str, host: str, port: int) -> bool:
        """Whether ``pid`` is confirmed frozen (see the module doc): its heartbeat stalled and every probe of it
        since the first unanswered one, ``hang_s`` ago at least, went unanswered. While the window is open,
        the confirming probe waits until it closes (a process that resumes by then answers it)."""
        if pid in self.dead:
            return True
        if not self.stalled(pid):
            return False
        with self._lock:
            since = self._unanswered_since.get(pid)
        if since is None:  # nothing unanswered yet: ask now
            sent = self.clock()
            if self.heard(pid, self._probe(pid, host, port), sent) not in NO_ANSWER:
                return False
            with self._lock:
                since = self._unanswered_since.get(pid, sent)
        wait = max(PROBE_TIMEOUT_S, since + self.hang_s - self.clock())
        sent = self.clock()
        if self.heard(pid, self._probe(pid, host, port, wait), sent) not in NO_ANSWER:
            return False
        with self._lock:  # an old unanswered probe is no part of this stretch (``heard`` started it anew)
            since = self._unanswered_since.get(pid, sent)
        if self.clock() - since < self.hang_s or not self.stalled(pid):
            return False
        self._mark(pid, "frozen")
        return True

    # ---- what the leader may conclude ----------------------------------------------------------
    def _gone(self, pid: str) -> bool:
        with self._lock:
            return pid in self.dead

    def hidden(self, members: dict[str, MemberRecord], current: EpochRecord, bounded: bool = True) -> list[int]:
        """Roster stages whose record this peer does not see but whose process answers its probe: this view
        is partial (a DHT that has not filled, or is slow), so no loss may be concluded from it. ``bounded``:
        a member that stays hidden for 3 heartbeat TTLs counts as lost anyway (a peer that answers but
        cannot heartbeat cannot serve)."""
        out, now = [], self.clock()
        for stage, pid in enumerate(current.roster):
            if pid in members or pid in self.excluded or stage >= len(current.probes):
                self._missing_since.pop(pid, None)
                continue
            with self._lock:
                last = self._answers.get(pid, (0.0, "silent"))[1]
            if pid in self.dead and last in ("refused", "frozen"):
                continue  # a frozen one that resumes heartbeats again (``note`` revives it)
            # a peer found dead by silence may have been across a partition that healed: ask it anew
            answer = self.answer(pid, *current.probes[stage], 0.0 if pid in self.dead else 1.0)
            if answer == "alive":
                since = self._missing_since.setdefault(pid, now)
                if not bounded or now - since < 3 * self.ttl_s:
                    out.append(stage)
            elif answer in NO_ANSWER and not self.frozen(pid, *current.probes[stage]):
                out.append(stage)  # unanswered, but not for hang_s on end yet: not known to be lost
        return out

    def unreachable(self, members: dict[str, MemberRecord], current: EpochRecord) -> tuple[list[str], int]:
        """The voters of ``current`` (its roster and the spares it recorded) that may live across a network
        partition (not known gone, and their host does not even accept a connection: ``silent``), and how
        many voters there are. Counted by probe, never by the DHT view: a record stored before a split
        lingers there for up to ttl_s, and counting such records once let a minority pass for a majority."""
        voters = list(zip(current.roster, current.probes)) + list(zip(current.spares, current.spare_probes))
        if len(current.probes) < len(current.roster):  # a record without probes: every voter unknown
            voters = [(pid, ("", 0)) for pid in current.roster]
        out = []
        for pid, (host, port) in voters:
            with self._lock:
                last = self._answers.get(pid, (0.0, "silent"))[1]
            if pid in self.dead and last in ("refused", "frozen"):
                continue
            if self.answer(pid, host, port, self.period_s) == "silent":
                out.append(pid)
        return out, len(voters)

    def answering(self, current: EpochRecord, members: dict[str, MemberRecord]) -> bool:
        """Whether a roster member missing from this view answers its probe. A stop is final: it is never
        published while one does, however long this view stays partial."""
        return bool(self.hidden(members, current, bounded=False))

    def all_refused(self, current: EpochRecord) -> bool:
        """Whether every roster member's probe port refuses (all their processes are gone), seen without the
        member records. Probed at most once a second."""
        if len(current.probes) != len(current.roster):
            return False
        when, refused = self._probed.get(current.epoch, (-1e9, False))
        if self.clock() - when >= 1.0:
            refused = all(
                self._probe(pid, host, port) == "refused" for pid, (host, port) in zip(current.roster, current.probes)
            )
            self._probed[current.epoch] = (self.clock(), refused)
        return refused

    @property
    def settled(self) -> bool:
        """Watched long enough that every live member has stored its record into this view twice over."""
        return self.clock() - self.started >= min(self.ttl_s, 2 * self.store_period_s)

    def observe(self, members: dict[str, MemberRecord], current: EpochRecord | None) -> None:
        self.note(members)
        if current is not None and any(pid in members for pid in current.roster):
            self.witnessed.add(current.epoch)

    def confirmed(self, members: dict[str, MemberRecord], current: EpochRecord | None) -> dict[str, MemberRecord]:
        """``members`` without the roster members confirmed lost: once a member reports the current epoch
        broken, every other member still heartbeating "running" or "joining" is probed; a refusal (a crash)
        or a confirmed freeze (a hang) counts at once, without waiting for its record to expire."""
        if current is None:
            return {pid: r for pid, r in members.items() if not self._gone(pid)}
        broken = any(
            members[pid].epoch == current.epoch and members[pid].state == "recovering"
            for pid in current.roster
            if pid in members
        )
        for pid in current.roster:
            r = members.get(pid)
            if broken and r is not None and not self._gone(pid) and r.state in ("running", "joining"):
                if self.stalled(pid):
                    self.frozen(pid, r.host, r.probe_port)
                else:
                    self.answer(pid, r.host, r.probe_port, 0.25)  # a refusal confirms a crash
        return {pid: r for pid, r in members.items() if not self._gone(pid)}
