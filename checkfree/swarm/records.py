"""
Records
=======

The records the swarm's peers exchange, as schema-checked pydantic models: a peer's heartbeat
(``MemberRecord``, with the ``Lineage`` of the weights it holds) and the leader's decisions (``EpochRecord``
with its ``PlanRecord``s). Pure data: the DHT client (``membership``), the pure rules (``coordinator``) and
the leader all read them, and none of them needs the others to do so.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from checkfree.swarm.states import PeerState


class Lineage(BaseModel):
    """Where a holder's weights come from: what makes them valid (or not) for the step the swarm resumes at.

    kind: ``none`` (no weights for the stage: a spare, or a rebuild that broke off), ``initial`` (the seed's
    initial state, valid at step 0), ``rebuilt`` (assembled at ``step`` from ``sources`` by ``method``),
    ``restored`` (a checkpoint of ``step``). Training since then is the record's ``step`` and ``epoch``.
    """

    kind: Literal["none", "initial", "rebuilt", "restored"] = "none"
    step: int = 0  # the step the weights were made for
    epoch: int = -1  # the epoch in which they were made
    method: str | None = None
    sources: list[int] = []

    def describe(self, trained_to: int | None = None) -> str:
        if self.kind == "none":
            return "no weights"
        what = {
            "initial": "initial weights",
            "rebuilt": f"rebuilt at step {self.step} by {self.method} from stages {self.sources}",
            "restored": f"restored from the checkpoint of step {self.step}",
        }[self.kind]
        if self.epoch >= 0:
            what += f" (epoch {self.epoch})"
        if trained_to is not None and trained_to > self.step:
            what += f", trained through step {trained_to - 1}"
        return what


class MemberRecord(BaseModel):
    model_config = ConfigDict(use_enum_values=True)  # the state travels as its plain string value

    run_id: str
    fingerprint: str
    peer_id: str
    stage: int  # stage held (or asked for, before the first epoch); -1: spare
    epoch: int  # latest epoch this peer joined; -1: none yet
    state: PeerState
    step: int  # committed steps
    iteration: int = 0  # step attempts the swarm made before this peer's next one (see EpochRecord.iteration)
    pending: bool = False  # holds finished, uncommitted gradients of step ``step``
    grad_norm: float = 0.0  # pre-clip gradient norm of the last committed step
    host: str = "127.0.0.1"
    loss: float | None = None
    tokens_per_s: float | None = None
    pid: int = 0
    note: str = ""  # what the peer is waiting for, when it is (shown by status)
    time: float = 0.0
    lineage: Lineage = Lineage()  # where the weights of the stage held come from
    error: str = ""  # why this peer's last epoch broke (its last step_aborted cause, shortened)
    blame: list[int] = []  # the stages its last epoch broke on, as far as this peer knows
    shadow_ok: bool = True  # redundant: the shadow held is up to date (False until a new peer's is sent)
    probe_port: int = 0  # a TCP port that refuses connections once this peer's process is gone
    maddrs: list[str] = []  # this peer's DHT addresses: any live peer bootstraps a new one (see status)
    handoff_port: int = 0  # state "leaving" (a preemption notice): where it serves its stage's exact state
    counters: dict[str, int] = {}  # what reached its open ports (probes, knocks, refusals: see probe)

    def valid_for(self, step: int) -> bool:
        """Whether this holder's weights are the stage's weights for ``step`` (a finished, uncommitted step
        that another stage committed counts: the holder applies it when the next epoch names the step done)."""
        if self.lineage.kind == "none":
            return False
        return self.step == step or (self.pending and self.step + 1 == step)


class PlanRecord(BaseModel):
    stage: int
    method: str
    sources: list[int]
    path: str
    edge: str | None
    peer: str | None = None  # method handoff: the leaving peer that serves the stage's state ...
    address: tuple[str, int] | None = None  # ... at this address


class EpochRecord(BaseModel):
    run_id: str
    fingerprint: str
    epoch: int
    roster: list[str]  # peer id per stage
    store_host: str
    store_port: int
    step: int  # the step every stage runs next
    # step attempts the swarm made before this epoch's first one, counted as the engine counts iterations
    # (every committed or interrupted attempt): a peer injecting its own failures (swarm.inject=peer) draws
    # them by it, so the swarm meets the failures of the engine's trace
    iteration: int = 0
    leader: str
    lost: list[int] = []  # stages whose peer was replaced in this epoch
    plans: list[PlanRecord] = []  # how each lost stage is rebuilt
    rollback_to: int | None = None  # checkpoint strategy: every stage restores this step
    # every rollback of the run so far, (epoch, rollback_to), this one's included: which checkpoint files
    # belong to the current timeline (``CheckpointStore.rollbacks``)
    rollbacks: list[tuple[int, int]] = []
    stop: str | None = None  # set when the swarm gives up: every peer exits with this reason
    finished: bool = False  # set by the stages that ran the last step: the run is done, spares may leave
    probes: list[tuple[str, int]] = []  # each roster member's probe address (host, port)
    spares: list[str] = []  # the spares in the leader's view: with the roster, the voters of the next split
    spare_probes: list[tuple[str, int]] = []  # their probe addresses
    reforms: int = 0  # epochs in a row re-formed at this step with nothing lost (see swarm.max_reforms)
    stale_shadows: list[int] = []  # redundant: stages whose shadow must be sent anew to its holder
    time: float = 0.0


def known_rollbacks(ckpt, rec: EpochRecord) -> list[tuple[int, int]]:
    """The rollbacks ``rec`` lists (its own included, should a record lack it) merged with those ``ckpt``
    knew already: a record read from a lagging DHT never makes a peer forget one."""
    known = {*ckpt.rollbacks, *(tuple(r) for r in rec.rollbacks)}
    if rec.rollback_to is not None:
        known.add((rec.epoch, rec.rollback_to))
    return sorted(known)


MAX_EPOCH_JUMP = 16  # epochs a record may lie past the newest valid one (its predecessors lost from the DHT)


def follows(prev: EpochRecord, rec: EpochRecord) -> bool:
    """Whether epoch ``rec`` may follow epoch ``prev``: a later number, at most ``MAX_EPOCH_JUMP`` ahead, from a
    leader that ``prev`` allows. ``leader_of`` elects a holder of ``prev``'s roster while one lives, and a spare
    only when none does: so a member of the roster (or ``prev``'s leader) may publish any next epoch, and a
    spare, listed or not, only one whose record says every stage of ``prev`` is lost or handed over and whose
    roster holds none of ``prev``'s holders. Nothing follows a stop."""
    if not prev.epoch < rec.epoch <= prev.epoch + MAX_EPOCH_JUMP or prev.stop:
        return False
    if rec.leader in {*prev.roster, prev.leader}:
        return True
    gone = set(rec.lost) | {p.stage for p in rec.plans if p.method == "handoff"}
    every_stage_gone = gone >= set(range(len(prev.roster))) and not set(rec.roster) & set(prev.roster)
    return bool(prev.roster) and every_stage_gone


def chain_head(records: dict[int, EpochRecord], known: EpochRecord | None = None) -> EpochRecord | None:
    """The newest epoch reachable through ``follows`` from ``known`` (the newest this peer accepted before),
    else from the oldest one held. A record that does not follow (planted far ahead, like epoch 99999999, or
    published by a peer the epoch before does not allow, like a spare's stop record) is skipped: it stays in
    the DHT, ignored, and the swarm's real epochs go on past it. Records at or below ``known`` are history."""
    if known is not None:
        records = {n: r for n, r in records.items() if n > known.epoch}
        head = known
    elif records:
        head = records[min(records)]
    else:
        return None
    for n in sorted(records):
        if follows(head, records[n]):
            head = records[n]
    return head


def newest_of(*records: EpochRecord | None) -> EpochRecord | None:
    """The record of the highest epoch among ``records`` (None: none of them; Nones are skipped), the first one
    given on a tie. A peer weighs the epoch it read from the DHT (the ``chain_head`` of what it held) against
    the ones it accepted otherwise (a leader's push, checked by ``follows`` as it came in; the last epoch it
    published itself): either is newer than a lagging read."""
    return max((r for r in records if r is not None), key=lambda r: r.epoch, default=None)
