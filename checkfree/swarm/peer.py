"""
Peer
====

One process of the swarm: a stage peer (holds a stage) or a spare (waits to be given one). The main
thread waits for an epoch that names it, joins the epoch's process group, rebuilds or sends weights if
the epoch is a recovery, then trains until the run is done or a stage is lost; a heartbeat thread keeps
its record on the DHT fresh meanwhile. While every peer is stalled after a failure, the leader (the
lowest live stage) decides the next epoch (``coordinator.decide_epoch``) and hosts its rendezvous.

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
from checkfree.core.metrics import EventLog, JsonLines, peak_rss_mb
from checkfree.core.model import Stage, block_state, edge_state, init_stage_
from checkfree.core.recovery import RecoveryPlan, edge_kind, edge_replicas_on, rebuild_blocks, replica_holder
from checkfree.core.redundancy import full_state_like, full_state_tensors, load_full_state, shadow_holder, shadow_of
from checkfree.core.schedule import schedule_for
from checkfree.swarm.config import config_fingerprint
from checkfree.swarm.coordinator import decide_epoch, leader_of
from checkfree.swarm.membership import DHTUnavailable, EpochRecord, MemberRecord, Membership
from checkfree.swarm.shadow import HeldShadow
from checkfree.swarm.transport import EpochGroup, PeerProtocolError, StageLostError
from checkfree.swarm.worker import StageWorker

logger = logging.getLogger(__name__)


class SwarmStopped(RuntimeError):
    """The swarm cannot go on (no spare in time, recovery impossible); the run directory stays intact."""


class Peer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, stage: int | None, initial_peers: list[str],
                 peer_id: str | None = None):
        L = cfg.model.num_stages
        if cfg.recovery.strategy == "redundant" and cfg.swap_enabled:
            raise ValueError("recovery.strategy=redundant with pipeline.swap=true: in the swarm a shadow's input is "
                             "its holder's own output, which needs the plain route; set pipeline.swap=false")
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
        self.metrics = JsonLines(self.dir / "metrics.jsonl")
        self.batches = Batches(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.seed)
        self.schedule = schedule_for(cfg.pipeline, L, cfg.swap_enabled)
        self.device = torch.device(cfg.device)
        self.replicas_on = edge_replicas_on(cfg.recovery)
        self.ckpt = None
        if cfg.checkpoint.every_steps:
            self.ckpt = CheckpointStore(cfg.checkpoint.dir or self.run_dir / "checkpoints", L, keep=1 << 30,
                                        storage_mb_s=cfg.checkpoint.storage_mb_s)
        self.asked_stage = -1 if stage is None else stage
        self.worker: StageWorker | None = None
        self.group: EpochGroup | None = None
        self.hosted: dict[int, dist.TCPStore] = {}  # epoch -> store this peer hosts as leader
        self.epoch, self.step, self.state = -1, 0, "waiting" if stage is not None else "spare"
        self.loss: float | None = None
        self.tokens_per_s: float | None = None
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._last_reason = ""
        self._resume_pending = False
        self.started = time.time()

    # ---- records -------------------------------------------------------------------------------
    def record(self) -> MemberRecord:
        w = self.worker
        return MemberRecord(
            run_id=self.run_id, fingerprint=self.fingerprint, peer_id=self.peer_id,
            stage=w.index if w is not None else self.asked_stage, epoch=self.epoch, state=self.state,
            step=self.step, pending=bool(w is not None and w.pending_step is not None),
            grad_norm=w.recovery_norm(self.cfg.recovery.norm_source) if w is not None else 0.0,
            host=self.cfg.membership.announce_host or self.cfg.membership.host, loss=self.loss,
            tokens_per_s=self.tokens_per_s, pid=os.getpid(), note=self._last_reason,
        )

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.membership.heartbeat(self.record())
            except DHTUnavailable as e:
                logger.warning("[peer %s] heartbeat failed: %s", self.peer_id, e)
            self._stop.wait(self.cfg.membership.period_s)

    def emit(self, event: str, **fields) -> None:
        stage = self.worker.index if self.worker is not None else None
        self.events.emit(event, peer=self.peer_id, stage_held=stage, epoch=self.epoch, **fields)

    # ---- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until the run is done (0), this peer was replaced (0) or the swarm stopped (3)."""
        self._beat.start()
        self.emit("peer_started", role="stage" if self.asked_stage >= 0 else "spare", asked_stage=self.asked_stage,
                  pid=os.getpid(), maddrs=self.membership.visible_maddrs())
        try:
            while True:
                rec = self._wait_for_epoch()
                if rec is None:
                    return 0
                try:
                    self._join(rec)
                    self._train()
                    self._finish()
                    return 0
                except (StageLostError, PeerProtocolError) as e:
                    self._abort(e)
        except SwarmStopped as e:
            self.emit("swarm_stopped", reason=str(e))
            logger.error("[peer %s] %s", self.peer_id, e)
            return 3
        finally:
            self._stop.set()
            self._beat.join(timeout=5)
            self.membership.tombstone(self.peer_id)
            self.membership.shutdown()
            self.events.close()
            self.metrics.close()

    def _wait_for_epoch(self) -> EpochRecord | None:
        cfg = self.cfg
        waiting_since = None
        while True:
            members = self.membership.members()
            members[self.peer_id] = self.record()  # our own view is fresher than the DHT's
            current = self.membership.current_epoch()
            if current is not None and current.stop:
                raise SwarmStopped(current.stop)
            if (current is not None and current.finished) or any(r.state == "done" for r in members.values()):
                if self.worker is None:
                    return None  # the run finished while this peer was a spare
            if current is not None and current.epoch > self.epoch:
                if self.peer_id in current.roster:
                    return current
                if self.worker is None and self.state == "waiting":
                    self.asked_stage, self.state = -1, "spare"  # arrived after the roster was set: stand by
                    self.emit("became_spare", reason=f"stage taken in epoch {current.epoch}")
                if self.worker is not None:
                    self.emit("replaced", by_epoch=current.epoch)
                    logger.warning("[peer %s] stage %d was given to another peer in epoch %d; leaving",
                                   self.peer_id, self.worker.index, current.epoch)
                    return None
            if leader_of(members, current) == self.peer_id:
                waiting_since = self._lead(members, current, waiting_since)
            time.sleep(cfg.membership.poll_s)

    def _lead(self, members: dict[str, MemberRecord], current: EpochRecord | None, waiting_since: float | None):
        cfg = self.cfg
        ckpt_step = self.ckpt.latest_complete() if self.ckpt else None
        decision = decide_epoch(
            members, current, cfg.model.num_stages, cfg.recovery.strategy, cfg.recovery.adjacent_fallback,
            checkpoint_step=ckpt_step,
            has_checkpoint=lambda s: self.ckpt is not None and self.ckpt.latest_for_stage(s) is not None,
            replicas_on=self.replicas_on,
            spares_for_first_epoch=time.time() - self.started > self.cfg.swarm.first_epoch_grace_s,
        )
        if decision.roster is None:
            if decision.reason != self._last_reason:
                self._last_reason = decision.reason
                self.emit("leader_waiting", reason=decision.reason)
            if decision.fatal:
                self._stop_swarm(current, decision.reason)
            if decision.needs_peers:
                waiting_since = waiting_since or time.time()
                if time.time() - waiting_since > cfg.swarm.spare_wait_s:
                    self._stop_swarm(current, f"{decision.reason} for more than swarm.spare_wait_s="
                                              f"{cfg.swarm.spare_wait_s} s")
            return waiting_since
        epoch = 0 if current is None else current.epoch + 1
        host = cfg.membership.host
        store = dist.TCPStore(host, 0, cfg.model.num_stages, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=cfg.transport.rendezvous_timeout_s))
        self.hosted[epoch] = store
        for old in [e for e in self.hosted if e < epoch - 1]:
            del self.hosted[old]
        rec = EpochRecord(
            run_id=self.run_id, fingerprint=self.fingerprint, epoch=epoch, roster=decision.roster,
            store_host=cfg.membership.announce_host or host, store_port=store.port, step=decision.step,
            leader=self.peer_id, lost=list(decision.lost), plans=list(decision.plans),
            rollback_to=decision.rollback_to, time=time.time(),
        )
        self.membership.publish_epoch(rec)
        self._last_reason = ""
        self.emit("epoch_published", new_epoch=epoch, roster=rec.roster, step=rec.step, lost=rec.lost,
                  plans=[p.model_dump() for p in rec.plans], rollback_to=rec.rollback_to, reason=decision.reason)
        return None

    def _stop_swarm(self, current: EpochRecord | None, reason: str) -> None:
        """Publish a stop record, so that every peer exits saying why, and stop this one."""
        self.membership.publish_epoch(EpochRecord(
            run_id=self.run_id, fingerprint=self.fingerprint, epoch=(current.epoch + 1) if current else 0,
            roster=[], store_host="", store_port=0, step=self.step, leader=self.peer_id, stop=reason,
            time=time.time()))
        raise SwarmStopped(reason)

    # ---- joining an epoch ----------------------------------------------------------------------
    def _join(self, rec: EpochRecord) -> None:
        cfg, L = self.cfg, self.cfg.model.num_stages
        t0 = time.time()
        stage = rec.roster.index(self.peer_id)
        self.epoch, self.state, self._last_reason = rec.epoch, "joining", ""
        fresh = self.worker is None or self.worker.index != stage
        if fresh and rec.epoch > 0 and stage not in rec.lost:
            raise SwarmStopped(f"epoch {rec.epoch} gives this new peer stage {stage}, which is not being rebuilt")
        if self.worker is None or self.worker.index != stage:
            # a rollback restores a saved (or the initial) state: only a per-stage rebuild starts anew
            self.worker = self._new_worker(stage, rebuilt=rec.epoch > 0 and rec.rollback_to is None)
        store = self.hosted.get(rec.epoch)
        try:
            if store is None:
                store = dist.TCPStore(rec.store_host, rec.store_port, L, is_master=False,
                                      timeout=timedelta(seconds=cfg.transport.rendezvous_timeout_s))
            self.group = EpochGroup(store, rec.epoch, stage, list(range(L)), cfg.transport,
                                    run_tag=int(self.fingerprint[:6], 16), device=self.device)
        except (RuntimeError, TimeoutError) as e:
            raise StageLostError(None, rec.step, f"rendezvous of epoch {rec.epoch} failed: {e}") from e
        self._settle_step(rec, fresh)
        if rec.plans:
            self._transfer(rec, fresh)
        if self.worker.redundant and rec.epoch > 0:
            self._refresh_shadows(rec)
        if self.replicas_on:
            self._exchange_replicas(rec.step)
        self.group.all_reduce(torch.zeros(1, dtype=torch.float64), rec.step)  # everyone is ready
        self.step, self.state = rec.step, "running"
        self.emit("epoch_joined", joined_epoch=rec.epoch, stage=stage, step=rec.step, join_s=time.time() - t0,
                  rebuilt=fresh and rec.epoch > 0)
        self._resume_pending = rec.epoch > 0

    def _new_worker(self, stage: int, rebuilt: bool) -> StageWorker:
        cfg = self.cfg
        module = Stage(cfg.model, stage)
        init_stage_(module, cfg.model, cfg.seed, salt=0 if not rebuilt else 1 + secrets.randbelow(1 << 30))
        lr = cfg.optim.lr * (cfg.recovery.lr_factor if rebuilt else 1.0)
        redundant = cfg.recovery.strategy == "redundant"
        worker = StageWorker(module, self.schedule, self.batches, cfg.optim, lr, cfg.model.d_model,
                             cfg.recovery.norm_ema_beta, cfg.device, redundant=redundant)
        if redundant:
            # the next stage's initial state is a pure function of the seed, so the first shadow needs no
            # transfer; a replacement peer's shadow is sent to it when it joins (_refresh_shadows)
            shadow = Stage(cfg.model, shadow_of(stage, cfg.model.num_stages))
            init_stage_(shadow, cfg.model, cfg.seed, salt=0)
            worker.shadow = HeldShadow(shadow.to(self.device), cfg.optim, cfg.optim.lr)
        return worker

    def _settle_step(self, rec: EpochRecord, fresh: bool) -> None:
        w = self.worker
        if rec.rollback_to is not None:
            t0 = time.time()
            if rec.rollback_to == 0:
                # step 0 is the seed's initial state, a pure function of the config: nothing to load (a loss
                # before the first checkpoint, or before any stage saved one, restarts from it); a fresh
                # peer's worker already is that state
                if not fresh:
                    self.worker = w = self._new_worker(w.index, rebuilt=False)
            else:
                try:
                    payload = self.ckpt.load_stage(rec.rollback_to, w.index)
                except RuntimeError as e:
                    self._stop_swarm(rec, f"stage {w.index} cannot roll back to step {rec.rollback_to}: {e}")
                w.stage.load_state_dict(payload["model"])
                w.optimizer.load_state_dict(payload["optim"])
            w.pending_step, self.step = None, rec.rollback_to
            w.discard()
            self.emit("rolled_back", to_step=rec.rollback_to, restore_s=time.time() - t0)
            return
        if fresh:
            self.step = rec.step
            return
        if w.pending_step is not None and w.pending_step == rec.step - 1:
            w.apply_pending()  # another stage committed this step before the all-reduce broke
            self.step = rec.step
            self.emit("pending_applied", applied_step=rec.step - 1)
        elif w.pending_step is not None:
            w.pending_step = None
            w.discard()
        if self.step != rec.step:
            raise SwarmStopped(f"stage {w.index} has committed {self.step} steps but epoch {rec.epoch} resumes at "
                               f"step {rec.step}; the swarm's state is inconsistent")

    def _transfer(self, rec: EpochRecord, fresh: bool) -> None:
        """Recovery over the network: sources send blocks and norms, holders send edge replicas, the new
        peer rebuilds its stage (``rebuild_blocks``, the same function as the single-process engine)."""
        w, rcfg, L = self.worker, self.cfg.recovery, self.cfg.model.num_stages
        me = w.index
        for p in rec.plans:
            plan = RecoveryPlan(p.stage, p.method, tuple(p.sources), p.path, p.edge)
            if plan.method == "shadow":
                self._fail_over(rec, plan, fresh)
                continue
            kind = edge_kind(plan.stage, L)
            holder = replica_holder(kind, L) if kind and plan.edge == "replica" else None
            if me in plan.sources:
                blocks = block_state(w.stage.state_dict())
                norm = torch.tensor([w.recovery_norm(rcfg.norm_source)], dtype=torch.float64)
                self.group.send_state([*blocks.values(), norm], plan.stage, rec.step)
            if me == holder:
                step, replica = w.replica
                self.group.send_state([*replica.values(), torch.tensor([float(step)], dtype=torch.float64)],
                                      plan.stage, rec.step)
            if me == plan.stage and fresh:
                self._rebuild(rec, plan, holder)

    def _rebuild(self, rec: EpochRecord, plan: RecoveryPlan, holder: int | None) -> None:
        t0 = time.time()
        w, rcfg = self.worker, self.cfg.recovery
        like = list(block_state(w.stage.state_dict()).values()) + [torch.zeros(1, dtype=torch.float64)]
        keys = list(block_state(w.stage.state_dict()))
        blocks, norms = {}, {}
        for src in plan.sources:
            *tensors, norm = self.group.recv_state(like, src, rec.step)
            blocks[src], norms[src] = dict(zip(keys, tensors)), norm.item()
        staleness = None
        if holder is not None:
            kind = edge_kind(plan.stage, self.cfg.model.num_stages)
            edge = edge_state(w.stage.state_dict(), kind)
            *tensors, step = self.group.recv_state([*edge.values(), torch.zeros(1, dtype=torch.float64)], holder, rec.step)
            w.stage.load_state_dict(dict(zip(edge, tensors)), strict=False)
            staleness = rec.step - int(step.item())
        if plan.method == "checkpoint":
            ck = self.ckpt.latest_for_stage(plan.stage)
            payload = self.ckpt.load_stage(ck, plan.stage)
            w.stage.load_state_dict(payload["model"])
            staleness = rec.step - ck
        new_blocks, weights = rebuild_blocks(plan, blocks, norms, rcfg.eps)
        if new_blocks is not None:
            w.stage.load_state_dict(new_blocks, strict=False)
        self.emit("rebuilt", stage=plan.stage, step=rec.step, strategy=rcfg.strategy, method=plan.method,
                  path=plan.path, sources=list(plan.sources), weights=list(weights),
                  source_norms=[norms[s] for s in plan.sources], edge=plan.edge, edge_staleness_steps=staleness,
                  lr=w.lr, transfer_and_rebuild_s=time.time() - t0, lost_epoch_time=rec.time)

    def _fail_over(self, rec: EpochRecord, plan: RecoveryPlan, fresh: bool) -> None:
        """Redundant computation: the holder sends its shadow of the lost stage (weights, Adam state,
        learning rate) and the replacement peer continues from it; the holder keeps its shadow, which is
        now again an exact copy of the stage."""
        w = self.worker
        (holder,) = plan.sources
        if w.index == holder:
            self.group.send_state(w.shadow.state_tensors(), plan.stage, rec.step, kind="shadow")
        if w.index == plan.stage and fresh:
            t0 = time.time()
            got = self.group.recv_state(full_state_like(w.stage), holder, rec.step, kind="shadow")
            w.lr = load_full_state(w.stage, w.optimizer, got)
            self.emit("rebuilt", stage=plan.stage, step=rec.step, strategy="redundant", method="shadow",
                      path=plan.path, sources=[holder], weights=[1.0], source_norms=[], edge=plan.edge,
                      edge_staleness_steps=0, lr=w.lr, transfer_and_rebuild_s=time.time() - t0,
                      lost_epoch_time=rec.time)

    def _refresh_shadows(self, rec: EpochRecord) -> None:
        """After a recovery, a stage sends its whole state to its shadow's holder where that shadow was lost
        (the holder is a replacement peer) or is stale (the stage was rebuilt some other way than from its
        shadow, e.g. the adjacent-failure fallback). Every peer walks the stages in the same order."""
        w, L = self.worker, self.cfg.model.num_stages
        methods = {p.stage: p.method for p in rec.plans}
        for s in range(L):
            h = shadow_holder(s, L)
            if not (h in rec.lost or (s in rec.lost and methods.get(s) != "shadow")):
                continue
            if w.index == s:
                self.group.send_state(full_state_tensors(w.stage, w.optimizer, w.lr), h, rec.step, kind="shadow")
            elif w.index == h:
                w.shadow.load(self.group.recv_state(full_state_like(w.shadow.stage), s, rec.step, kind="shadow"))
                self.emit("shadow_refreshed", shadow_of=s, step=rec.step)

    def _exchange_replicas(self, step: int) -> None:
        """Owners of the embedding / head send copies to their holders (stage 1 / stage L-2)."""
        w, L = self.worker, self.cfg.model.num_stages
        for kind, owner in (("embed", 0), ("head", L - 1)):
            holder = replica_holder(kind, L)
            if owner == holder:
                continue
            if w.index == owner:
                self.group.send_state(list(edge_state(w.stage.state_dict(), kind).values()), holder, step)
            elif w.index == holder:
                skeleton = edge_state(Stage(self.cfg.model, owner).state_dict(), kind)
                got = self.group.recv_state(list(skeleton.values()), owner, step)
                w.replica = (step, dict(zip(skeleton, got)))

    # ---- training ------------------------------------------------------------------------------
    def _train(self) -> None:
        cfg, w = self.cfg, self.worker
        tokens = self.batches.tokens_per_microbatch() * cfg.pipeline.num_microbatches
        while self.step < cfg.num_steps:
            t0 = time.time()
            w.run_step(self.group, self.step)
            loss = w.commit(self.group, self.step)
            if loss is None:
                self.emit("step_discarded", step=self.step, reason="non-finite gradient on some stage")
                continue
            step_s = time.time() - t0
            self.loss, self.tokens_per_s = loss, tokens / step_s
            done = self.step
            self.step += 1
            if self._resume_pending:
                self._resume_pending = False
                self.emit("resumed", step=done)
            # every stage logs the committed step (a stage lost right after the commit must not leave a gap)
            record = {"step": done, "loss/train": loss, "throughput/tokens_per_s": self.tokens_per_s,
                      "time/wall": time.time(), "time/step_s": step_s, "epoch": self.epoch, "stage": w.index,
                      "memory/max_rss_mb": peak_rss_mb(),
                      "memory/shadow_bytes": w.shadow.bytes() if w.shadow is not None else 0,
                      **{f"stage/{i}/grad_norm_raw": n for i, n in enumerate(w.all_norms)}}
            self.metrics.write(record)
            if self.replicas_on and self.step % cfg.recovery.edge_replica_every_steps == 0:
                self._exchange_replicas(self.step)
            if self.ckpt and self.step % cfg.checkpoint.every_steps == 0:
                ts = time.time()
                self.ckpt.save_stage(self.step, w.index, {"model": w.stage.state_dict(),
                                                          "optim": w.optimizer.state_dict(), "step": self.step})
                self.emit("checkpoint_save", step=self.step, save_s=time.time() - ts)
            every = cfg.eval_every_steps
            if (every and self.step % every == 0) or self.step == cfg.num_steps:
                val = w.evaluate(self.group, cfg.data.num_val_batches, self.step)
                self.metrics.write({"step": done, "epoch": self.epoch, "stage": w.index, "loss/val": val})

    def _abort(self, e: Exception) -> None:
        w = self.worker
        self.emit("step_aborted", step=self.step, cause=str(e)[:300], suspect=getattr(e, "stage", None),
                  error=type(e).__name__, pending=w is not None and w.pending_step is not None)
        logger.warning("[peer %s stage %s step %d] %s", self.peer_id, w.index if w else None, self.step, e)
        if w is not None and w.pending_step is None:
            w.discard()
        if self.group is not None:
            self.group.close()
            self.group = None
        self.state = "recovering"

    def _finish(self) -> None:
        self.state = "done"
        self.emit("done", step=self.step, loss=self.loss)
        (self.dir / "done").write_text(f"{self.step}\n")  # for a launcher that polls the disk
        try:
            self.membership.heartbeat(self.record())
            # member records expire, the epoch record stays: it tells late spares the run is over (and keeps
            # them from reading the finished stages' departure as every stage being lost)
            current = self.membership.current_epoch()
            if current is not None and current.epoch == self.epoch and not current.finished:
                self.membership.publish_epoch(current.model_copy(update={"finished": True}))
        except DHTUnavailable:
            pass
        # stay reachable briefly so that the other stages' last all-reduce and their reads complete
        time.sleep(self.cfg.membership.period_s * 2)
