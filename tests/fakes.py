"""
Test fakes
==========

Stand-ins for what the swarm's pure rules read, shared by the unit tests of the leader and its view and by the
protocol model: a clock that moves only when a test moves it, records of one small swarm (run ``l``, four
stages, at step 3), and a ``Membership`` that keeps what a leader publishes instead of storing it.
"""

from __future__ import annotations

import time

from checkfree.swarm.records import EpochRecord, Lineage, MemberRecord
from tests.helpers import admission


class Clock:
    """An injected clock: ``clock()`` is ``clock.t``, which only the test moves."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def member(pid: str, stage: int, state: str = "running", port: int = 0, beat: float = 0.0) -> MemberRecord:
    """The record of ``pid`` holding ``stage`` in epoch 0 at step 3 with its initial weights, its probe port
    ``port`` and its last heartbeat sealed at ``beat`` (the view counts only a later one as a sign of life)."""
    return MemberRecord(
        run_id="l",
        fingerprint="fp",
        peer_id=pid,
        stage=stage,
        epoch=0,
        state=state,
        step=3,
        lineage=Lineage(kind="initial"),
        probe_port=port,
        time=beat,
    )


def epoch_record(**fields) -> EpochRecord:
    """Epoch 0 of the same swarm, led by ``a``, roster ``a b c d``, at step 3; ``fields`` override."""
    return EpochRecord(
        run_id="l",
        fingerprint="fp",
        epoch=0,
        roster=["a", "b", "c", "d"],
        store_host="",
        store_port=0,
        step=3,
        leader="a",
        **fields,
    )


class Membership:
    """What a leader needs of ``Membership``: publishing (kept in ``published``), sealing what it pushes, the
    node's admission."""

    def __init__(self):
        self.published: list[EpochRecord] = []
        self.admission = admission("a")

    def publish_epoch(self, rec: EpochRecord) -> None:
        self.published.append(rec)

    def seal_epoch(self, rec: EpochRecord) -> bytes:
        return self.admission.seal(b"epoch", rec.model_dump_json().encode())


def lost_stage_3() -> tuple[dict[str, MemberRecord], EpochRecord]:
    """Epoch 0, published just now, broke: ``a b c`` report it (recovering), stage 3's peer ``d`` is gone and no
    spare is in view."""
    members = {p: member(p, s, "recovering") for s, p in enumerate("abc")}
    return members, epoch_record(time=time.time())
