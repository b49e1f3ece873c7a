"""
Recovery
========

What the engine does when stages are lost: record the failures, discard the step, and either rebuild the
lost stages from their live neighbours (or a shadow, an edge replica, a checkpoint: ``plan_recovery`` says
which) with the core's ``rebuild_stage``, or roll every stage back to the newest complete checkpoint. Which
of the two is ``rolls_back``, a pure rule; ``Recovery`` carries it out on the engine and writes the events.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from checkfree.core.checkpoint import AsyncSaver, CheckpointStore
from checkfree.core.events import EventLog
from checkfree.core.failures import Failure
from checkfree.core.model import block_state
from checkfree.core.rebuild import RebuildInputs, RebuildSpec, rebuild_stage, restore_stage
from checkfree.core.recovery import (
    RecoveryConfig,
    RecoveryPlan,
    beyond_rebuild,
    edge_kind,
    plan_recovery,
    replica_holder,
)
from checkfree.engine.pipeline import PipelineEngine, StepInterrupted
from checkfree.engine.records import RunState

logger = logging.getLogger(__name__)


def rolls_back(strategy: str, lost: list[int], num_stages: int, partner_rule: str) -> bool:
    """Whether losing ``lost`` rolls every stage back rather than rebuilding: always under ``checkpoint``; under
    ``hybrid``, a loss the rebuild cannot take from live neighbours (two neighbours lost, or all)."""
    if strategy == "checkpoint":
        return True
    return strategy == "hybrid" and beyond_rebuild(lost, num_stages, partner_rule)


def _on(obj, device: torch.device):
    """Tensors in ``obj`` (nested dicts and tuples) on ``device``; Adam's ``step`` counts stay where Adam keeps them."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: v if k == "step" else _on(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_on(v, device) for v in obj)
    return obj


@dataclass
class Recovery:
    """One recovery, given the trainer's parts as they are at the loss (the trainer makes one per loss: scripts
    swap a trainer's engine, state and config between recoveries)."""

    engine: PipelineEngine
    spec: RebuildSpec
    cfg: RecoveryConfig
    events: EventLog
    state: RunState  # ``recoveries`` counted, ``step`` set back by a rollback
    ckpt: CheckpointStore | None  # the periodic checkpoints: a rollback's target, a rebuild's fallback
    saver: AsyncSaver | None  # their background writes: waited for before either reads them
    replicas_on: bool  # edge replicas are kept (CheckFree+)

    def after_failures(self, failures: list[Failure], interrupted: StepInterrupted, lost_at_s: float) -> None:
        """Record ``failures`` (which interrupted the step), discard the step and recover the lost stages.

        Args:
            lost_at_s: training wall-clock at the loss: the loss plot marks it there.
        """
        st = self.state
        lost = sorted({f.stage for f in failures})
        for f in failures:
            st.failures += 1
            self.events.emit(
                "failure",
                stage=f.stage,
                step=st.step,
                iteration=f.iteration,
                phase=f.phase,
                at=f.at,
                op_index=interrupted.op_index,
                train_s=lost_at_s,
            )
            logger.info("stage %d lost at step %d (%s)", f.stage, st.step, f.phase)
        self.engine.discard()
        self.events.emit("step_discarded", step=st.step, iteration=st.iteration - 1, reason="stage lost", stages=lost)
        self.recover(lost)

    def recover(self, lost: list[int]) -> None:
        """Lose ``lost`` stages (weights poisoned, optimizers gone) and recover with the configured strategy."""
        for s in lost:
            self.engine.destroy(s)
        if rolls_back(self.cfg.strategy, lost, self.engine.num_stages, self.cfg.partner_rule):
            self.rollback(lost)
        else:
            self.rebuild(lost)
        self.state.recoveries += len(lost)

    def rebuild(self, lost: list[int]) -> None:
        """Rebuild each lost stage by its plan, from the live stages as they are now."""
        cfg, eng = self.cfg, self.engine
        plans = self._plans(lost)
        sources = {s for p in plans for s in p.sources}
        blocks = {s: block_state(eng.stages[s].state_dict()) for s in sources}  # live stages only
        norms = {s: eng.recovery_norm(s, cfg.norm_source) for s in sources}
        moments = {s: eng.block_moments(s) for s in sources} if cfg.optimizer_init == "neighbours" else {}
        for plan in plans:
            t0 = time.perf_counter()
            # stages may live on different GPUs (device=cuda): the rebuild reads its sources on the lost stage's
            target = eng.devices[plan.stage]
            inputs = self._inputs(
                plan, RebuildInputs(blocks=_on(blocks, target), norms=norms, moments=_on(moments, target))
            )
            rebuilt = rebuild_stage(dataclasses.replace(self.spec, device=str(target)), plan, self.state.step, inputs)
            eng.install(plan.stage, rebuilt)
            duration_s = time.perf_counter() - t0
            self.events.emit("rebuilt", **rebuilt.event_fields(plan, self.state.step, cfg.strategy, duration_s))
            logger.info("stage %d rebuilt: %s from %s (%s)", plan.stage, plan.method, list(plan.sources), plan.path)
        self._renew_copies(lost)

    def _plans(self, lost: list[int]) -> list[RecoveryPlan]:
        cfg, eng, ckpt = self.cfg, self.engine, self.ckpt
        L = eng.num_stages
        live_kinds = {k for k in eng.replicas if replica_holder(k, L) not in lost}

        def has_checkpoint(s: int) -> bool:
            if self.saver is not None:
                self.saver.wait()  # a write in flight is the newest checkpoint
            return ckpt is not None and ckpt.latest_for_stage(s) is not None

        return plan_recovery(
            lost,
            L,
            cfg.strategy,
            cfg.adjacent_fallback,
            has_checkpoint=has_checkpoint,
            edge_replicas=live_kinds,
            partner_rule=cfg.partner_rule,
        )

    def _inputs(self, plan: RecoveryPlan, inputs: RebuildInputs) -> RebuildInputs:
        """``inputs`` (the neighbours' blocks, norms and moments) with what else ``plan`` reads from."""
        eng, ckpt = self.engine, self.ckpt
        target = eng.devices[plan.stage]
        kind = edge_kind(plan.stage, eng.num_stages)
        if kind and plan.edge == "replica":
            inputs.edge = _on(eng.replicas[kind], target)
        if plan.method == "checkpoint":
            inputs.checkpoint = ckpt.load_stage(ckpt.latest_for_stage(plan.stage), plan.stage)
        if plan.method == "shadow":
            inputs.full_state = eng.shadows.hand_over(plan.stage)
        return inputs

    def _renew_copies(self, lost: list[int]) -> None:
        """Edge replicas and shadows that were lost with their holders, or taken over, are made anew."""
        eng = self.engine
        if self.replicas_on and any(replica_holder(k, eng.num_stages) in lost for k in ("embed", "head")):
            eng.refresh_replicas(self.state.step)  # a rebuilt holder fetches fresh copies from the live owners
        if eng.shadows is not None:
            for t, shadow in enumerate(eng.shadows.stages):
                if shadow is None:
                    eng.shadows.copy_from(t, eng.stages[t], eng.optimizers[t], eng.lrs[t])

    def rollback(self, lost: list[int]) -> None:
        """Restore every stage from the newest complete checkpoint and set the run back to its step.

        Raises:
            RuntimeError: the store holds no complete checkpoint.
        """
        st = self.state
        t0 = time.perf_counter()
        if self.saver is not None:
            self.saver.wait()  # a write in flight holds a state from before the loss: the newest to go back to
        target = self.ckpt.latest_complete()
        if target is None:
            raise RuntimeError(f"no complete checkpoint in {self.ckpt.root} to roll back to")
        for i in range(self.engine.num_stages):
            self.engine.install(i, restore_stage(self.spec, i, self.ckpt.load_stage(target, i)))
        self.events.emit(
            "rolled_back",
            step=st.step,
            to_step=target,
            lost_steps=st.step - target,
            stages=lost,
            strategy=self.cfg.strategy,
            restore_s=time.perf_counter() - t0,
        )
        st.step = target
