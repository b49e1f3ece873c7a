"""
Waiting
=======

A peer between epochs, as a part of ``Peer`` (a mixin over its state): it reads the swarm (the DHT and the
members' probe ports) until an epoch names it, and leads meanwhile when ``coordinator.leader_of`` says it
is the leader. A holder whose stage was given to another peer stays a valid holder (and a possible source)
until the replacement's epoch commits a step, and leaves only then; a peer without weights stands by as a
spare.
"""

from __future__ import annotations

import logging
import time

from checkfree.swarm.admission import SWARM_ENV, SWARM_FILE, TOKEN_ENV, TOKEN_FILE, AdmissionError
from checkfree.swarm.coordinator import SwarmStopped, leader_of, replacement_committed
from checkfree.swarm.membership import DHTGone, DHTUnavailable
from checkfree.swarm.preemption import Preempted
from checkfree.swarm.records import EpochRecord, MemberRecord, newest_of
from checkfree.swarm.states import PeerState

logger = logging.getLogger(__name__)

# a peer joining a swarm that reads only records sealed with another join token for this many heartbeat TTLs
# (every live member stores its record every membership.period_s) holds the wrong token: it says so and exits
FOREIGN_TOKEN_TTLS = 3


class Waiting:
    def _wait_for_epoch(self) -> EpochRecord | None:
        """Until an epoch names this peer (returned), or there is nothing to wait for (None: the run finished,
        this peer was replaced, or a notice came while it was a spare); leads meanwhile when it is the leader."""
        self.leader.waiting_since = None  # swarm.spare_wait_s counts from the start of this wait
        while True:
            if self._stop_kind is not None:
                # between epochs there is no epoch to hand a stage over in: a stage held is saved (``_leave``)
                raise Preempted("interrupted (SIGINT)" if self._stop_kind == "interrupt" else "terminated (SIGTERM)")
            pushed = self.slot.pushed
            if pushed is not None and pushed.epoch > self.status.epoch and self.peer_id in pushed.roster:
                return pushed  # knocked with it by its leader: no DHT round trip before joining
            members, current = self._read_swarm()
            outcome = self._consider(members, current)
            if outcome != "wait":
                return outcome
            self.view.observe(members, current)
            # who leads is decided on the confirmed view: a crashed or frozen leader is passed over at once
            live = self.view.confirmed(members, current)
            if leader_of(live, current) == self.peer_id:
                try:
                    self.leader.step(live, current, self.status.step, self.view)
                except DHTUnavailable as e:
                    logger.warning("[peer %s] could not publish: %s", self.peer_id, e)
            # a peer between epochs polls every poll_s; a spare every heartbeat period: the leader knocks
            # whoever its new epoch names, so the fast path needs no fast poll, and idle spares polling the DHT
            # would cost the training swarm CPU
            m = self.cfg.membership
            self._wake.wait(m.period_s if self.status.state == "spare" else m.poll_s)  # or until knocked
            self._wake.clear()

    def _read_swarm(self) -> tuple[dict[str, MemberRecord], EpochRecord | None]:
        """The members and the newest epoch, from the DHT and the members' probe ports; a transient DHT failure
        is retried with a backoff (never a reason to die); a gone DHT process is (``DHTGone``)."""
        failures = 0
        while True:
            try:
                members, current = self.membership.members_and_epoch()
                break
            except DHTGone:
                raise  # deaf and mute: this peer cannot serve (run() ends it)
            except DHTUnavailable as e:
                failures += 1
                logger.warning("[peer %s] DHT read failed (%d in a row): %s", self.peer_id, failures, e)
                time.sleep(min(self.cfg.membership.period_s * 2**failures, 5.0))
        self._check_token()
        # pushed by its leader (sealed, checked like the DHT's) or published by this peer: newer than a lagging
        # read, or than a DHT subkey a token holder occupies with a record of its own
        current = newest_of(current, self.slot.pushed, self.leader.published)
        members[self.peer_id] = self.record()  # our own view is fresher than the DHT's
        # a spare reuses records read from probe ports for half a watch interval; a member reads them anew
        self.reader.fill(members, current, self.view.period_s / 2 if self.status.state == "spare" else 0.0)
        return members, current

    def _consider(self, members: dict[str, MemberRecord], current: EpochRecord | None) -> EpochRecord | None | str:
        """What the swarm's records mean for this waiting peer: the epoch to join, None (nothing to wait for),
        or ``"wait"``.

        Raises:
            SwarmStopped: the swarm published a stop record.
        """
        if current is not None and current.stop:
            raise SwarmStopped(current.stop)
        if (current is not None and current.finished) or any(r.state == "done" for r in members.values()):
            if self.worker is None:
                return None  # the run finished while this peer was a spare
        if self.notice.noticed is not None and self.worker is None:
            # a spare whose machine goes away holds nothing to hand over: it leaves before it is given a stage
            self.emit("left", reason=f"preemption notice while a spare: {self.notice.text[:200]}")
            return None
        if current is None or current.epoch <= self.status.epoch:
            return "wait"
        if self.peer_id in current.roster:
            return current
        if self.worker is None and self.status.state != "spare":
            # arrived after the roster was set, or its own rebuild broke off and the stage went to another
            # peer: it holds no weights, so it stands by as a spare
            self.asked_stage = -1
            self.status.move(PeerState.SPARE)
            self.emit("became_spare", reason=f"no stage for this peer in epoch {current.epoch}")
        elif self.worker is not None and not replacement_committed(members, current):
            # until its replacement trains, this peer stays a valid holder and a possible source: if the new
            # epoch cannot form (its new holder was across a partition), the stage comes back here
            if self._standing_by != current.epoch:
                self._standing_by = current.epoch
                self.emit("standing_by", by_epoch=current.epoch, step=self.status.step)
        elif self.worker is not None:
            self.emit("replaced", by_epoch=current.epoch)
            logger.warning(
                "[peer %s] stage %d was given to another peer in epoch %d; leaving",
                self.peer_id,
                self.worker.index,
                current.epoch,
            )
            return None
        return "wait"

    def _check_token(self) -> None:
        """A peer joining a swarm whose DHT gives it only records sealed with another join token (its own node
        refuses them all) holds the wrong token: it would wait forever as a spare nobody sees.

        Raises:
            AdmissionError: ``FOREIGN_TOKEN_TTLS`` heartbeat TTLs went by with such records and no admitted one.
        """
        foreign, admitted = self.membership.tally.counts()
        waited = time.monotonic() - self.view.started
        if not self._joining or admitted or not foreign or waited < FOREIGN_TOKEN_TTLS * self.cfg.membership.ttl_s:
            return
        raise AdmissionError(
            f"this peer's join token or swarm id does not match the swarm's: in {waited:.0f} s every record read "
            f"from the swarm at {' '.join(self._initial_peers)} ({foreign}) was sealed with another token or swarm "
            f"id and none with its own; pass the swarm's token with ${TOKEN_ENV} or --join-token and its id with "
            f"${SWARM_ENV} or --swarm-id (the peer that started the swarm wrote them to its RUN_DIR/{TOKEN_FILE} "
            f"and RUN_DIR/{SWARM_FILE})"
        )
