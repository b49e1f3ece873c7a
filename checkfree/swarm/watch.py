"""
Watch
=====

A peer's background threads, each a small class of its own, and the one object they share with the main
thread:

- ``EpochSlot``: the epoch this peer is joining or training in, and why it is over. The main thread begins
  and leaves epochs; the watch and the DHT thread end one (a member lost, a newer epoch published), which
  aborts its process group so that every wait of the epoch fails now, not after a socket timeout.
- ``Watch`` (the heartbeat thread): every ``membership.watch_s``, or at once when knocked, serves a fresh
  record on the probe port and reads every other member's record from theirs. No DHT call is made here, so a
  knock is acted on within milliseconds. A refused probe (the process is gone), a confirmed freeze (its
  heartbeat stalled and probes went unanswered for ``membership.hang_s``: see ``view``) or a member that
  reports the epoch broken ends the epoch for this peer.
- ``DhtLoop`` (the DHT thread): every ``membership.period_s`` (or at once when asked) stores this peer's
  record in the DHT, where spares, the launcher and ``status`` read it; while in an epoch it reads the
  DHT's epoch record (a newer one ends this one) and re-stores it so that it outlives any run. Kept apart
  from the watch because DHT stores are what the failure-free swarm pays for, while probes cost next to
  nothing.
- ``Reader``: the members' records read straight from their probe ports, for a leader whose DHT view is
  partial (a freshly joined node, a node whose DHT neighbours were killed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from checkfree.swarm.membership import DHTUnavailable, Membership
from checkfree.swarm.probe import NO_ANSWER, ProbeClient
from checkfree.swarm.records import EpochRecord, MemberRecord
from checkfree.swarm.transport import EpochGroup
from checkfree.swarm.view import View

logger = logging.getLogger(__name__)


class EpochSlot:
    """The epoch being joined or trained in (``joined``), why it is over (``over``, set once), the stages it
    ended for (``over_stages``), its process group, and the newest epoch record a leader pushed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.joined: EpochRecord | None = None
        self.over: str | None = None
        self.over_stages: list[int] = []
        self.group: EpochGroup | None = None
        self.pushed: EpochRecord | None = None

    def begin(self, rec: EpochRecord) -> None:
        with self.lock:
            self.joined, self.over, self.over_stages = rec, None, []

    def attach(self, group: EpochGroup) -> None:
        """The epoch's group formed; if the epoch ended meanwhile, no wait of the group may outlive that."""
        with self.lock:
            self.group, over = group, self.over
        if over is not None:
            group.abort(over)

    def end(self, rec: EpochRecord, reason: str, stages: list[int]) -> None:
        """End epoch ``rec`` for this peer, if it is still the one being joined or trained in (the main thread
        may have moved on while another thread looked)."""
        with self.lock:
            if self.joined is not rec or self.over is not None:
                return
            self.over, self.over_stages = reason, stages
            group = self.group
        if group is not None and group.epoch == rec.epoch:
            group.abort(reason)

    def leave(self) -> EpochRecord | None:
        """Forget the epoch (it broke, or this peer stops); the record it was."""
        with self.lock:
            rec, self.joined = self.joined, None
        return rec

    def close_group(self, reason: str | None = None) -> None:
        """Abort (with ``reason``) and close the epoch's group, if any."""
        with self.lock:
            group, self.group = self.group, None
        if group is not None:
            if reason is not None:
                group.abort(reason)
            group.close()

    def blame(self, suspect: int | None, own: int | None) -> list[int]:
        """The stages this peer's epoch broke on, as far as it knows: those the watch ended it for, else the
        stage the transport was waiting on (the leader singles out a peer that every other member blames)."""
        with self.lock:
            if self.over is not None:
                return list(self.over_stages)
        return [suspect] if suspect is not None and suspect != own else []

    def push(self, rec: EpochRecord) -> None:
        with self.lock:
            if self.pushed is None or rec.epoch > self.pushed.epoch:
                self.pushed = rec


class Watch:
    """The heartbeat thread (see the module doc). ``serve_now()`` refreshes the record on the probe port;
    ``before_round()`` runs first in every round (fault injection)."""

    def __init__(
        self,
        peer_id: str,
        period_s: float,
        view: View,
        prober: ProbeClient,
        membership: Membership,
        slot: EpochSlot,
        serve_now: Callable[[], object],
        before_round: Callable[[], None] = lambda: None,
    ):
        self.peer_id, self.period_s, self.view, self.prober = peer_id, period_s, view, prober
        self.membership, self.slot, self.serve_now, self.before_round = membership, slot, serve_now, before_round
        self.hang_s = view.hang_s
        self.knocked = threading.Event()  # a knock: watch the members now
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.serve_now()
                self.round()
            except Exception:  # this thread must outlive any one bad round
                logger.exception("[peer %s] watch round failed", self.peer_id)
            self.knocked.wait(self.period_s)
            self.knocked.clear()

    def round(self) -> None:
        """Read every other member's record from its probe port and end the epoch for this peer when one is
        gone, confirmed frozen, or reports the epoch broken."""
        self.before_round()
        rec = self.slot.joined
        if rec is None or self.slot.over is not None:
            return
        gone, frozen, broke = [], [], []
        for stage, pid in enumerate(rec.roster):
            if pid == self.peer_id or stage >= len(rec.probes):
                continue
            sent = time.monotonic()
            answer, value = self.prober.ask(*rec.probes[stage], pid)
            self.view.heard(pid, answer, sent)
            r = self.membership.open_member(value, pid) if value is not None else None
            if answer == "refused":
                gone.append(stage)
            elif r is not None:
                self.view.note({pid: r})
                if r.epoch == rec.epoch and r.state in ("recovering", "leaving"):
                    broke.append(stage)  # it will not join or answer in this epoch any more
            elif answer in NO_ANSWER and self.view.frozen(pid, *rec.probes[stage]):
                frozen.append(stage)  # stalled, and unanswered for membership.hang_s on end
        if gone:
            self.slot.end(rec, f"stages {gone} of epoch {rec.epoch} lost: probe refused (process gone)", gone)
        elif frozen:
            reason = (
                f"stages {frozen} of epoch {rec.epoch} lost: heartbeat stalled and probes unanswered for "
                f"membership.hang_s={self.hang_s} s (frozen)"
            )
            self.slot.end(rec, reason, frozen)
        elif broke:
            self.slot.end(rec, f"stages {broke} of epoch {rec.epoch} reported it broken", broke)


class DhtLoop:
    """The DHT thread (see the module doc). ``beat_now()`` stores this peer's record; ``each_round()`` runs in
    every round after it (the preemption notice's look for a spare)."""

    def __init__(
        self,
        peer_id: str,
        cfg,
        membership: Membership,
        slot: EpochSlot,
        beat_now: Callable[[], None],
        each_round: Callable[[], None] = lambda: None,
    ):
        self.peer_id, self.cfg, self.membership, self.slot = peer_id, cfg, membership, slot
        self.beat_now, self.each_round = beat_now, each_round
        self.stored = -1e9  # monotonic time of the last DHT heartbeat
        self.refreshed = time.monotonic()  # ... and of the last re-store of the epoch record
        self.store_now = threading.Event()  # store this peer's record now
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="dht", daemon=True)

    def beat(self) -> None:
        self.beat_now()
        self.stored = time.monotonic()

    def _loop(self) -> None:
        m = self.cfg
        read = -1e9
        while not self.stop.is_set():
            try:
                if time.monotonic() - self.stored >= m.period_s or self.store_now.is_set():
                    self.store_now.clear()
                    self.beat()
                self.each_round()
                rec = self.slot.joined
                due = time.monotonic() - self.refreshed > m.epoch_ttl_s / 4
                if rec is not None and self.slot.over is None and (time.monotonic() - read >= 4 * m.watch_s or due):
                    read = time.monotonic()
                    self._check_epoch(rec, due)
            except DHTUnavailable as e:
                logger.warning("[peer %s] heartbeat failed: %s", self.peer_id, e)
            except Exception:  # this thread must outlive any one bad round
                logger.exception("[peer %s] DHT round failed", self.peer_id)
            self.store_now.wait(min(m.watch_s, m.period_s))

    def _check_epoch(self, rec: EpochRecord, due: bool) -> None:
        """A newer epoch ends this one; the current one is re-stored every ``epoch_ttl_s / 4``."""
        current = self.membership.current_epoch()
        if current is not None and current.epoch > rec.epoch:
            self.slot.end(rec, f"epoch {current.epoch} was published", [])
        elif current is not None and not current.finished and due:
            self.membership.publish_epoch(current)
            self.refreshed = time.monotonic()


class Reader:
    """Reads the records of the roster's members (and of spares seen before) straight from their probe ports
    and keeps, per member, the newer of that and the DHT's (see ``fill``)."""

    def __init__(self, peer_id: str, ttl_s: float, view: View, prober: ProbeClient, membership: Membership):
        self.peer_id, self.ttl_s, self.view, self.prober, self.membership = peer_id, ttl_s, view, prober, membership
        self._spares_seen: dict[str, tuple[float, MemberRecord]] = {}  # spare -> (when seen in the DHT, record)
        self._fetched: dict[str, tuple[float, MemberRecord | None]] = {}  # peer -> (when, record read from it)

    def fill(self, members: dict[str, MemberRecord], current: EpochRecord | None, max_age: float) -> None:
        """Add to ``members`` the records read from the probe ports (anew on every pass of a member of the
        swarm; a spare reuses them for ``max_age``): the leader decides on the members' reports as they are
        now, not as they were at their last DHT store (a member that aborts knocks the others before it stores
        its report), and a partial DHT view neither stalls a decision nor hides who leads. Spares seen in an
        earlier DHT read and missing from this one are read from their probe ports too: a spare's DHT store
        can stall behind a node whose host vanished until its record expires, while the spare itself is fine."""
        now = time.monotonic()
        addresses = {}
        if current is not None:
            addresses = {pid: current.probes[s] for s, pid in enumerate(current.roster) if s < len(current.probes)}
        for pid, r in members.items():
            if r.state == "spare" and r.probe_port:
                self._spares_seen[pid] = (now, r)
        for pid, (when, r) in list(self._spares_seen.items()):
            if now - when > 4 * self.ttl_s:
                del self._spares_seen[pid]  # long gone from the DHT: not worth a probe any more
            elif pid not in members and pid not in addresses:
                addresses[pid] = (r.host, r.probe_port)
        for pid, address in addresses.items():
            if pid == self.peer_id or pid in self.view.dead:
                continue
            when, rec = self._fetched.get(pid, (-1e9, None))
            if now - when >= max_age:
                sent = time.monotonic()
                answer, value = self.prober.ask(*address, pid)
                self.view.heard(pid, answer, sent)  # the leader's fresh-probe rule reuses it
                rec = self.membership.open_member(value, pid) if value is not None else None
                self._fetched[pid] = (time.monotonic(), rec)
            if rec is not None and (pid not in members or rec.time > members[pid].time):
                members[pid] = rec
