"""
Peer
====

One process of the swarm: a stage peer (holds a stage) or a spare (waits to be given one). This module is
the peer's lifecycle: its heartbeat thread, the main loop (wait for an epoch that names it, join the
epoch's process group, hand over weights, train until the run is done or a stage is lost, then report and
wait again) and its exit. The other jobs live in their own modules: ``leader`` (deciding and publishing
epochs while this peer leads), ``handover`` (the weight transfers and rebuilds between epochs),
``training`` (the training loop inside an epoch) and ``leaving`` (clean stops on a signal, and the hand-over
of a stage on a preemption notice).

Commit semantics: a step is applied by every stage or by none (``StageWorker.commit``). If the commit
all-reduce breaks after some stage completed it, the stages that did not keep their finished gradients
(``pending``) and apply them when the next epoch names that step as done.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from checkfree.config import TrainConfig
from checkfree.core.checkpoint import StagePayload
from checkfree.core.data import Batches
from checkfree.core.events import EventLog
from checkfree.core.exit_codes import ExitCode
from checkfree.core.metrics import MetricLogger
from checkfree.core.recovery import edge_replicas_on
from checkfree.core.schedule import schedule_for
from checkfree.core.stage_step import NonFiniteSteps
from checkfree.swarm.addressing import data_host, listen
from checkfree.swarm.admission import (
    TOKEN_ENV,
    TOKEN_FILE,
    Admission,
    AdmissionError,
    Identity,
    find_token,
    new_token,
    scrub_secrets,
    write_token,
)
from checkfree.swarm.config import check_swarm_config, config_fingerprint, parse_port_range
from checkfree.swarm.coordinator import PeerCannotServe, SwarmStopped, leader_of
from checkfree.swarm.gate import Tunnel
from checkfree.swarm.handover import Handover
from checkfree.swarm.injection import OwnFailures
from checkfree.swarm.leader import Leader
from checkfree.swarm.leaving import Leaving
from checkfree.swarm.limits import raise_file_limit
from checkfree.swarm.membership import DHTGone, DHTUnavailable, Membership
from checkfree.swarm.preemption import NoticeWatcher, Preempted, fetch_handoff
from checkfree.swarm.probe import NO_ANSWER, ProbeClient, ProbeServer
from checkfree.swarm.records import EpochRecord, Lineage, MemberRecord, PlanRecord
from checkfree.swarm.restart import checkpoint_store, previous_epoch
from checkfree.swarm.states import PeerState, PeerStatus
from checkfree.swarm.training import TrainingLoop
from checkfree.swarm.transport import EpochGroup, PeerProtocolError, StageLostError
from checkfree.swarm.view import View
from checkfree.swarm.worker import StageWorker

logger = logging.getLogger(__name__)

__all__ = ["Peer", "SwarmStopped"]


# a peer joining a swarm that reads only records sealed with another join token for this many heartbeat TTLs
# (every live member stores its record every membership.period_s) holds the wrong token: it says so and exits
FOREIGN_TOKEN_TTLS = 3


class Peer(Leaving):
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        stage: int | None,
        initial_peers: list[str],
        peer_id: str | None = None,
        join_token: str | None = None,
        inject_failures: bool = False,
    ):
        """``peer_id``: this peer's name (its id is ``NAME.HASH`` of its key, see ``admission``; default: random);
        ``join_token``: the swarm's secret (None: from ``$CHECKFREE_JOIN_TOKEN`` or ``RUN_DIR/join_token``;
        a peer that starts a new swarm creates one and writes it there); ``inject_failures``: draw the
        config's failures and die at this peer's own (``swarm.inject=peer``; the launcher asks for it)."""
        self.inject_failures = inject_failures
        L = cfg.model.num_stages
        check_swarm_config(cfg)
        if stage is not None and not 0 <= stage < L:
            raise ValueError(f"--stage {stage} out of range: expected 0..{L - 1} (model.num_stages={L})")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        token = find_token(join_token, self.run_dir)
        if token is None and initial_peers:
            raise AdmissionError(
                f"joining the swarm at {initial_peers[0]} needs its join token: pass --join-token or set "
                f"${TOKEN_ENV} (the first peer wrote it to its RUN_DIR/{TOKEN_FILE})"
            )
        token_path = None
        if token is None:
            token = new_token()
            token_path = write_token(self.run_dir, token)
        identity = Identity.from_env(peer_id)
        scrub_secrets()  # read: no child (the DHT's p2pd, a shell) inherits the token or the key
        raise_file_limit()  # gloo keeps a descriptor per connection its listener ever accepted
        self.peer_id = identity.peer_id
        self.run_id = cfg.swarm.run_id or cfg.run_name
        self.fingerprint = config_fingerprint(cfg)
        # the DHT forks: start it before the model and data exist (HIVEMIND-NOTES pitfall 4)
        self.membership = Membership(
            cfg.membership, self.run_id, self.fingerprint, initial_peers, admission=Admission(token, identity)
        )
        self._maddrs = self.membership.visible_maddrs()
        if not initial_peers:
            # beside the token: what other hosts join with (checkfree swarm writes the same file)
            (self.run_dir / "maddrs.txt").write_text(" ".join(self._maddrs) + "\n")
            logger.warning(
                "[peer %s] started a new swarm: other peers join it with --initial-peers %s and the join token%s",
                self.peer_id,
                " ".join(self._maddrs),
                f" in {token_path} (mode 0600)" if token_path else "",
            )
        self.dir = self.run_dir / "peers" / self.peer_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.dir / "events.jsonl")
        tb_dir = None
        if cfg.metrics.tensorboard:
            tb_dir = Path(cfg.metrics.tensorboard_dir or self.run_dir / "tensorboard") / self.peer_id
        self.metrics = MetricLogger(self.dir / "metrics.jsonl", tb_dir)
        batches = Batches(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.seed)
        schedule = schedule_for(cfg.pipeline, L, cfg.swap_enabled)
        self.device = torch.device(cfg.device)
        replicas_on = edge_replicas_on(cfg.recovery)
        # a rollback may need any step of the timeline; the other strategies keep state for a restart only
        rolls_back = cfg.recovery.strategy in ("checkpoint", "hybrid")
        ckpt = checkpoint_store(cfg, self.run_dir, keep=1 << 30 if rolls_back else cfg.checkpoint.keep)
        self.leader = Leader(
            cfg, self.peer_id, self.run_id, self.fingerprint, self.membership, ckpt, replicas_on, self.emit
        )
        self.leader.first_epoch = previous_epoch(self.run_dir) + 1
        self.handover = Handover(
            cfg,
            schedule,
            batches,
            self.device,
            ckpt,
            self.emit,
            stop_swarm=lambda rec, reason: self.leader.stop_swarm(rec, reason, self.status.step),
            fetch_handoff=self._fetch_handoff,
        )
        tokens = batches.tokens_per_microbatch() * cfg.pipeline.num_microbatches
        self.training = TrainingLoop(
            cfg,
            tokens,
            self.metrics,
            ckpt,
            self.emit,
            self.handover.exchange_replicas if replicas_on else None,
            should_leave=self._should_leave,
            inject=self._own_failures(schedule),
        )
        # a preemption notice (off unless swarm.preemption.provider is set): hand the stage over and leave
        self.notice = NoticeWatcher(cfg.swarm.preemption, identity.name)
        self._spare_in_view = False  # after a notice: the DHT thread saw a spare that can take the stage
        # a signal asked this peer to stop (``request_stop``): "interrupt" (SIGINT) or "terminate" (SIGTERM)
        self._stop_kind: str | None = None
        self._stop_at = 0.0  # monotonic time of that signal
        self._handoff_port = 0
        self._prefetched: tuple[int, StagePayload | None] = (-1, None)  # (epoch, state) fetched in _join
        self.asked_stage = -1 if stage is None else stage
        self._joining = bool(initial_peers)  # joins a swarm (not a new one): its token is checked against it
        self._initial_peers = initial_peers
        self.worker: StageWorker | None = None
        self.group: EpochGroup | None = None
        self.status = PeerStatus(initial=PeerState.WAITING if stage is not None else PeerState.SPARE)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._dht_thread = threading.Thread(target=self._dht_loop, name="dht", daemon=True)
        # the probe: a port that accepts while this process lives and refuses once it is gone, so that the
        # leader can confirm a crash at once instead of waiting for the heartbeat to expire
        # a long backlog: a frozen process accepts no connection, and its probe must still be told "frozen"
        # (accepted by the kernel, unanswered) from "silent" (unreachable) for a long while (see leader.probe)
        sock = listen(cfg.membership.host, parse_port_range(cfg.membership.port_range), backlog=4096)
        self.probes = ProbeServer(sock, self.membership.admission, self._on_knock, self._take_pushed)
        self.prober = ProbeClient(self.membership.admission)
        # the epoch this peer is joining or training in, and why it is over (set by the heartbeat thread when
        # a member of it is lost, or a newer epoch exists); the main thread and the transport stop waiting
        self.last_error = ""  # why this peer's last epoch broke (heartbeated)
        self._epoch_lock = threading.Lock()  # joined / epoch_over / group, between the main and heartbeat threads
        self.joined: EpochRecord | None = None
        self.epoch_over: str | None = None
        self._over_stages: list[int] = []  # the stages the heartbeat thread ended the epoch for
        self.blame: list[int] = []  # the stages this peer's last epoch broke on, as far as it knows (heartbeated)
        m = cfg.membership
        self.view = View(m.ttl_s, cfg.swarm.spare_wait_s, min(m.watch_s, m.period_s), m.period_s, self.prober, m.hang_s)
        self._stored = -1e9  # monotonic time of the last DHT heartbeat
        self._cut = False  # transport.fault_cut_peer: this peer's data plane is cut off (fault injection)
        self._wake = threading.Event()  # set by a knock on the probe port (see ``probe``): main thread
        self._knocked = threading.Event()  # the same knock, for the heartbeat thread: watch the members now
        self._store_now = threading.Event()  # for the DHT thread: store this peer's record now
        self._pushed: EpochRecord | None = None  # the newest epoch record pushed with a leader's knock
        self._tunnels: dict[int, Tunnel] = {}  # epoch -> the relay to its rendezvous store
        self._spares_seen: dict[str, tuple[float, MemberRecord]] = {}  # spare -> (when seen in the DHT, record)
        self._fetched: dict[str, tuple[float, MemberRecord | None]] = {}  # peer -> (when, record read from it)
        self._refreshed = time.monotonic()

    # ---- records -------------------------------------------------------------------------------
    def record(self) -> MemberRecord:
        w, st = self.worker, self.status
        return MemberRecord(
            run_id=self.run_id,
            fingerprint=self.fingerprint,
            peer_id=self.peer_id,
            stage=w.index if w is not None else self.asked_stage,
            epoch=st.epoch,
            state=st.state,
            step=st.step,
            iteration=st.iteration,
            pending=bool(w is not None and w.pending_step is not None),
            grad_norm=w.recovery_norm(self.cfg.recovery.norm_source) if w is not None else 0.0,
            host=self.cfg.membership.announce_host or self.cfg.membership.host,
            loss=st.loss,
            tokens_per_s=st.tokens_per_s,
            pid=os.getpid(),
            note=self.leader.reason,
            lineage=w.lineage if w is not None else Lineage(),
            error=self.last_error,
            blame=self.blame,
            shadow_ok=w.shadow_ok if w is not None else True,
            probe_port=self.probes.port,
            counters=self.counters(),
            maddrs=self._maddrs,
            handoff_port=self._handoff_port,
        )

    def _serve_now(self) -> MemberRecord:
        """Refresh the record served on the probe port (its ``time`` is new: the members watching this peer
        see that it lives)."""
        rec = self.record()
        rec.time = self.membership.now
        self.probes.served = self.membership.seal_member(rec)
        return rec

    def _beat_now(self) -> None:
        self.membership.heartbeat(self._serve_now())
        self._stored = time.monotonic()

    def _fill(self, members: dict[str, MemberRecord], current: EpochRecord | None) -> None:
        """Read the records of the roster's members straight from their probe ports (anew on every pass of a
        member of the swarm; a spare reuses them for half a watch interval) and keep, per member, the newer of
        that and the DHT's:
        the leader decides on the members' reports as they are now, not as they were at their last DHT store
        (a member that aborts knocks the others before it stores its report), and a partial DHT view (a freshly
        joined node, a node whose DHT neighbours were killed) neither stalls a decision nor hides who leads.
        Spares seen in an earlier DHT read and missing from this one are read from their probe ports too: a
        spare's DHT store can stall behind a node whose host vanished until its record expires, while the
        spare itself is fine."""
        now = time.monotonic()
        max_age = self.view.period_s / 2 if self.status.state == "spare" else 0.0
        addresses = {}
        if current is not None:
            addresses = {pid: current.probes[s] for s, pid in enumerate(current.roster) if s < len(current.probes)}
        for pid, r in members.items():
            if r.state == "spare" and r.probe_port:
                self._spares_seen[pid] = (now, r)
        for pid, (when, r) in list(self._spares_seen.items()):
            if now - when > 4 * self.cfg.membership.ttl_s:
                del self._spares_seen[pid]  # long gone from the DHT: not worth a probe any more
            elif pid not in members and pid not in addresses:
                addresses[pid] = (r.host, r.probe_port)
        for pid, address in addresses.items():
            if pid == self.peer_id or pid in self.view.dead:
                continue
            when, rec = self._fetched.get(pid, (-1e9, None))
            if now - when >= max_age:
                _, value = self.prober.ask(*address, pid)
                rec = self.membership.open_member(value, pid) if value is not None else None
                self._fetched[pid] = (time.monotonic(), rec)
            if rec is not None and (pid not in members or rec.time > members[pid].time):
                members[pid] = rec

    def _end_epoch(self, rec: EpochRecord, reason: str, stages: list[int]) -> None:
        """From the heartbeat thread: end epoch ``rec`` for this peer, if it is still the one being joined or
        trained in (the main thread may have moved on while this thread read the DHT)."""
        with self._epoch_lock:
            if self.joined is not rec or self.epoch_over is not None:
                return
            self.epoch_over, self._over_stages = reason, stages
            group = self.group
        if group is not None and group.epoch == rec.epoch:
            group.abort(reason)

    def _on_knock(self) -> None:
        """A knock on the probe port (rate-limited by the server, see ``probe``): wake the main thread (a new
        epoch, a member's report) and the watch."""
        self._wake.set()
        self._knocked.set()

    def _take_pushed(self, sealed: bytes) -> bool:
        """The epoch record a leader pushed with its knock, checked like one read from the DHT; a malformed or
        unsealed one is refused (the DHT still has the real one)."""
        rec = self.membership.open_epoch(sealed)
        if rec is None:
            return False
        with self._epoch_lock:
            if self._pushed is None or rec.epoch > self._pushed.epoch:
                self._pushed = rec
        return True

    def counters(self) -> dict[str, int]:
        """What reached this peer's open ports (heartbeated, and written at exit: see ``peer_counters``)."""
        out = dict(self.probes.counts)
        foreign, _ = self.membership.tally.counts()
        out["records_foreign"] = foreign
        out["revived"] = self.view.revived
        for gate in list(self.leader.gates.values()):
            for k, v in getattr(gate, "counts", {}).items():
                out[f"gate_{k}"] = out.get(f"gate_{k}", 0) + v
        return out

    def _heartbeat_loop(self) -> None:
        """Every ``membership.watch_s``, or at once when knocked: serve a fresh record on the probe port and
        watch the epoch's members through theirs. No DHT call is made here (see ``_dht_loop``), so that a
        knock is acted on within milliseconds, never behind a DHT round trip."""
        m = self.cfg.membership
        while not self._stop.is_set():
            try:
                self._serve_now()
                self._watch()
            except Exception:  # this thread must outlive any one bad round
                logger.exception("[peer %s] watch round failed", self.peer_id)
            self._knocked.wait(min(m.watch_s, m.period_s))  # or at once when knocked
            self._knocked.clear()

    def _dht_loop(self) -> None:
        """Every ``membership.period_s`` (or at once when asked, e.g. after an abort): store this peer's record
        in the DHT (what spares, the launcher and ``status`` read); while in an epoch, read the DHT's epoch
        record every 4 watch intervals (a newer epoch ends this one) and re-store it every
        ``membership.epoch_ttl_s / 4`` so that it outlives any run. Separate from the watch because DHT
        stores are what the failure-free swarm pays for (every DHT node handles each) and take a round trip,
        while probes cost next to nothing."""
        m = self.cfg.membership
        read = -1e9
        while not self._stop.is_set():
            try:
                if time.monotonic() - self._stored >= m.period_s or self._store_now.is_set():
                    self._store_now.clear()
                    self._beat_now()
                if self.notice.noticed is not None and not self._spare_in_view and self.status.state == "running":
                    # a preemption notice: the stage is handed over as soon as a spare can take it
                    self._spare_in_view = any(r.state == "spare" for r in self.membership.members().values())
                rec = self.joined
                due = time.monotonic() - self._refreshed > m.epoch_ttl_s / 4
                if rec is not None and self.epoch_over is None and (time.monotonic() - read >= 4 * m.watch_s or due):
                    read = time.monotonic()
                    current = self.membership.current_epoch()
                    if current is not None and current.epoch > rec.epoch:
                        self._end_epoch(rec, f"epoch {current.epoch} was published", [])
                    elif current is not None and not current.finished and due:
                        self.membership.publish_epoch(current)
                        self._refreshed = time.monotonic()
            except DHTUnavailable as e:
                logger.warning("[peer %s] heartbeat failed: %s", self.peer_id, e)
            except Exception:  # this thread must outlive any one bad round
                logger.exception("[peer %s] DHT round failed", self.peer_id)
            self._store_now.wait(min(m.watch_s, m.period_s))

    def _watch(self) -> None:
        """While this peer joins or trains in an epoch, read every other member's record from its probe port
        (no DHT read: the watch costs the training swarm next to nothing) and end the epoch for this peer
        when a member is gone (its probe refused: a crash, a clean exit), frozen (its heartbeat stalled for
        1.5 periods and its probe is silent: a hang, a vanished host, a dead leader hosting the rendezvous),
        or reports the epoch broken. Every wait of the epoch (rendezvous, hand-over, training) is released
        then, not after a socket timeout."""
        self._maybe_cut()
        rec = self.joined
        if rec is None or self.epoch_over is not None:
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
            self._end_epoch(rec, f"stages {gone} of epoch {rec.epoch} lost: probe refused (process gone)", gone)
        elif frozen:
            reason = (
                f"stages {frozen} of epoch {rec.epoch} lost: heartbeat stalled and probes unanswered for "
                f"membership.hang_s={self.cfg.membership.hang_s} s (frozen)"
            )
            self._end_epoch(rec, reason, frozen)
        elif broke:
            self._end_epoch(rec, f"stages {broke} of epoch {rec.epoch} reported it broken", broke)

    def _maybe_cut(self) -> None:
        t = self.cfg.transport
        named = t.fault_cut_peer in (self.peer_id, self.peer_id.rpartition(".")[0])  # its id or its name
        if self._cut or not named or self.status.step < t.fault_cut_at_step:
            return
        self._cut = True
        reason = f"data plane cut at step {self.status.step} (transport.fault_cut_peer={self.peer_id})"
        logger.warning("[peer %s] fault injection: %s", self.peer_id, reason)
        with self._epoch_lock:
            group = self.group
        if group is not None:
            group.abort(reason)

    def emit(self, event: str, **fields) -> None:
        # while a new peer joins, the stage it is taking is the one its group serves
        stage = self.worker.index if self.worker is not None else self.group.stage if self.group is not None else None
        self.events.emit(event, peer=self.peer_id, stage_held=stage, epoch=self.status.epoch, **fields)

    # ---- main loop -----------------------------------------------------------------------------
    def run(self) -> ExitCode:
        """Serve until the run is done or this peer was replaced (OK), or the swarm stopped (SWARM_STOPPED)."""
        self._beat.start()
        self._dht_thread.start()
        self.emit(
            "peer_started",
            role="stage" if self.asked_stage >= 0 else "spare",
            asked_stage=self.asked_stage,
            pid=os.getpid(),
            maddrs=self.membership.visible_maddrs(),
        )
        try:
            while True:
                rec = self._wait_for_epoch()
                if rec is None:
                    return self._stop_code()
                try:
                    resumed = self._join(rec)
                    self.training.run(self.group, self.worker, self.status, resumed)
                    self._finish()
                    return ExitCode.OK
                except (StageLostError, PeerProtocolError) as e:
                    self._abort(e)
        except Preempted as e:
            return self._leave(str(e))
        except PeerCannotServe as e:
            self.emit("left", reason=str(e))
            logger.error("[peer %s] leaving: %s", self.peer_id, e)
            return ExitCode.LEFT
        except AdmissionError as e:  # its join token is not the swarm's
            self.emit("left", reason=str(e))
            logger.error("[peer %s] %s", self.peer_id, e)
            return ExitCode.BAD_INPUT
        except NonFiniteSteps as e:  # every stage reaches this verdict at the same step
            self.emit("swarm_stopped", reason=str(e))
            logger.error("[peer %s] %s", self.peer_id, e)
            try:
                self.leader.stop_swarm(self.joined, str(e), self.status.step)
            except (SwarmStopped, DHTUnavailable):
                pass
            return ExitCode.SWARM_STOPPED
        except DHTGone as e:
            self.emit("left", reason=str(e))
            logger.error("[peer %s] leaving: %s", self.peer_id, e)
            return ExitCode.CRASHED
        except SwarmStopped as e:
            self.emit("swarm_stopped", reason=str(e))
            logger.error("[peer %s] %s", self.peer_id, e)
            self._try_save_part()  # the run's last committed weights, as far as this stage goes
            return ExitCode.SWARM_STOPPED
        finally:
            self._stop.set()
            self._knocked.set()
            self._store_now.set()
            self._beat.join(timeout=5)
            self._dht_thread.join(timeout=5)
            self.emit("peer_counters", counters=self.counters())
            self.probes.close()
            self.notice.close()
            for tunnel in list(self._tunnels.values()):
                tunnel.close()
            self.membership.tombstone(self.peer_id)
            self.membership.shutdown()
            self.events.close()
            self.metrics.close()

    def _wait_for_epoch(self) -> EpochRecord | None:
        cfg = self.cfg
        self.leader.waiting_since = None  # swarm.spare_wait_s counts from the start of this wait
        failures = 0
        while True:
            if self._stop_kind is not None:
                # between epochs there is no epoch to hand a stage over in: a stage held is saved (``_leave``)
                raise Preempted("interrupted (SIGINT)" if self._stop_kind == "interrupt" else "terminated (SIGTERM)")
            pushed = self._pushed
            if pushed is not None and pushed.epoch > self.status.epoch and self.peer_id in pushed.roster:
                return pushed  # knocked with it by its leader: no DHT round trip before joining
            try:
                members, current = self.membership.members_and_epoch()
            except DHTGone:
                raise  # deaf and mute: this peer cannot serve (run() ends it)
            except DHTUnavailable as e:  # transient: back off and look again; never a reason to die
                failures += 1
                logger.warning("[peer %s] DHT read failed (%d in a row): %s", self.peer_id, failures, e)
                time.sleep(min(cfg.membership.period_s * 2**failures, 5.0))
                continue
            failures = 0
            self._check_token()
            members[self.peer_id] = self.record()  # our own view is fresher than the DHT's
            self._fill(members, current)
            if current is not None and current.stop:
                raise SwarmStopped(current.stop)
            if (current is not None and current.finished) or any(r.state == "done" for r in members.values()):
                if self.worker is None:
                    return None  # the run finished while this peer was a spare
            if self.notice.noticed is not None and self.worker is None:
                # a spare whose machine goes away holds nothing to hand over: it leaves before it is given a stage
                self.emit("left", reason=f"preemption notice while a spare: {self.notice.text[:200]}")
                return None
            if current is not None and current.epoch > self.status.epoch:
                if self.peer_id in current.roster:
                    return current
                if self.worker is None and self.status.state != "spare":
                    # arrived after the roster was set, or its own rebuild broke off and the stage went to
                    # another peer: it holds no weights, so it stands by as a spare
                    self.asked_stage = -1
                    self.status.move(PeerState.SPARE)
                    self.emit("became_spare", reason=f"no stage for this peer in epoch {current.epoch}")
                if self.worker is not None:
                    self.emit("replaced", by_epoch=current.epoch)
                    logger.warning(
                        "[peer %s] stage %d was given to another peer in epoch %d; leaving",
                        self.peer_id,
                        self.worker.index,
                        current.epoch,
                    )
                    return None
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
            wait = cfg.membership.period_s if self.status.state == "spare" else cfg.membership.poll_s
            self._wake.wait(wait)  # or until knocked: a new epoch, a member's report
            self._wake.clear()

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
            f"this peer's join token does not match the swarm's: in {waited:.0f} s every record read from the swarm "
            f"at {' '.join(self._initial_peers)} ({foreign}) was sealed with another token and none with its own; "
            f"pass the swarm's token with ${TOKEN_ENV} or --join-token (the peer that started the swarm wrote it to "
            f"its RUN_DIR/{TOKEN_FILE})"
        )

    def _own_failures(self, schedule) -> OwnFailures | None:
        """swarm.inject=peer: this peer draws the run's failures and dies at its own (``injection``)."""
        cfg = self.cfg
        if not self.inject_failures or cfg.swarm.inject != "peer" or cfg.failures.mode == "none":
            return None
        return OwnFailures(cfg.failures, schedule, self.dir, cfg.swarm.hang_fraction, cfg.swarm.vanish_fraction)

    # ---- joining an epoch ----------------------------------------------------------------------
    def _join(self, rec: EpochRecord) -> bool:
        """Form the epoch's group and hand over weights; returns whether the epoch follows a recovery."""
        t0 = time.monotonic()
        stage = rec.roster.index(self.peer_id)
        fresh = self.worker is None or self.worker.index != stage
        self.status.epoch, self.leader.reason = rec.epoch, ""
        self.status.move(PeerState.JOINING)
        with self._epoch_lock:
            self.joined, self.epoch_over, self._over_stages = rec, None, []
        if fresh:  # heartbeat the stage and step being joined, also if this join breaks off
            self.asked_stage, self.status.step = stage, rec.step
        handoff = next((p for p in rec.plans if p.method == "handoff" and p.stage == stage), None)
        if handoff is not None and stage in rec.lost:
            # fetched before the group forms: the others wait at the rendezvous (rendezvous_timeout_s), not in
            # a collective limited by transport.timeout_s, while a large stage crosses a slow link
            try:
                self._prefetched = (rec.epoch, self._fetch(handoff))
            except (ConnectionError, OSError, RuntimeError) as e:
                raise StageLostError(None, rec.step, f"hand-over of stage {stage} from {handoff.peer}: {e}") from e
        group = self._form_group(rec, stage)
        with self._epoch_lock:
            self.group, over = group, self.epoch_over
        if over is not None:  # ended while the group was being formed: no wait of it may outlive that
            group.abort(over)
        worker = self.worker if not fresh else None
        self.worker, self.status.step = self.handover.run(self.group, worker, rec, self.status.step, adopt=self._adopt)
        self.group.all_reduce(torch.zeros(1, dtype=torch.float64), rec.step)  # everyone is ready
        self.status.step, self.status.iteration = rec.step, rec.iteration
        self.status.move(PeerState.RUNNING)
        self.emit(
            "epoch_joined",
            joined_epoch=rec.epoch,
            stage=stage,
            step=rec.step,
            join_s=time.monotonic() - t0,
            rebuilt=stage in rec.lost,
        )
        return rec.epoch > 0

    def _adopt(self, worker: StageWorker, step: int) -> None:
        """The hand-over changed this peer's weights: heartbeat them (and their lineage) from now on."""
        self.worker, self.status.step = worker, step

    def _form_group(self, rec: EpochRecord, stage: int) -> EpochGroup:
        """Join the epoch's rendezvous store and build its process group, in a helper thread that is abandoned
        as soon as the epoch is known to be over (a member lost, the leader hosting the store included), so
        that no peer waits out ``transport.rendezvous_timeout_s`` for a dead one. An abandoned attempt ends
        by itself at that timeout."""
        cfg, L = self.cfg, self.cfg.model.num_stages
        if self._cut:
            raise StageLostError(None, rec.step, f"rendezvous of epoch {rec.epoch} failed: data plane cut off")
        hosted = self.leader.hosted.get(rec.epoch)
        out: dict[str, object] = {}

        def form() -> None:
            try:
                store = hosted
                if store is None:
                    # the store admits members only: reach it through a tunnel that passes its gate (see gate)
                    tunnel = Tunnel(rec.store_host, rec.store_port, self.membership.admission, rec.leader, rec.epoch)
                    with self._epoch_lock:  # an abandoned, late attempt of an older epoch closes only older ones
                        self._tunnels[rec.epoch] = tunnel
                        old = [self._tunnels.pop(e) for e in list(self._tunnels) if e < rec.epoch]
                    for t in old:
                        t.close()
                    store = dist.TCPStore(
                        "127.0.0.1",
                        tunnel.port,
                        L,
                        is_master=False,
                        timeout=timedelta(seconds=cfg.transport.rendezvous_timeout_s),
                    )
                out["group"] = EpochGroup(
                    store,
                    rec.epoch,
                    stage,
                    list(range(L)),
                    cfg.transport,
                    run_tag=int(self.fingerprint[:6], 16),
                    host=data_host(cfg.membership.host, cfg.membership.announce_host),
                    device=self.device,
                )
            except Exception as e:  # handed to the main thread
                out["error"] = e

        thread = threading.Thread(target=form, name=f"rendezvous-{rec.epoch}", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.02)
            if self.epoch_over is not None and thread.is_alive():
                raise StageLostError(None, rec.step, f"rendezvous of epoch {rec.epoch} abandoned: {self.epoch_over}")
        if "error" in out:
            e = out["error"]
            raise StageLostError(None, rec.step, f"rendezvous of epoch {rec.epoch} failed: {e}") from e
        return out["group"]

    def _abort(self, e: Exception) -> None:
        w = self.worker
        self.last_error = str(e)[:200]
        # whom this peer blames: the heartbeat thread's verdict if it ended the epoch, else the stage the
        # transport was waiting on (the leader singles out a peer that every other member blames, see Leader)
        with self._epoch_lock:
            if self.epoch_over is not None:
                self.blame = list(self._over_stages)
            else:
                suspect = getattr(e, "stage", None)
                self.blame = [suspect] if suspect is not None and suspect != (w.index if w else None) else []
        self.emit(
            "step_aborted",
            step=self.status.step,
            cause=str(e)[:300],
            suspect=getattr(e, "stage", None),
            error=type(e).__name__,
            pending=w is not None and w.pending_step is not None,
        )
        logger.warning("[peer %s stage %s step %d] %s", self.peer_id, w.index if w else None, self.status.step, e)
        if w is not None and w.pending_step is None:
            w.discard()
        if self.group is not None:
            self.group.close()
            self.group = None
        self._settle_writes()  # the leader decides on a store that no write of this peer changes any more
        with self._epoch_lock:
            rec, self.joined = self.joined, None
        self.status.move(PeerState.RECOVERING)
        # report at once, where the members read first: the probe port; knock them (the leader among them) to
        # read it now; the heartbeat thread stores it in the DHT next (for spares, the launcher, ``status``)
        self._serve_now()
        if rec is not None:
            self.prober.knock([a for pid, a in zip(rec.roster, rec.probes) if pid != self.peer_id])
        self._store_now.set()
        self._knocked.set()

    def _settle_writes(self) -> None:
        """Wait for this stage's checkpoint write in flight (hybrid: written in the background); a failed one
        is an event (``TrainingLoop._write_failed``), not an error: the checkpoint of that step is incomplete."""
        if self.training.saver is not None:
            self.training.saver.wait()

    # ---- receiving a hand-over (leaving: see ``leaving``) -------------------------------------------
    def _fetch_handoff(self, plan: PlanRecord, step: int) -> StagePayload:
        """For ``Handover``: the state fetched for this epoch before its group formed (see ``_join``)."""
        epoch, payload = self._prefetched
        self._prefetched = (-1, None)
        if epoch != self.status.epoch or payload is None:
            raise ConnectionError(f"no hand-over of stage {plan.stage} was fetched for epoch {self.status.epoch}")
        return payload

    def _fetch(self, plan: PlanRecord) -> StagePayload:
        host, port = plan.address
        timeout_s = self.cfg.swarm.preemption.handoff_timeout_s
        return fetch_handoff(host, port, self.membership.admission, plan.peer, plan.stage, timeout_s)

    def _finish(self) -> None:
        self.status.move(PeerState.DONE)
        self._try_save_part()
        try:  # the end is a saved step too: a finished run is known as one, and raising num_steps extends it
            self.training.save_now(self.worker, self.status.step)
        except (OSError, RuntimeError) as e:
            logger.error("[peer %s] cannot save stage %d at the end: %s", self.peer_id, self.worker.index, e)
        self.emit("done", step=self.status.step, loss=self.status.loss)
        (self.dir / "done").write_text(f"{self.status.step}\n")  # for a launcher that polls the disk
        try:
            self._beat_now()
            # member records expire, the epoch record stays: it tells late spares the run is over (and keeps
            # them from reading the finished stages' departure as every stage being lost)
            current = self.membership.current_epoch()
            if current is not None and current.epoch == self.status.epoch and not current.finished:
                self.membership.mark_finished(current.epoch)
        except DHTUnavailable:
            pass
        # stay reachable briefly so that the other stages' last all-reduce and their reads complete
        time.sleep(2 * min(self.cfg.membership.watch_s, self.cfg.membership.period_s))
