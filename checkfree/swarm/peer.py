"""
Peer
====

One process of the swarm: a stage peer (holds a stage) or a spare (waits to be given one). This module is
the peer's lifecycle: the main loop (wait for an epoch that names it, join the epoch's process group, hand
over weights, train until the run is done or a stage is lost, then report and wait again) and its exit. Its
state moves only along the edges of ``states.TRANSITIONS``. The other jobs live in their own modules:
``watch`` (the heartbeat and DHT threads, and the epoch they share with the main thread), ``probe`` (the
probe port), ``leader`` (deciding and publishing epochs while this peer leads), ``rendezvous`` (forming an
epoch's group), ``handover`` (the weight transfers and rebuilds between epochs), ``training`` (the
training loop inside an epoch) and ``leaving`` (clean stops on a signal, and the hand-over of a stage on a
preemption notice).

Commit semantics: a step is applied by every stage or by none (``StageWorker.commit``). If the commit
all-reduce breaks after some stage completed it, the stages that did not keep their finished gradients
(``pending``) and apply them when the next epoch names that step as done.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch

from checkfree.config import TrainConfig
from checkfree.core.checkpoint import StagePayload
from checkfree.core.data import Batches
from checkfree.core.exit_codes import ExitCode
from checkfree.core.recovery import edge_replicas_on
from checkfree.core.schedule import schedule_for
from checkfree.core.stage_step import NonFiniteSteps
from checkfree.swarm.addressing import listen
from checkfree.swarm.admission import (
    SWARM_ENV,
    SWARM_FILE,
    TOKEN_ENV,
    TOKEN_FILE,
    Admission,
    AdmissionError,
    Identity,
    check_swarm_id,
    find_swarm_id,
    find_token,
    new_swarm_id,
    new_token,
    scrub_secrets,
    write_swarm_id,
    write_token,
)
from checkfree.swarm.config import check_swarm_config, config_fingerprint, parse_port_range
from checkfree.swarm.coordinator import PeerCannotServe, SwarmStopped
from checkfree.swarm.handover import Handover
from checkfree.swarm.injection import OwnFailures
from checkfree.swarm.leader import Leader
from checkfree.swarm.leaving import Leaving
from checkfree.swarm.limits import raise_file_limit
from checkfree.swarm.membership import DHTGone, DHTUnavailable, Membership
from checkfree.swarm.placement import place
from checkfree.swarm.preemption import NoticeWatcher, Preempted, fetch_handoff
from checkfree.swarm.probe import ProbeClient, ProbeServer
from checkfree.swarm.records import EpochRecord, PlanRecord
from checkfree.swarm.rendezvous import Rendezvous
from checkfree.swarm.reporting import Reporting
from checkfree.swarm.restart import checkpoint_store, previous_epoch
from checkfree.swarm.states import PeerState, PeerStatus
from checkfree.swarm.training import TrainingLoop
from checkfree.swarm.transport import PeerProtocolError, StageLostError
from checkfree.swarm.view import View
from checkfree.swarm.waiting import Waiting
from checkfree.swarm.watch import DhtLoop, EpochSlot, Reader, Watch
from checkfree.swarm.worker import StageWorker

logger = logging.getLogger(__name__)

__all__ = ["Peer", "SwarmStopped"]


def admission_for(
    run_dir: Path, join_token: str | None, initial_peers: list[str], peer_id: str | None, swarm_id: str | None = None
) -> tuple[Admission, Path | None]:
    """This peer's admission (the swarm's join token and id, its own identity) and the token file it created,
    if it starts a new swarm. A peer that starts a swarm draws a new swarm id (never the one of an earlier swarm
    in its run directory) and writes it to ``RUN_DIR/swarm_id``; a joiner must be given the swarm's. The
    secrets leave the environment once read: no child process inherits them."""
    token = find_token(join_token, run_dir)
    if initial_peers:
        if token is None:
            raise AdmissionError(
                f"joining the swarm at {initial_peers[0]} needs its join token: pass --join-token or set "
                f"${TOKEN_ENV} (the first peer wrote it to its RUN_DIR/{TOKEN_FILE})"
            )
        swarm_id = find_swarm_id(swarm_id, run_dir)
        if swarm_id is None:
            raise AdmissionError(
                f"joining the swarm at {initial_peers[0]} needs its swarm id: pass --swarm-id or set ${SWARM_ENV} "
                f"(the first peer wrote it to its RUN_DIR/{SWARM_FILE} and logged it)"
            )
    else:
        swarm_id = check_swarm_id(swarm_id) if swarm_id else new_swarm_id()
        write_swarm_id(run_dir, swarm_id)
    token_path = None
    if token is None:
        token = new_token()
        token_path = write_token(run_dir, token)
    identity = Identity.from_env(peer_id)
    scrub_secrets()  # read: no child (the DHT's p2pd, a shell) inherits the token or the key
    return Admission(token, identity, swarm_id), token_path


def announce(run_dir: Path, maddrs: list[str], peer_id: str, token_path: Path | None, swarm_id: str) -> None:
    """A peer that started a new swarm says how others join it (``checkfree swarm`` writes the same file)."""
    (run_dir / "maddrs.txt").write_text(" ".join(maddrs) + "\n")
    logger.warning(
        "[peer %s] started a new swarm: other peers join it with --initial-peers %s, %s=%s and the join token%s",
        peer_id,
        " ".join(maddrs),
        SWARM_ENV,
        swarm_id,
        f" in {token_path} (mode 0600)" if token_path else "",
    )


def own_failures(cfg: TrainConfig, inject: bool, schedule, peer_dir: Path) -> OwnFailures | None:
    """swarm.inject=peer: this peer draws the run's failures and dies at its own (``injection``)."""
    if not inject or cfg.swarm.inject != "peer" or cfg.failures.mode == "none":
        return None
    return OwnFailures(cfg.failures, schedule, peer_dir, cfg.swarm.hang_fraction, cfg.swarm.vanish_fraction)


class Peer(Reporting, Waiting, Leaving):
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        stage: int | None,
        initial_peers: list[str],
        peer_id: str | None = None,
        join_token: str | None = None,
        inject_failures: bool = False,
        swarm_id: str | None = None,
        device: str | None = None,
    ):
        """``peer_id``: this peer's name (its id is ``NAME.HASH`` of its key, see ``admission``; default: random);
        ``join_token``: the swarm's secret (None: from ``$CHECKFREE_JOIN_TOKEN`` or ``RUN_DIR/join_token``;
        a peer that starts a new swarm creates one and writes it there); ``swarm_id``: the id of the swarm it
        joins (None: from ``$CHECKFREE_SWARM_ID`` or ``RUN_DIR/swarm_id``; a peer that starts a swarm draws a new
        one); ``device``: this peer's device (None: the config's ``device``, see ``placement``);
        ``inject_failures``: draw the config's failures and die at this peer's own (``swarm.inject=peer``; the
        launcher asks for it)."""
        L = cfg.model.num_stages
        check_swarm_config(cfg)
        if stage is not None and not 0 <= stage < L:
            raise ValueError(f"--stage {stage} out of range: expected 0..{L - 1} (model.num_stages={L})")
        cfg, self.memory_plan = place(cfg, device, stage)
        self.cfg, self.run_dir, self.inject_failures = cfg, Path(run_dir), inject_failures
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        admission, token_path = admission_for(self.run_dir, join_token, initial_peers, peer_id, swarm_id)
        raise_file_limit()  # gloo keeps a descriptor per connection its listener ever accepted
        self.peer_id = admission.peer_id
        self.run_id = cfg.swarm.run_id or cfg.run_name
        self.fingerprint = config_fingerprint(cfg)
        # the DHT forks: start it before the model and data exist (HIVEMIND-NOTES pitfall 4)
        self.membership = Membership(cfg.membership, self.run_id, self.fingerprint, initial_peers, admission=admission)
        self._maddrs = self.membership.visible_maddrs()
        if not initial_peers:
            announce(self.run_dir, self._maddrs, self.peer_id, token_path, admission.swarm_id)
        self._open_logs()
        self.asked_stage = -1 if stage is None else stage
        self._joining = bool(initial_peers)  # joins a swarm (not a new one): its token is checked against it
        self._initial_peers = initial_peers
        self.worker: StageWorker | None = None
        self.status = PeerStatus(initial=PeerState.WAITING if stage is not None else PeerState.SPARE)
        self.last_error = ""  # why this peer's last epoch broke (heartbeated)
        self.blame: list[int] = []  # the stages this peer's last epoch broke on, as far as it knows (heartbeated)
        self._start_threads()
        self._build(admission.identity.name)

    def _start_threads(self) -> None:
        """The probe port, the view, and the watch and DHT threads (started by ``run``)."""
        cfg, m = self.cfg, self.cfg.membership
        admission = self.membership.admission
        self.slot = EpochSlot()  # the epoch being joined or trained in, shared with the threads
        self.prober = ProbeClient(admission)
        self.view = View(m.ttl_s, cfg.swarm.spare_wait_s, min(m.watch_s, m.period_s), m.period_s, self.prober, m.hang_s)
        self.reader = Reader(self.peer_id, m.ttl_s, self.view, self.prober, self.membership)
        self._wake = threading.Event()  # set by a knock on the probe port: the main thread reads the swarm now
        self._cut = False  # transport.fault_cut_peer: this peer's data plane is cut off (fault injection)
        self._standing_by = -1  # the epoch that replaced this holder, while it has not committed a step
        self.watch = Watch(
            self.peer_id,
            min(m.watch_s, m.period_s),
            self.view,
            self.prober,
            self.membership,
            self.slot,
            self._serve_now,
            self._maybe_cut,
        )
        self.dht = DhtLoop(self.peer_id, m, self.membership, self.slot, self._beat_now, self._look_for_spare)
        # the probe: a port that accepts while this process lives and refuses once it is gone, so that the
        # others can confirm a crash at once instead of waiting for the heartbeat to expire; a long backlog: a
        # frozen process accepts no connection, and its probe must still be told "frozen" from "silent"
        sock = listen(m.host, parse_port_range(m.port_range), backlog=4096)
        self.probes = ProbeServer(sock, admission, self._on_knock, self._take_pushed)

    def _build(self, name: str) -> None:
        """The training side: data, schedule, checkpoint store, leader role, hand-over and training loop."""
        cfg, L = self.cfg, self.cfg.model.num_stages
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
        self.rendezvous = Rendezvous(cfg, self.membership.admission, self.fingerprint, self.device, self.slot)
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
            inject=own_failures(cfg, self.inject_failures, schedule, self.dir),
        )
        # a preemption notice (off unless swarm.preemption.provider is set): hand the stage over and leave
        self.notice = NoticeWatcher(cfg.swarm.preemption, name)
        self._spare_in_view = False  # after a notice: the DHT thread saw a spare that can take the stage
        # a signal asked this peer to stop (``request_stop``): "interrupt" (SIGINT) or "terminate" (SIGTERM)
        self._stop_kind: str | None = None
        self._stop_at = 0.0  # monotonic time of that signal
        self._handoff_port = 0
        self._prefetched: tuple[int, StagePayload | None] = (-1, None)  # (epoch, state) fetched in _join

    # ---- main loop -----------------------------------------------------------------------------
    def run(self) -> ExitCode:
        """Serve until the run is done or this peer was replaced (OK), or the swarm stopped (SWARM_STOPPED)."""
        self.view.started = time.monotonic()  # it watches from now (building the model took a while)
        self.watch.thread.start()
        self.dht.thread.start()
        self._say_started()
        try:
            while True:
                rec = self._wait_for_epoch()
                if rec is None:
                    return self._stop_code()
                try:
                    resumed = self._join(rec)
                    self.training.run(self.slot.group, self.worker, self.status, resumed)
                    self._finish()
                    return ExitCode.OK
                except (StageLostError, PeerProtocolError) as e:
                    self._abort(e)
        except Preempted as e:
            return self._leave(str(e))
        except (PeerCannotServe, AdmissionError, DHTGone) as e:  # it cannot serve; a wrong token; deaf and mute
            self.emit("left", reason=str(e))
            logger.error("[peer %s] leaving: %s", self.peer_id, e)
            code = {PeerCannotServe: ExitCode.LEFT, AdmissionError: ExitCode.BAD_INPUT}
            return next((c for k, c in code.items() if isinstance(e, k)), ExitCode.CRASHED)
        except NonFiniteSteps as e:  # every stage reaches this verdict at the same step
            self.emit("swarm_stopped", reason=str(e))
            logger.error("[peer %s] %s", self.peer_id, e)
            try:
                self.leader.stop_swarm(self.slot.joined, str(e), self.status.step)
            except (SwarmStopped, DHTUnavailable):
                pass
            return ExitCode.SWARM_STOPPED
        except SwarmStopped as e:
            self.emit("swarm_stopped", reason=str(e))
            logger.error("[peer %s] %s", self.peer_id, e)
            self._try_save_part()  # the run's last committed weights, as far as this stage goes
            return ExitCode.SWARM_STOPPED
        finally:
            self._close()

    def _close(self) -> None:
        for thread in (self.watch, self.dht):
            thread.stop.set()
        self.watch.knocked.set()
        self.dht.store_now.set()
        self.watch.thread.join(timeout=5)
        self.dht.thread.join(timeout=5)
        self.emit("peer_counters", counters=self.counters())
        self.probes.close()
        self.notice.close()
        self.rendezvous.close()
        self.membership.tombstone(self.peer_id)
        self.membership.shutdown()
        self._close_logs()

    # ---- joining an epoch ----------------------------------------------------------------------
    def _join(self, rec: EpochRecord) -> bool:
        """Form the epoch's group and hand over weights; returns whether the epoch follows a recovery."""
        t0 = time.monotonic()
        stage = rec.roster.index(self.peer_id)
        fresh = self.worker is None or self.worker.index != stage
        self.status.epoch, self.leader.reason = rec.epoch, ""
        self.status.move(PeerState.JOINING)
        self.slot.begin(rec)
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
        if self._cut:
            raise StageLostError(None, rec.step, f"rendezvous of epoch {rec.epoch} failed: data plane cut off")
        self.slot.attach(self.rendezvous.form(rec, stage, self.leader.hosted.get(rec.epoch)))
        group = self.slot.group
        worker = self.worker if not fresh else None
        self.worker, self.status.step = self.handover.run(group, worker, rec, self.status.step, adopt=self._adopt)
        group.all_reduce(torch.zeros(1, dtype=torch.float64), rec.step)  # everyone is ready
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

    def _abort(self, e: Exception) -> None:
        w = self.worker
        self.last_error = str(e)[:200]
        # whom this peer blames: the watch's verdict if it ended the epoch, else the stage the transport was
        # waiting on (the leader singles out a peer that every other member blames, see ``coordinator.blamed``)
        self.blame = self.slot.blame(getattr(e, "stage", None), w.index if w else None)
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
        self.slot.close_group()
        self._settle_writes()  # the leader decides on a store that no write of this peer changes any more
        rec = self.slot.leave()
        self.status.move(PeerState.RECOVERING)
        # report at once, where the members read first: the probe port; knock them (the leader among them) to
        # read it now; the DHT thread stores it next (for spares, the launcher, ``status``)
        self._serve_now()
        if rec is not None:
            self.prober.knock([a for pid, a in zip(rec.roster, rec.probes) if pid != self.peer_id])
        self.dht.store_now.set()
        self.watch.knocked.set()

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
