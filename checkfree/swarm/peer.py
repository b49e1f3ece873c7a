"""
Peer
====

One process of the swarm: a stage peer (holds a stage) or a spare (waits to be given one). This module is
the peer's lifecycle: its heartbeat thread, the main loop (wait for an epoch that names it, join the
epoch's process group, hand over weights, train until the run is done or a stage is lost, then report and
wait again) and its exit. The other jobs live in their own modules: ``leader`` (deciding and publishing
epochs while this peer leads), ``handover`` (the weight transfers and rebuilds between epochs) and
``training`` (the training loop inside an epoch).

Commit semantics: a step is applied by every stage or by none (``StageWorker.commit``). If the commit
all-reduce breaks after some stage completed it, the stages that did not keep their finished gradients
(``pending``) and apply them when the next epoch names that step as done.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from checkfree.config import TrainConfig
from checkfree.core.checkpoint import CheckpointStore
from checkfree.core.data import Batches
from checkfree.core.events import EventLog
from checkfree.core.exit_codes import ExitCode
from checkfree.core.metrics import MetricLogger
from checkfree.core.recovery import edge_replicas_on
from checkfree.core.schedule import schedule_for
from checkfree.swarm.config import config_fingerprint
from checkfree.swarm.coordinator import PeerCannotServe, SwarmStopped, leader_of
from checkfree.swarm.handover import Handover
from checkfree.swarm.leader import Leader
from checkfree.swarm.membership import DHTUnavailable, EpochRecord, MemberRecord, Membership
from checkfree.swarm.training import PeerStatus, TrainingLoop
from checkfree.swarm.transport import EpochGroup, PeerProtocolError, StageLostError
from checkfree.swarm.worker import StageWorker

logger = logging.getLogger(__name__)

__all__ = ["Peer", "SwarmStopped"]


class Peer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        stage: int | None,
        initial_peers: list[str],
        peer_id: str | None = None,
    ):
        L = cfg.model.num_stages
        if cfg.recovery.strategy == "redundant" and cfg.swap_enabled:
            raise ValueError(
                "recovery.strategy=redundant with pipeline.swap=true: in the swarm a shadow's input is "
                "its holder's own output, which needs the plain route; set pipeline.swap=false"
            )
        if stage is not None and not 0 <= stage < L:
            raise ValueError(f"--stage {stage} out of range: expected 0..{L - 1} (model.num_stages={L})")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.peer_id = peer_id or secrets.token_hex(4)
        self.run_id = cfg.swarm.run_id or cfg.run_name
        self.fingerprint = config_fingerprint(cfg)
        # the DHT forks: start it before the model and data exist (HIVEMIND-NOTES pitfall 4)
        self.membership = Membership(cfg.membership, self.run_id, self.fingerprint, initial_peers)
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
        ckpt = None
        if cfg.checkpoint.every_steps:
            ckpt = CheckpointStore(
                cfg.checkpoint.dir or self.run_dir / "checkpoints",
                L,
                keep=1 << 30,
                storage_mb_s=cfg.checkpoint.storage_mb_s,
            )
        self.leader = Leader(
            cfg, self.peer_id, self.run_id, self.fingerprint, self.membership, ckpt, replicas_on, self.emit
        )
        self.handover = Handover(
            cfg,
            schedule,
            batches,
            self.device,
            ckpt,
            self.emit,
            stop_swarm=lambda rec, reason: self.leader.stop_swarm(rec, reason, self.status.step),
        )
        tokens = batches.tokens_per_microbatch() * cfg.pipeline.num_microbatches
        self.training = TrainingLoop(
            cfg, tokens, self.metrics, ckpt, self.emit, self.handover.exchange_replicas if replicas_on else None
        )
        self.asked_stage = -1 if stage is None else stage
        self.worker: StageWorker | None = None
        self.group: EpochGroup | None = None
        self.status = PeerStatus(state="waiting" if stage is not None else "spare")
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)

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
            pending=bool(w is not None and w.pending_step is not None),
            grad_norm=w.recovery_norm(self.cfg.recovery.norm_source) if w is not None else 0.0,
            host=self.cfg.membership.announce_host or self.cfg.membership.host,
            loss=st.loss,
            tokens_per_s=st.tokens_per_s,
            pid=os.getpid(),
            note=self.leader.reason,
        )

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.membership.heartbeat(self.record())
            except DHTUnavailable as e:
                logger.warning("[peer %s] heartbeat failed: %s", self.peer_id, e)
            self._stop.wait(self.cfg.membership.period_s)

    def emit(self, event: str, **fields) -> None:
        # while a new peer joins, the stage it is taking is the one its group serves
        stage = self.worker.index if self.worker is not None else self.group.stage if self.group is not None else None
        self.events.emit(event, peer=self.peer_id, stage_held=stage, epoch=self.status.epoch, **fields)

    # ---- main loop -----------------------------------------------------------------------------
    def run(self) -> ExitCode:
        """Serve until the run is done or this peer was replaced (OK), or the swarm stopped (SWARM_STOPPED)."""
        self._beat.start()
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
                    return ExitCode.OK
                try:
                    resumed = self._join(rec)
                    self.training.run(self.group, self.worker, self.status, resumed)
                    self._finish()
                    return ExitCode.OK
                except (StageLostError, PeerProtocolError) as e:
                    self._abort(e)
        except PeerCannotServe as e:
            self.emit("left", reason=str(e))
            logger.error("[peer %s] leaving: %s", self.peer_id, e)
            return ExitCode.LEFT
        except SwarmStopped as e:
            self.emit("swarm_stopped", reason=str(e))
            logger.error("[peer %s] %s", self.peer_id, e)
            return ExitCode.SWARM_STOPPED
        finally:
            self._stop.set()
            self._beat.join(timeout=5)
            self.membership.tombstone(self.peer_id)
            self.membership.shutdown()
            self.events.close()
            self.metrics.close()

    def _wait_for_epoch(self) -> EpochRecord | None:
        cfg = self.cfg
        self.leader.waiting_since = None  # swarm.spare_wait_s counts from the start of this wait
        while True:
            members = self.membership.members()
            members[self.peer_id] = self.record()  # our own view is fresher than the DHT's
            current = self.membership.current_epoch()
            if current is not None and current.stop:
                raise SwarmStopped(current.stop)
            if (current is not None and current.finished) or any(r.state == "done" for r in members.values()):
                if self.worker is None:
                    return None  # the run finished while this peer was a spare
            if current is not None and current.epoch > self.status.epoch:
                if self.peer_id in current.roster:
                    return current
                if self.worker is None and self.status.state == "waiting":
                    self.asked_stage, self.status.state = -1, "spare"  # arrived after the roster was set: stand by
                    self.emit("became_spare", reason=f"stage taken in epoch {current.epoch}")
                if self.worker is not None:
                    self.emit("replaced", by_epoch=current.epoch)
                    logger.warning(
                        "[peer %s] stage %d was given to another peer in epoch %d; leaving",
                        self.peer_id,
                        self.worker.index,
                        current.epoch,
                    )
                    return None
            if leader_of(members, current) == self.peer_id:
                self.leader.step(members, current, self.status.step)
            time.sleep(cfg.membership.poll_s)

    # ---- joining an epoch ----------------------------------------------------------------------
    def _join(self, rec: EpochRecord) -> bool:
        """Form the epoch's group and hand over weights; returns whether the epoch follows a recovery."""
        cfg, L = self.cfg, self.cfg.model.num_stages
        t0 = time.time()
        stage = rec.roster.index(self.peer_id)
        fresh = self.worker is None or self.worker.index != stage
        self.status.epoch, self.status.state, self.leader.reason = rec.epoch, "joining", ""
        if fresh:  # heartbeat the stage and step being joined, also if this join breaks off
            self.asked_stage, self.status.step = stage, rec.step
        store = self.leader.hosted.get(rec.epoch)
        try:
            if store is None:
                store = dist.TCPStore(
                    rec.store_host,
                    rec.store_port,
                    L,
                    is_master=False,
                    timeout=timedelta(seconds=cfg.transport.rendezvous_timeout_s),
                )
            self.group = EpochGroup(
                store,
                rec.epoch,
                stage,
                list(range(L)),
                cfg.transport,
                run_tag=int(self.fingerprint[:6], 16),
                device=self.device,
            )
        except (RuntimeError, TimeoutError) as e:
            raise StageLostError(None, rec.step, f"rendezvous of epoch {rec.epoch} failed: {e}") from e
        worker = self.worker if not fresh else None
        self.worker, self.status.step = self.handover.run(self.group, worker, rec, self.status.step)
        self.group.all_reduce(torch.zeros(1, dtype=torch.float64), rec.step)  # everyone is ready
        self.status.step, self.status.state = rec.step, "running"
        self.emit(
            "epoch_joined",
            joined_epoch=rec.epoch,
            stage=stage,
            step=rec.step,
            join_s=time.time() - t0,
            rebuilt=fresh and rec.epoch > 0,
        )
        return rec.epoch > 0

    def _abort(self, e: Exception) -> None:
        w = self.worker
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
        self.status.state = "recovering"

    def _finish(self) -> None:
        self.status.state = "done"
        self.emit("done", step=self.status.step, loss=self.status.loss)
        (self.dir / "done").write_text(f"{self.status.step}\n")  # for a launcher that polls the disk
        try:
            self.membership.heartbeat(self.record())
            # member records expire, the epoch record stays: it tells late spares the run is over (and keeps
            # them from reading the finished stages' departure as every stage being lost)
            current = self.membership.current_epoch()
            if current is not None and current.epoch == self.status.epoch and not current.finished:
                self.membership.publish_epoch(current.model_copy(update={"finished": True}))
        except DHTUnavailable:
            pass
        # stay reachable briefly so that the other stages' last all-reduce and their reads complete
        time.sleep(self.cfg.membership.period_s * 2)
