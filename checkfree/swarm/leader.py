"""
Leader
======

The leader's job in a peer: while every member is stalled after a failure (or before the first epoch),
the peer that ``coordinator.leader_of`` names gathers the live members' records, asks
``coordinator.decide_epoch`` for the next epoch, hosts that epoch's rendezvous store and publishes the
epoch record; when no epoch can ever form, it publishes a stop record so every peer exits saying why.
The rules are pure functions in ``coordinator``; this module only gathers the view and acts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from checkfree.core.checkpoint import CheckpointStore
from checkfree.swarm.coordinator import SwarmStopped, decide_epoch
from checkfree.swarm.membership import EpochRecord, MemberRecord, Membership


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

    def step(self, members: dict[str, MemberRecord], current: EpochRecord | None, step: int) -> None:
        """One round of leadership: publish the next epoch if one is due and can form, else record why not.

        Raises:
            SwarmStopped: no epoch can ever form (a stop record was published first).
        """
        cfg = self.cfg
        ckpt = self.ckpt
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
