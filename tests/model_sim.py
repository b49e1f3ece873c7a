"""
Protocol model
==============

A small simulated swarm that drives the real, pure protocol code (``Leader.step`` with its ``View``,
``coordinator.decide_epoch``) without a socket or a sleep: every peer is a record plus a few flags
(crashed, frozen, which side of a partition), time is one shared clock, each side of a partition has its
own DHT (member records that expire after ``ttl_s``, epoch records), and a probe is answered from the flags:
refused by a crashed peer, unanswered by a frozen one (or a late answer), silent across a split, alive
otherwise. ``Leader.gather`` probes every member it may name in a roster through the same ``Prober``.

Only the leader's I/O is replaced: the rendezvous store, its gate socket and the knock (``quiet_leader``);
the knock's push is modelled: every roster member with a process on the leader's side gets the record
(``SimPeer.pushed``) and, as ``Waiting._read_swarm``, prefers it to an older DHT read. What the peers do with
a published epoch (join, apply a pending step, take a rebuilt stage's lineage, leave when replaced) is
modelled here, after ``peer.Peer``; the checks that matter are made as it happens and
collected in ``violations`` (the test asserts it stays empty, so the message says what broke).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from checkfree.swarm import leader as leader_module
from checkfree.swarm.coordinator import SwarmStopped
from checkfree.swarm.leader import Leader
from checkfree.swarm.records import EpochRecord, Lineage, MemberRecord, newest_of
from checkfree.swarm.states import transition
from checkfree.swarm.view import View
from tests.fakes import Clock
from tests.helpers import admission, tiny_config

TTL_S = 2.0  # membership.ttl_s of the model: a record not stored for this long is gone from a side's DHT
PERIOD_S = 0.5  # heartbeat / watch period
HANG_S = 1.5  # membership.hang_s
PROBE_PORT0 = 1000

_CONFIGS: dict[str, object] = {}
_ADMISSION = None


def config(strategy: str, num_stages: int):
    """The run's config (loaded once per strategy: OmegaConf costs ~0.1 s). No stop for want of a spare or
    re-formations (the model decides when spares come): ``spare_wait_s`` and ``max_reforms`` are huge."""
    key = f"{strategy}/{num_stages}"
    if key not in _CONFIGS:
        out = Path(tempfile.mkdtemp(prefix="protocol-model-"))
        _CONFIGS[key] = tiny_config(
            out,
            f"model.num_stages={num_stages}",
            f"model.num_layers={num_stages}",
            f"recovery.strategy={strategy}",
            "swarm.spare_wait_s=1000000",
            "swarm.max_reforms=1000000",
            "swarm.first_epoch_grace_s=0",
            f"membership.hang_s={HANG_S}",
        )
    return _CONFIGS[key]


class _Socket:
    def __init__(self, port: int):
        self.port = port

    def getsockname(self):
        return ("127.0.0.1", self.port)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass

    def detach(self) -> int:
        return -1


class _Gate:
    def __init__(self, *args, **kwargs):
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def quiet_leader():
    """``Leader.step`` without its I/O: no rendezvous store, gate socket or knock (the published record is
    all the model needs; the store and gate have tests of their own)."""
    fake_dist = SimpleNamespace(TCPStore=lambda *a, **k: SimpleNamespace(port=1))
    with (
        mock.patch.object(leader_module, "listen", lambda host, ports: _Socket(2)),
        mock.patch.object(leader_module, "dist", fake_dist),
        mock.patch.object(leader_module, "Gate", _Gate),
    ):
        yield


@dataclass
class SimPeer:
    pid: str
    port: int
    rec: MemberRecord
    crashed: bool = False  # its process is gone (probe refused)
    frozen: bool = False  # SIGSTOP-like: no heartbeat, probes time out
    frozen_since: float = 0.0
    side: int = 0  # which side of a partition (0 when none)
    late: int = 0  # how many of the next probes of it are answered late (LATE_S after they were sent)
    pushed: EpochRecord | None = None  # the newest epoch record a leader's knock pushed to it
    leader: Leader | None = None
    view: View | None = None

    @property
    def up(self) -> bool:
        return not self.crashed and not self.frozen


LATE_S = 0.6  # a late answer: past a plain probe's timeout (0.5 s), well within hang_s


class Prober:
    """A probe from a peer on side ``side``: answered from the target's flags."""

    def __init__(self, swarm: Swarm, side_of):
        self.swarm, self.side_of = swarm, side_of

    def probe(self, host, port, peer_id=None, timeout_s=0.5):
        swarm = self.swarm
        target = swarm.by_port.get(port)
        if target is None or target.side != self.side_of():
            swarm.clock.t += timeout_s
            return "silent"
        if target.crashed:
            return "refused"
        if target.frozen:
            swarm.clock.t += timeout_s
            return "frozen"
        if target.late:  # a delay spike: the answer comes LATE_S after the probe, past a plain probe's timeout
            target.late -= 1
            if timeout_s < LATE_S:
                swarm.clock.t += timeout_s
                return "frozen"
            swarm.clock.t += LATE_S  # a longer (confirming) probe still gets it: a live peer is no hang
        return "alive"


class _Membership:
    def __init__(self, swarm: Swarm, peer: SimPeer):
        self.swarm, self.peer = swarm, peer
        self.admission = _admission()

    def publish_epoch(self, rec: EpochRecord) -> None:
        self.swarm.published_by(self.peer, rec)

    def seal_epoch(self, rec: EpochRecord) -> bytes:
        return b""


def _admission():
    global _ADMISSION
    if _ADMISSION is None:
        _ADMISSION = admission("model")
    return _ADMISSION


@dataclass
class Swarm:
    num_stages: int
    strategy: str
    clock: Clock = field(default_factory=Clock)
    peers: dict[str, SimPeer] = field(default_factory=dict)
    by_port: dict[int, SimPeer] = field(default_factory=dict)
    dht: list[dict[str, tuple[MemberRecord, float]]] = field(default_factory=lambda: [{}, {}])
    epochs: list[dict[int, EpochRecord]] = field(default_factory=lambda: [{}, {}])
    published: list[tuple[EpochRecord, str, int]] = field(default_factory=list)  # (record, leader, side)
    expected: dict[int, int] = field(default_factory=dict)  # stage -> the next step its holder may apply
    reached: int = 0  # the highest step any stage committed + 1
    commits: int = 0  # steps the whole roster committed
    stopped: str | None = None
    violations: list[str] = field(default_factory=list)
    drop: set[str] = field(default_factory=set)  # records missing from the next leader round's view
    replay: EpochRecord | None = None  # an older epoch record fed as current to the next leader round

    def __post_init__(self):
        for s in range(self.num_stages):
            self.add(f"p{s}", stage=s, state="waiting", lineage=Lineage(kind="initial"))

    # ---- peers -----------------------------------------------------------------------------------
    def add(self, pid: str, stage: int, state: str, lineage: Lineage | None = None, side: int = 0) -> SimPeer:
        port = PROBE_PORT0 + len(self.peers)
        rec = MemberRecord(
            run_id="model",
            fingerprint="fp",
            peer_id=pid,
            stage=stage,
            epoch=-1,
            state=state,
            step=0,
            lineage=lineage or Lineage(),
            probe_port=port,
            time=self.clock.t,
        )
        peer = SimPeer(pid, port, rec, side=side)
        peer.view = View(
            ttl_s=TTL_S,
            spare_wait_s=10 * TTL_S,
            period_s=PERIOD_S,
            store_period_s=PERIOD_S,
            prober=Prober(self, lambda: peer.side),
            hang_s=HANG_S,
            clock=self.clock,
        )
        cfg = config(self.strategy, self.num_stages)
        peer.leader = Leader(cfg, pid, "model", "fp", _Membership(self, peer), None, True, _ignore, clock=self.clock)
        peer.leader.prober = SimpleNamespace(knock=_ignore)  # no knock over real sockets
        self.peers[pid] = peer
        self.by_port[port] = peer
        self.store(peer)
        return peer

    def store(self, peer: SimPeer) -> None:
        """The peer heartbeats its record into its side's DHT (a new ``time``: a sign of life)."""
        if peer.up:
            peer.rec = peer.rec.model_copy(update={"time": self.clock.t})
            self.dht[peer.side][peer.pid] = (peer.rec, self.clock.t)

    def update(self, peer: SimPeer, **fields) -> None:
        if "state" in fields and fields["state"] != peer.rec.state:
            transition(peer.rec.state, fields["state"])  # the model takes the protocol's edges only
        peer.rec = peer.rec.model_copy(update=fields)
        self.store(peer)

    def newest(self, side: int) -> EpochRecord | None:
        known = self.epochs[side]
        return known[max(known)] if known else None

    def tick(self, dt: float) -> None:
        self.clock.t += dt
        for peer in self.peers.values():
            self.store(peer)
        for side in (0, 1):
            for pid, (_, at) in list(self.dht[side].items()):
                if self.clock.t - at > TTL_S:
                    del self.dht[side][pid]

    def heal(self) -> None:
        for peer in self.peers.values():
            peer.side = 0
        for pid, (rec, at) in self.dht[1].items():
            if pid not in self.dht[0] or self.dht[0][pid][1] < at:
                self.dht[0][pid] = (rec, at)
        for e, rec in self.epochs[1].items():
            self.epochs[0].setdefault(e, rec)
        self.dht[1], self.epochs[1] = {}, {}

    def partition(self, far: set[str]) -> None:
        for pid in far:
            self.peers[pid].side = 1
        self.dht[1] = dict(self.dht[0])  # records stored before the split linger on both sides
        self.epochs[1] = dict(self.epochs[0])

    # ---- the leader ------------------------------------------------------------------------------
    def leader_round(self, side: int) -> None:
        """Every up peer on ``side`` does what ``Peer`` does between epochs: observe, confirm, and lead if
        ``leader_of`` names it."""
        from checkfree.swarm.coordinator import leader_of

        if self.stopped:
            return
        members = {pid: rec for pid, (rec, _) in self.dht[side].items() if pid not in self.drop}
        newest, replay = self.newest(side), self.replay
        self.drop, self.replay = set(), None
        for peer in sorted(self.peers.values(), key=lambda p: p.pid):
            if not peer.up or peer.side != side or peer.rec.state in ("running", "joining"):
                continue
            # replay: a lagging DHT read (its newest epoch subkey is an older one); as ``Waiting._read_swarm``, a
            # pushed record newer than the read wins
            current = newest_of(replay or newest, peer.pushed)
            if current is not None and current.epoch > peer.rec.epoch and peer.pid in current.roster:
                continue  # it joins that epoch instead (see sync)
            peer.view.observe(members, current)
            live = peer.view.confirmed(members, current)
            if leader_of(live, current) == peer.pid:
                try:
                    peer.leader.step(live, current, peer.rec.step, peer.view)
                except SwarmStopped as e:
                    self.stopped = str(e)
                    self.stopped_by(peer, current)
                    return
                peer.leader.hosted.clear()
                peer.leader.gates.clear()

    def published_by(self, peer: SimPeer, rec: EpochRecord) -> None:
        """Checks made as a record is published, against the state of the swarm at that moment."""
        for old, by, side in self.published:
            if old.epoch == rec.epoch and old.roster != rec.roster:
                self.violations.append(
                    f"epoch {rec.epoch} published twice with different rosters: {old.roster} by {by} (side {side}) "
                    f"and {rec.roster} by {peer.pid} (side {peer.side})"
                )
        self.published.append((rec, peer.pid, peer.side))
        self.epochs[peer.side][rec.epoch] = rec
        if rec.stop:
            return
        for pid in rec.roster:  # the knock reaches every roster member on the leader's side that has a process
            member = self.peers[pid]
            if (
                member.side == peer.side
                and not member.crashed
                and (member.pushed is None or member.pushed.epoch < rec.epoch)
            ):
                member.pushed = rec
        previous = self.epochs[peer.side].get(rec.epoch - 1)
        for s in rec.lost:
            old = previous.roster[s] if previous is not None else None
            holder = self.peers.get(old) if old else None
            if holder is None or holder.pid == rec.roster[s] or holder.side != peer.side or holder.crashed:
                continue
            if not holder.frozen or self.clock.t - holder.frozen_since < HANG_S:
                self.violations.append(
                    f"epoch {rec.epoch} (by {peer.pid}) declares stage {s} lost and gives it to {rec.roster[s]}, "
                    f"but its holder {holder.pid} answers its probes "
                    f"(frozen={holder.frozen}, for {self.clock.t - holder.frozen_since:.1f} s)"
                )
        if rec.rollback_to is None and rec.step > self.reached:
            self.violations.append(f"epoch {rec.epoch} resumes at step {rec.step}, past every commit ({self.reached})")

    def stopped_by(self, peer: SimPeer, current: EpochRecord | None) -> None:
        """A stop is final: never while a holder of the newest epoch on the leader's side answers."""
        rosters = [r for r, _, side in self.published if side == peer.side and not r.stop]
        rec = newest_of(*rosters)
        for pid in rec.roster if rec is not None else []:
            holder = self.peers[pid]
            if holder.up and holder.side == peer.side and holder.rec.lineage.kind != "none":
                self.violations.append(
                    f"{peer.pid} stopped the swarm ({self.stopped[:80]}...) deciding on epoch "
                    f"{current and current.epoch} while {pid}, a holder in epoch {rec.epoch}, answers"
                )

    # ---- the peers' side -------------------------------------------------------------------------
    def sync(self) -> None:
        """Every up peer acts on the newest epoch its side's DHT holds, as ``Peer`` does."""
        for peer in sorted(self.peers.values(), key=lambda p: p.pid):
            if not peer.up:
                continue
            rec = self.newest(peer.side)
            if rec is None or rec.stop or rec.epoch <= peer.rec.epoch:
                continue
            if peer.pid in rec.roster:
                self.join(peer, rec)
            elif peer.rec.state in ("waiting", "recovering") and peer.rec.lineage.kind == "none":
                self.update(peer, state="spare", stage=-1)
            elif peer.rec.state != "spare":
                self.leave(peer)  # replaced: a holder leaves (``Peer`` returns)

    def join(self, peer: SimPeer, rec: EpochRecord) -> None:
        stage = rec.roster.index(peer.pid)
        r = peer.rec
        if peer.rec.state in ("running",):
            self.update(peer, state="recovering")  # a newer epoch: the running one is over
        self.update(peer, state="joining", epoch=rec.epoch)
        if rec.rollback_to is not None:
            kind = "restored" if rec.rollback_to else "initial"
            lineage = Lineage(kind=kind, step=rec.rollback_to, epoch=rec.epoch)
            self.update(peer, state="running", stage=stage, step=rec.step, pending=False, lineage=lineage)
            self.expected[stage] = rec.step
            return
        if stage in rec.lost:
            plan = next((p for p in rec.plans if p.stage == stage), None)
            method = plan.method if plan else None
            lineage = Lineage(kind="rebuilt", step=rec.step, epoch=rec.epoch, method=method)
            self.update(peer, state="running", stage=stage, step=rec.step, pending=False, lineage=lineage)
            self.expected[stage] = rec.step  # a rebuild starts the stage's history anew, explicitly
            return
        if r.stage != stage or r.lineage.kind == "none":  # fresh: what ``Handover.run`` does
            if rec.step > 0:
                self.leave(peer)  # PeerCannotServe: no weights for the stage past step 0
                return
            self.update(peer, state="running", stage=stage, step=0, pending=False, lineage=Lineage(kind="initial"))
            return
        if not r.valid_for(rec.step):
            self.violations.append(
                f"{peer.pid} trains stage {stage} in epoch {rec.epoch} at step {rec.step} with weights not valid "
                f"for it (held stage {r.stage}, step {r.step}, pending {r.pending}, lineage {r.lineage.kind})"
            )
        step = r.step
        if r.pending and r.step + 1 == rec.step:
            self.apply(peer, stage, r.step)
            step += 1
        if self.expected.get(stage, 0) != rec.step:
            self.violations.append(
                f"stage {stage} resumes at step {rec.step} in epoch {rec.epoch} but its holder {peer.pid} has "
                f"applied steps up to {self.expected.get(stage, 0) - 1}: a committed step skipped or redone"
            )
        self.update(peer, state="running", stage=stage, step=step, pending=False)

    def apply(self, peer: SimPeer, stage: int, step: int) -> None:
        want = self.expected.get(stage, 0)
        if step != want:
            self.violations.append(f"stage {stage} ({peer.pid}) applies step {step}, expected {want}")
        self.expected[stage] = step + 1
        self.reached = max(self.reached, step + 1)

    def leave(self, peer: SimPeer) -> None:
        self.update(peer, state="leaving")
        peer.crashed = True  # the process exits: its probe port refuses from now on
        self.dht[peer.side].pop(peer.pid, None)  # its tombstone

    # ---- training --------------------------------------------------------------------------------
    def trainers(self) -> list[SimPeer] | None:
        """The roster of the newest epoch on side 0, if it can train: every member up there, running in it."""
        rec = self.newest(0)
        if rec is None or rec.stop or self.stopped:
            return None
        peers = [self.peers[pid] for pid in rec.roster]
        ok = all(p.up and p.side == 0 and p.rec.state == "running" and p.rec.epoch == rec.epoch for p in peers)
        return peers if ok else None

    def train(self, committed: set[int] | None = None) -> None:
        """One step of the newest epoch: the stages in ``committed`` commit it (all: None); the others keep
        its finished gradients (pending) and the epoch breaks at the commit point."""
        peers = self.trainers()
        assert peers is not None
        for stage, peer in enumerate(peers):
            if committed is None or stage in committed:
                self.apply(peer, stage, peer.rec.step)
                self.update(peer, step=peer.rec.step + 1, pending=False)
            else:
                self.update(peer, pending=True)
        if committed is None:
            self.commits += 1
        else:
            for peer in peers:
                self.update(peer, state="recovering")

    def calm(self, rounds: int) -> None:
        """The network calms down: the split heals, frozen peers resume; then up to ``rounds`` rounds of a
        tick, every broken step aborted, a leader round and the joins, until the newest epoch trains a step."""
        self.heal()
        for peer in self.peers.values():
            if peer.frozen and not peer.crashed:
                peer.frozen = False
                self.store(peer)
        for _ in range(rounds):
            if self.stopped or self.trainers() is not None:
                break
            self.tick(1.0)
            for peer in self.peers.values():
                if peer.up and peer.rec.state == "running" and self.broken(peer):
                    self.update(peer, state="recovering")
            self.leader_round(0)
            self.sync()
            self.check()
        if self.trainers() is not None:
            self.train()

    def broken(self, peer: SimPeer) -> bool:
        """Whether ``peer``, running, would hit an error now: a member of its epoch is not up beside it."""
        rec = self.epochs[peer.side].get(peer.rec.epoch)
        if rec is None or self.newest(peer.side).epoch > rec.epoch:
            return True
        return any(
            not (q.up and q.side == peer.side and q.rec.epoch == rec.epoch and q.rec.state == "running")
            for q in (self.peers[pid] for pid in rec.roster)
        )

    def check(self) -> None:
        """Invariants over the whole state, after every rule."""
        holders: dict[tuple[int, int], list[str]] = {}
        for peer in self.peers.values():
            r = peer.rec
            if r.state == "running" and not peer.crashed:
                holders.setdefault((r.epoch, r.stage), []).append(peer.pid)
                if r.lineage.kind == "none":
                    self.violations.append(f"{peer.pid} trains stage {r.stage} holding no weights")
        for (e, s), pids in holders.items():
            if len(pids) > 1:
                self.violations.append(f"stage {s} trained by {pids} in epoch {e}")


def _ignore(*args, **kwargs) -> None:
    pass
