"""
Training loop (swarm)
=====================

A stage peer's loop inside one epoch: run this stage's ops of the step, commit it with every other stage
(or not at all), log the committed step, refresh the edge replicas, save this stage's checkpoint and evaluate at the
configured cadences. With ``checkpoint.every_steps`` set every strategy saves, so that a swarm whose every
peer is gone can restart from the newest complete step; the file is written in the background (the training
thread only copies the state to memory) except under ``recovery.strategy=checkpoint``, whose rollback rule
counts on the last save being whole when a peer is lost (``coordinator.decide_epoch``). The loop keeps
``PeerStatus`` current, which the peer heartbeats. It needs only an ``EpochGroup`` and a worker, no DHT,
so tests run it on thread ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from checkfree.core.checkpoint import AsyncSaver, CheckpointStore, payload_bytes
from checkfree.core.metrics import JsonLines, peak_rss_mb
from checkfree.core.stage_step import NonFiniteGuard
from checkfree.swarm.preemption import Preempted
from checkfree.swarm.states import PeerStatus
from checkfree.swarm.transport import EpochGroup, PeerProtocolError, StageLostError
from checkfree.swarm.worker import StageWorker

logger = logging.getLogger(__name__)


class TrainingLoop:
    def __init__(
        self,
        cfg,
        tokens_per_step: int,
        metrics: JsonLines,
        ckpt: CheckpointStore | None,
        emit: Callable[..., object],
        exchange_replicas: Callable[[EpochGroup, StageWorker, int], None] | None,
        should_leave: Callable[[], str | None] | None = None,
        inject: Callable[[int, int, int], tuple[int, Callable[[], None]] | None] | None = None,
    ):
        """``should_leave()``: asked after every commit; a reason (a preemption notice) ends training with
        ``Preempted`` at that step boundary. ``inject(iteration, stage, step)``: this stage's own failure in
        that attempt, as ``StageWorker.run_step`` takes it (``swarm.inject=peer``), or None."""
        self.cfg, self.tokens_per_step, self.metrics, self.ckpt = cfg, tokens_per_step, metrics, ckpt
        self.emit, self.exchange_replicas, self.should_leave = emit, exchange_replicas, should_leave
        self.inject = inject
        self.nonfinite = NonFiniteGuard(cfg.optim)
        # this stage's file of a step is written in the background while training goes on; the step is a
        # checkpoint once every stage's file is there (``CheckpointStore.latest_complete``)
        background = ckpt is not None and cfg.checkpoint.every_steps and cfg.recovery.strategy != "checkpoint"
        self.saver = AsyncSaver(ckpt, on_error=self._write_failed) if background else None

    def save_now(self, worker: StageWorker, step: int) -> None:
        """Write this stage's state after ``step`` committed steps now and wait for it (a clean stop): the
        background write in flight first, so that the files of one stage land in step order."""
        if self.ckpt is None:
            return
        if self.saver is not None:
            self.saver.wait()
        every = self.cfg.checkpoint.every_steps
        if every and step % every == 0 and self.ckpt.latest_for_stage(worker.index) == step:
            return  # saved at this step already (its cadence)
        ts = time.monotonic()
        self.ckpt.save_stage(worker.payload(step))
        self.emit("checkpoint_save", step=step, save_s=time.monotonic() - ts, on_stop=True)

    def _write_failed(self, step: int, error: OSError) -> None:
        """A background write of this stage's checkpoint failed: that step stays incomplete (a rollback takes
        an older one) and training goes on; said as an event and in the log, every time."""
        self.emit("checkpoint_failed", step=step, error=str(error)[:300])
        logger.error("background checkpoint write of step %d failed, training goes on: %s", step, error)

    def run(self, group: EpochGroup, worker: StageWorker, status: PeerStatus, resumed: bool) -> None:
        """Train from ``status.step`` to ``num_steps``; ``resumed``: the epoch follows a recovery, so the first
        commit is logged as ``resumed``.

        Raises:
            StageLostError, PeerProtocolError: from the transport; the step is discarded or stays pending.
            Preempted: ``should_leave`` said so, after the commit of a step.
        """
        cfg = self.cfg
        while status.step < cfg.num_steps:
            t0 = time.monotonic()
            fail = self.inject(status.iteration, worker.index, status.step) if self.inject is not None else None
            status.iteration += 1
            try:
                worker.run_step(group, status.step, fail)
                loss = worker.commit(group, status.step)
            except (StageLostError, PeerProtocolError):
                if fail is not None:
                    # another stage's failure of this same iteration broke the step before this stage reached
                    # its own op: the engine loses both in this iteration, so does the swarm
                    fail[1]()
                raise
            if loss is None:
                stages = worker.nonfinite_stages
                self.emit("step_discarded", step=status.step, reason=f"non-finite gradient on stages {stages}")
                if self.nonfinite.discarded(status.step, stages):  # raises NonFiniteSteps unless skipping
                    self.emit("step_skipped", step=status.step, stages=stages, attempts=cfg.optim.nonfinite_attempts)
                    status.step += 1
                continue
            step_s = time.monotonic() - t0
            status.loss, status.tokens_per_s = loss, self.tokens_per_step / step_s
            done = status.step
            status.step += 1
            if resumed:
                resumed = False
                self.emit("resumed", step=done)
            # every stage logs the committed step (a stage lost right after the commit must not leave a gap);
            # a peer_step row of checkfree.core.metrics' schema (the launcher's merge adds time/train_s)
            self.metrics.write(
                {
                    "step": done,
                    "iteration": status.iteration - 1,  # the attempt that committed it, counted as the engine does
                    "loss/train": loss,
                    "throughput/tokens_per_s": status.tokens_per_s,
                    "time/wall": time.time(),
                    "time/step_s": step_s,
                    "epoch": status.epoch,
                    "stage": worker.index,
                    "memory/max_rss_mb": peak_rss_mb(),
                    "memory/shadow_bytes": worker.shadow.bytes() if worker.shadow is not None else 0,
                    "comm/bytes_sent": worker.bytes_sent,  # this stage's activations and gradients of the step
                    **{f"stage/{i}/grad_norm_raw": n for i, n in enumerate(worker.all_norms)},
                }
            )
            self._after_commit(group, worker, status)
            why = self.should_leave() if self.should_leave is not None and status.step < cfg.num_steps else None
            if why:
                raise Preempted(why)
        if self.saver is not None:
            self.saver.wait()  # the last checkpoint is whole before the peer reports the run done

    def _after_commit(self, group: EpochGroup, worker: StageWorker, status: PeerStatus) -> None:
        cfg, step = self.cfg, status.step
        if self.exchange_replicas is not None and step % cfg.recovery.edge_replica_every_steps == 0:
            self.exchange_replicas(group, worker, step)
        if self.ckpt and cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            ts = time.monotonic()
            if self.saver is not None:  # the stall is the copy to memory (a failed last write: an event)
                self.saver.save(step, [(worker.index, payload_bytes(worker.payload(step)))])
                self.emit("checkpoint_save", step=step, save_s=time.monotonic() - ts, background=True)
            else:
                self.ckpt.save_stage(worker.payload(step))
                self.emit("checkpoint_save", step=step, save_s=time.monotonic() - ts)
        every = cfg.eval_every_steps
        if (every and step % every == 0) or step == cfg.num_steps:
            val = worker.evaluate(group, cfg.data.num_val_batches, step)
            self.metrics.write({"step": step - 1, "epoch": status.epoch, "stage": worker.index, "loss/val": val})
