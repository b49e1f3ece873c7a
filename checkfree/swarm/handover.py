"""
Hand-over
=========

What every member of a new epoch does between forming the epoch's process group and training in it:

1. settle the step: a checkpoint rollback restores every stage (``rolled_back``); otherwise a survivor
   applies a step whose commit broke after another stage applied it, and checks it is at the resume step;
2. transfer: for each lost stage's plan, its sources send their blocks and gradient norms, the holder of
   its embedding / head replica sends that, a redundant shadow's holder sends the shadow's whole state,
   and the new peer assembles its stage with ``checkfree.core.rebuild.rebuild_stage``, the function the
   single-process engine calls too (``rebuilt``);
3. redundant computation: stale or lost shadows are sent anew;
4. edge replicas: the embedding and head are copied to their holders.

Every member walks the plans in the same order, so each send meets its receive. ``Handover`` needs only an
``EpochGroup`` and the epoch record, no DHT: tests run it on thread ranks against the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from checkfree.core.checkpoint import CheckpointStore, StagePayload, max_restored_lr
from checkfree.core.data import Batches
from checkfree.core.model import Stage, block_state, edge_state, initial_edge_state
from checkfree.core.rebuild import RebuildInputs, RebuildSpec, RebuiltStage, initial_stage, rebuild_stage, restore_stage
from checkfree.core.recovery import RecoveryPlan, edge_kind, edge_replicas_on, replica_holder
from checkfree.core.redundancy import full_state_like, full_state_tensors, shadow_holder, shadow_of
from checkfree.core.schedule import Schedule
from checkfree.swarm.coordinator import PeerCannotServe, SwarmStopped
from checkfree.swarm.records import EpochRecord, Lineage, PlanRecord, known_rollbacks
from checkfree.swarm.shadow import HeldShadow
from checkfree.swarm.transport import EpochGroup, StageLostError
from checkfree.swarm.worker import StageWorker

_NORM = torch.zeros(1, dtype=torch.float64)  # shape of a gradient norm or a step number on the wire


def _layouts(spec: RebuildSpec) -> list[dict[str, tuple[torch.Size, torch.dtype]]]:
    """Every stage's state dict shapes and dtypes, found without allocating or initialising weights. The
    first model built on the meta device costs about a second (torch imports its meta kernels then), so a
    peer does this when it starts, not while a recovery waits for it."""
    out = []
    with torch.device("meta"):
        for index in range(spec.model.num_stages):
            out.append({k: (v.shape, v.dtype) for k, v in Stage(spec.model, index).state_dict().items()})
    return out


class Handover:
    def __init__(
        self,
        cfg,
        schedule: Schedule,
        batches: Batches,
        device: torch.device,
        ckpt: CheckpointStore | None,
        emit: Callable[..., object],
        stop_swarm: Callable[[EpochRecord, str], None] | None = None,
        fetch_handoff: Callable[[PlanRecord, int], StagePayload] | None = None,
    ):
        """``stop_swarm(rec, reason)`` publishes a stop record and raises ``SwarmStopped`` (the peer's leader
        role does); without it, a fatal condition raises ``SwarmStopped`` in this peer only.
        ``fetch_handoff(plan, step)``: the exact state a leaving peer serves for a ``handoff`` plan (see
        ``preemption``); it raises ``ConnectionError`` or ``RuntimeError`` when it cannot be had."""
        self.cfg, self.spec = cfg, RebuildSpec.of(cfg)
        self.stop_swarm, self.fetch_handoff = stop_swarm, fetch_handoff
        self.schedule, self.batches, self.device, self.ckpt, self.emit = schedule, batches, device, ckpt, emit
        self.num_stages = cfg.model.num_stages
        self.replicas_on = edge_replicas_on(cfg.recovery)
        self.redundant = cfg.recovery.strategy == "redundant"
        self.layouts = _layouts(self.spec)
        # a restore refuses a saved lr above what this config can produce (and non-finite weights)
        self._max_lr = max_restored_lr(cfg.optim.lr, cfg.recovery.lr_factor)

    def _skeleton(self, index: int) -> dict[str, torch.Tensor]:
        """Stage ``index``'s state dict as empty tensors of the right shapes and dtypes (receive buffers)."""
        return {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in self.layouts[index].items()}

    # ---- workers ---------------------------------------------------------------------------------
    def new_worker(
        self, index: int, rebuilt: RebuiltStage | None = None, lineage: Lineage | None = None
    ) -> StageWorker:
        """A worker for stage ``index``: its initial state, or ``rebuilt`` installed (whose origin is
        ``lineage``)."""
        cfg = self.cfg
        stage, _ = initial_stage(self.spec, index) if rebuilt is None else (rebuilt.stage, None)
        worker = StageWorker.for_config(cfg, stage, self.schedule, self.batches, redundant=self.redundant)
        if rebuilt is not None:
            worker.install(rebuilt)
        worker.lineage = lineage or Lineage(kind="initial")
        if self.replicas_on:
            # a holder starts with the owner's initial embedding / head, a pure function of the seed (what the
            # engine copies at step 0); the exchange at the end of every join and each refresh replaces it
            for kind, owner in (("embed", 0), ("head", self.num_stages - 1)):
                if replica_holder(kind, self.num_stages) == index != owner:
                    worker.replica = (0, initial_edge_state(self.spec.model, self.spec.seed, kind))
        if self.redundant:
            # the next stage's initial state is a pure function of the seed, so the first shadow needs no
            # transfer; a replacement peer's shadow is sent to it when it joins (refresh_shadows), and is
            # stale until then
            shadow, _ = initial_stage(self.spec, shadow_of(index, self.num_stages))
            worker.shadow = HeldShadow(shadow.to(self.device), cfg.optim, cfg.optim.lr)
            worker.shadow_ok = rebuilt is None and worker.lineage.kind == "initial"
        return worker

    # ---- the whole hand-over -----------------------------------------------------------------------
    def run(
        self,
        group: EpochGroup,
        worker: StageWorker | None,
        rec: EpochRecord,
        step: int,
        adopt: Callable[[StageWorker, int], None] | None = None,
    ) -> tuple[StageWorker, int]:
        """Bring this member to ``rec.step`` with the stage the roster gives it.

        Args:
            group: the epoch's process group (rank = stage).
            worker: the stage this peer trained so far, or None for a peer new to the stage.
            rec: the epoch record.
            step: the next step this peer would run (committed steps).
            adopt: called with (worker, step) as soon as this peer's weights change (a pending step applied,
                a rollback, a rebuild), so that its heartbeat and lineage are true even if the hand-over
                breaks off afterwards.

        Returns:
            The worker to train with and the step to resume at.

        Raises:
            PeerCannotServe: this peer holds no valid weights for the stage it is given past step 0.
            SwarmStopped: the epoch cannot be joined consistently (its message says why).
            StageLostError, PeerProtocolError: from the transport; the caller aborts the epoch.
        """
        stage = group.stage
        if self.ckpt is not None:  # which files are of this timeline; the files this peer writes join it
            self.ckpt.rollbacks = known_rollbacks(self.ckpt, rec)
        fresh = worker is None or worker.index != stage
        if fresh and rec.step > 0 and stage not in rec.lost and rec.rollback_to is None:
            # a peer with no trained weights for this stage (its own hand-over broke off) may start from the
            # initial state only before any step was committed
            raise PeerCannotServe(
                f"epoch {rec.epoch} resumes stage {stage} at step {rec.step} on this peer, which "
                "holds no trained weights for it and is not planned to rebuild it"
            )
        adopt = adopt or (lambda worker, step: None)
        if rec.rollback_to is not None:
            worker, step = self._roll_back(worker, stage, rec), rec.rollback_to
            adopt(worker, step)
        elif stage in rec.lost:
            # rebuilt by the transfer below, also on a peer that held the stage with weights not valid for
            # rec.step (its own rebuild broke off, or it fell behind): those weights are dropped
            worker, step = None, rec.step
        elif fresh:
            # any other stage new to this peer is at step 0 (checked above), where the initial state is the
            # valid one, and may be a source of the transfer below
            worker, step = self.new_worker(stage), rec.step
            adopt(worker, step)
        else:
            step = self._settle(worker, rec, step)
            adopt(worker, step)
        handoff = next((p for p in rec.plans if p.method == "handoff" and p.stage == stage), None)
        if handoff is not None and stage in rec.lost:
            worker = self._take_handoff(handoff, rec)  # first: this stage may be a source of the rebuilds below
            adopt(worker, step)
        if rec.plans:
            rebuilt = self._transfer(group, worker, stage, rec, stage in rec.lost and handoff is None)
            if rebuilt is not None:
                plan = next(p for p in rec.plans if p.stage == stage)
                origin = Lineage(
                    kind="rebuilt", step=rec.step, epoch=rec.epoch, method=plan.method, sources=plan.sources
                )
                worker = self.new_worker(stage, rebuilt, origin)
                adopt(worker, step)
        assert worker is not None, f"stage {stage} is lost in epoch {rec.epoch} but no plan rebuilt it"
        if self.redundant and (rec.epoch > 0 or rec.rollback_to is not None):  # a restart's shadows are stale
            self._refresh_shadows(group, worker, rec)
        if self.replicas_on:
            self.exchange_replicas(group, worker, rec.step)
        return worker, step

    def _roll_back(self, worker: StageWorker | None, stage: int, rec: EpochRecord) -> StageWorker:
        """Every stage goes back to the checkpoint of ``rec.rollback_to`` (step 0: the seed's initial state,
        a pure function of the config, which needs no file: a loss before the first checkpoint)."""
        t0 = time.monotonic()
        if rec.rollback_to == 0:
            restored = None
        else:
            try:
                saved = self.ckpt.load_stage(rec.rollback_to, stage, max_lr=self._max_lr)
                restored = restore_stage(self.spec, stage, saved)
            except RuntimeError as e:
                reason = f"stage {stage} cannot roll back to step {rec.rollback_to}: {e}"
                if self.stop_swarm is not None:
                    self.stop_swarm(rec, reason)  # every peer learns it and exits saying why
                raise SwarmStopped(reason) from e
        if self.ckpt is not None:
            # the steps after the rollback are redone: this stage's files of the old timeline go (no write of
            # this peer is in flight: it waited for it before reporting the broken epoch)
            self.ckpt.drop_after(stage, rec.rollback_to, before=rec.epoch)
        origin = Lineage(kind="restored" if restored is not None else "initial", step=rec.rollback_to, epoch=rec.epoch)
        if worker is None or worker.index != stage or restored is None:
            worker = self.new_worker(stage, restored, origin)
        else:
            worker.install(restored)
            worker.lineage = origin
        worker.discard()
        self.emit("rolled_back", to_step=rec.rollback_to, restore_s=time.monotonic() - t0)
        return worker

    def _settle(self, worker: StageWorker, rec: EpochRecord, step: int) -> int:
        if worker.pending_step is not None and worker.pending_step == rec.step - 1:
            worker.apply_pending()  # another stage committed this step before the all-reduce broke
            step = rec.step
            self.emit("pending_applied", applied_step=rec.step - 1)
        elif worker.pending_step is not None:
            worker.pending_step = None
            worker.discard()
        if step != rec.step:
            raise SwarmStopped(
                f"stage {worker.index} has committed {step} steps but epoch {rec.epoch} resumes at "
                f"step {rec.step}; the swarm's state is inconsistent"
            )
        return step

    def _take_handoff(self, p: PlanRecord, rec: EpochRecord) -> StageWorker:
        """Install the exact state the leaving peer ``p.peer`` serves (a preemption notice): the swarm goes on
        as if that peer had never left."""
        t0 = time.monotonic()
        plan = RecoveryPlan(p.stage, p.method, tuple(p.sources), p.path, p.edge)
        try:
            if self.fetch_handoff is None:
                raise ConnectionError("this peer cannot fetch a hand-over")
            payload = self.fetch_handoff(p, rec.step)
            if payload.step != rec.step:
                raise RuntimeError(f"the hand-over holds step {payload.step}, epoch {rec.epoch} resumes at {rec.step}")
            rebuilt = rebuild_stage(self.spec, plan, rec.step, RebuildInputs(checkpoint=payload))
        except (ConnectionError, OSError, RuntimeError) as e:
            # this peer holds no weights then: the next epoch counts the stage as lost and rebuilds it
            raise StageLostError(None, rec.step, f"hand-over of stage {p.stage} from {p.peer} failed: {e}") from e
        fields = rebuilt.event_fields(plan, rec.step, self.cfg.recovery.strategy, duration_s=time.monotonic() - t0)
        self.emit("rebuilt", **fields, lost_epoch_time=rec.time, handed_over_by=p.peer)
        origin = Lineage(kind="rebuilt", step=rec.step, epoch=rec.epoch, method="handoff", sources=[p.stage])
        return self.new_worker(p.stage, rebuilt, origin)

    # ---- transfer of weights -------------------------------------------------------------------------
    def _transfer(
        self, group: EpochGroup, worker: StageWorker | None, me: int, rec: EpochRecord, fresh: bool
    ) -> RebuiltStage | None:
        """Sources and holders send; the new peer of a lost stage receives and rebuilds (returned)."""
        rebuilt = None
        for p in rec.plans:
            plan = RecoveryPlan(p.stage, p.method, tuple(p.sources), p.path, p.edge)
            kind = edge_kind(plan.stage, self.num_stages)
            holder = replica_holder(kind, self.num_stages) if kind and plan.edge == "replica" else None
            if plan.method == "handoff":
                continue  # fetched by the new peer from the leaving one (see _take_handoff)
            if plan.method == "shadow":
                if me in plan.sources:
                    group.send_state(worker.shadow.state_tensors(), plan.stage, rec.step, kind="shadow")
            else:
                if me in plan.sources:
                    norm = torch.tensor([worker.recovery_norm(self.cfg.recovery.norm_source)], dtype=torch.float64)
                    group.send_state([*block_state(worker.stage.state_dict()).values(), norm], plan.stage, rec.step)
                if me == holder:
                    taken_at, replica = worker.replica
                    group.send_state(
                        [*replica.values(), torch.tensor([float(taken_at)], dtype=torch.float64)], plan.stage, rec.step
                    )
            if me == plan.stage and fresh:
                rebuilt = self._receive_and_rebuild(group, rec, plan, holder)
        return rebuilt

    def _receive_and_rebuild(
        self, group: EpochGroup, rec: EpochRecord, plan: RecoveryPlan, holder: int | None
    ) -> RebuiltStage:
        t0 = time.monotonic()
        skeleton = self._skeleton(plan.stage)
        inputs = RebuildInputs()
        if plan.method == "shadow":
            (source,) = plan.sources
            with torch.device("meta"):
                like = full_state_like(Stage(self.spec.model, plan.stage))
            inputs.full_state = group.recv_state(like, source, rec.step, kind="shadow")
        blocks = block_state(skeleton)
        for src in plan.sources if plan.method != "shadow" else ():
            *tensors, norm = group.recv_state([*blocks.values(), _NORM], src, rec.step)
            inputs.blocks[src], inputs.norms[src] = dict(zip(blocks, tensors)), norm.item()
        if holder is not None:
            edge = edge_state(skeleton, edge_kind(plan.stage, self.num_stages))
            *tensors, taken_at = group.recv_state([*edge.values(), _NORM], holder, rec.step)
            inputs.edge = (int(taken_at.item()), dict(zip(edge, tensors)))
        if plan.method == "checkpoint":
            inputs.checkpoint = self.ckpt.load_stage(
                self.ckpt.latest_for_stage(plan.stage, at_most=rec.step), plan.stage, max_lr=self._max_lr
            )
        rebuilt = rebuild_stage(self.spec, plan, rec.step, inputs)
        fields = rebuilt.event_fields(plan, rec.step, self.cfg.recovery.strategy, duration_s=time.monotonic() - t0)
        self.emit("rebuilt", **fields, lost_epoch_time=rec.time)
        return rebuilt

    # ---- shadows and replicas ------------------------------------------------------------------------
    def _refresh_shadows(self, group: EpochGroup, worker: StageWorker, rec: EpochRecord) -> None:
        """After a recovery, a stage sends its whole state to its shadow's holder where that shadow was lost
        (the holder is a replacement peer) or is stale (the stage was rebuilt some other way than from its
        shadow, e.g. the adjacent-failure fallback). Every peer walks the stages in the same order."""
        methods = {p.stage: p.method for p in rec.plans}
        for s in range(self.num_stages):
            h = shadow_holder(s, self.num_stages)
            if not (h in rec.lost or (s in rec.lost and methods.get(s) != "shadow") or s in rec.stale_shadows):
                continue
            if worker.index == s:
                group.send_state(
                    full_state_tensors(worker.stage, worker.optimizer, worker.lr), h, rec.step, kind="shadow"
                )
            elif worker.index == h:
                worker.shadow.load(group.recv_state(full_state_like(worker.shadow.stage), s, rec.step, kind="shadow"))
                worker.shadow_ok = True
                self.emit("shadow_refreshed", shadow_of=s, step=rec.step)

    def exchange_replicas(self, group: EpochGroup, worker: StageWorker, step: int) -> None:
        """Owners of the embedding / head send copies to their holders (stage 1 / stage L-2)."""
        L = self.num_stages
        for kind, owner in (("embed", 0), ("head", L - 1)):
            holder = replica_holder(kind, L)
            if owner == holder:
                continue
            if worker.index == owner:
                group.send_state(list(edge_state(worker.stage.state_dict(), kind).values()), holder, step)
            elif worker.index == holder:
                skeleton = edge_state(self._skeleton(owner), kind)
                got = group.recv_state(list(skeleton.values()), owner, step)
                worker.replica = (step, dict(zip(skeleton, got)))
