"""
Single-process engine
=====================

Runs a pipeline schedule with every stage in one process. Each stage has its own Adam optimizer, its
own gradient clipping and its own tracked pre-clip gradient norm (raw and smoothed): exactly what a
stage peer holds in the multi-process runtime. Activations and gradients cross hop boundaries as
detached tensors, as they would over the wire (in the wire dtype of ``precision``: bf16 halves them, see
``checkfree.core.stage_step``), and ops run in the schedule's global timeline order.

Devices: each stage has its own (``core.devices.stage_devices``: with ``device=cuda`` stage i on GPU
``i mod N``); an activation moves to the next stage's device at each hop, its gradient back, and
validation hops the same way.

A step is all-or-nothing: ``run_step`` only accumulates gradients; ``commit`` clips and steps every
optimizer; an interrupted step (``StepInterrupted``) is discarded with ``discard`` and redone.
"""

from __future__ import annotations

import math

import torch

from checkfree.core.checkpoint import StagePayload
from checkfree.core.data import Batches
from checkfree.core.devices import cuda_count, stage_devices
from checkfree.core.failures import Failure
from checkfree.core.model import Stage, edge_state
from checkfree.core.rebuild import RebuiltStage
from checkfree.core.recovery import replica_holder
from checkfree.core.schedule import Op, Schedule, failure_op
from checkfree.core.stage_step import (
    LrWarmup,
    OptimConfig,
    clip_stage_,
    eval_hop,
    forward_hop,
    make_optimizer,
    recovery_norm,
    smooth,
)


class StepInterrupted(Exception):
    """A stage was lost while the step was running; its partial gradients must be discarded."""

    def __init__(self, step: int, op_index: int, op: Op | None):
        super().__init__(f"step {step} interrupted before op {op_index} ({op})")
        self.step, self.op_index, self.op = step, op_index, op


def interrupt_index(schedule: Schedule, failure: Failure) -> int:
    """Where in the timeline a failure lands (``schedule.failure_op``): the timeline index of that op, 0
    when it lands before the step's first op."""
    op = failure_op(schedule, failure.stage, failure.phase, failure.at)
    return 0 if op is None else schedule.timeline.index(op)


class PipelineEngine:
    def __init__(
        self,
        stages: list[Stage],
        schedule: Schedule,
        batches: Batches,
        optim: OptimConfig,
        norm_ema_beta: float = 0.9,
        device: str = "cpu",
        norm_scope: str = "blocks",
        precision: str = "fp32",
    ):
        """``device``: cpu, cuda (stage i on GPU ``i mod N``) or cuda:K (every stage there).

        Raises:
            DeviceError: ``device`` names a GPU this host does not have.
        """
        if len(stages) != schedule.num_stages:
            raise ValueError(f"{len(stages)} stages but the schedule has {schedule.num_stages}")
        self.devices = [torch.device(d) for d in stage_devices(device, len(stages), cuda_count())]
        self.precision = precision
        self.nonfinite_stages: list[int] = []  # stages whose gradient was not finite at the last commit
        self.stages = [s.to(d) for s, d in zip(stages, self.devices, strict=True)]
        self.schedule, self.batches, self.optim_cfg = schedule, batches, optim
        self.norm_ema_beta, self.norm_scope = norm_ema_beta, norm_scope
        self.lrs = [optim.lr] * len(stages)
        self.optimizers = [make_optimizer(s, optim, optim.lr) for s in self.stages]
        # over the norm scope's parameters: pre-clip of the last committed step, its EMA, and post-clip
        self.grad_norm_raw = [0.0] * len(stages)
        self.grad_norm_smoothed: list[float | None] = [None] * len(stages)
        self.grad_norm_post: list[float | None] = [None] * len(stages)
        self.warmups = [LrWarmup() for _ in stages]  # lr ramp of a rebuilt stage (recovery.warmup_steps)
        self.replicas: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}  # kind -> (step, state)
        self.shadows = None  # redundant strategy: checkfree.redundancy.Shadows

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    # ---- one step -------------------------------------------------------------------------------
    def run_step(self, step: int, interrupt_at: int | None = None) -> float:
        """Forward and backward of every microbatch of ``step``; returns the mean microbatch loss.

        Raises:
            StepInterrupted: when the timeline reaches ``interrupt_at`` (the caller discards the step).
        """
        inputs: dict[tuple[int, int], torch.Tensor] = {}  # (mb, hop) -> received activation
        outputs: dict[tuple[int, int], torch.Tensor] = {}  # (mb, hop) -> sent activation, or loss
        total = 0.0
        for i, op in enumerate(self.schedule.timeline):
            if i == interrupt_at:
                raise StepInterrupted(step, i, op)
            if op.kind == "F":
                out = self._forward(op, step, inputs, outputs)
                if op.dst is None:
                    total += out.item()
            else:
                self._backward(op, inputs, outputs)
        if interrupt_at is not None and interrupt_at >= len(self.schedule.timeline):
            raise StepInterrupted(step, interrupt_at, None)
        return total

    def _forward(self, op: Op, step: int, inputs: dict, outputs: dict) -> torch.Tensor:
        device = self.devices[op.stage]
        if op.src is None:
            x = self.batches.inputs(step, op.mb).to(device)  # (B, T) token ids
        else:
            # the activation "received", in the wire dtype: moved to this stage's device
            x = outputs[(op.mb, op.hop - 1)].detach().to(device).requires_grad_()
            inputs[(op.mb, op.hop)] = x
        out = forward_hop(self.stages[op.stage], self.schedule, op, x, step, self.batches, device, self.precision)
        outputs[(op.mb, op.hop)] = out
        if self.shadows is not None:
            self.shadows.forward(op, x, step)
        return out

    def _backward(self, op: Op, inputs: dict, outputs: dict) -> None:
        out = outputs.pop((op.mb, op.hop))
        grad = None
        if op.src is not None:  # "received" from the next hop, back on this stage's device
            grad = inputs.pop((op.mb, op.hop + 1)).grad.to(out.device)
        out.backward(grad)  # None: ``out`` is the loss
        if self.shadows is not None:
            self.shadows.backward(op, grad)

    def discard(self) -> None:
        for stage in self.stages:
            stage.zero_grad(set_to_none=True)
        if self.shadows is not None:
            self.shadows.discard()

    def commit(self) -> bool:
        """Clip each stage's gradient, record its norms, step every optimizer.

        Returns False (and applies nothing) when any stage's gradient is not finite.
        """
        norms = [clip_stage_(s, self.optim_cfg.grad_clip, self.norm_scope) for s in self.stages]
        self.nonfinite_stages = [i for i, n in enumerate(norms) if not math.isfinite(n.total)]
        if self.nonfinite_stages:
            self.discard()
            return False
        for i, n in enumerate(norms):
            self.grad_norm_raw[i], self.grad_norm_post[i] = n.scoped, n.post_clip
            self.grad_norm_smoothed[i] = smooth(self.grad_norm_smoothed[i], n.scoped, self.norm_ema_beta)
        for i, opt in enumerate(self.optimizers):
            self.warmups[i].before_step(opt, self.lrs[i])
            opt.step()
        if self.shadows is not None:
            self.shadows.commit()
        self.discard()
        return True

    @torch.no_grad()
    def evaluate(self, num_batches: int) -> float:
        """Mean validation loss over the fixed validation batches, on the plain route."""
        losses = []
        last = self.num_stages - 1
        for b in range(num_batches):
            h = self.batches.inputs(b, 0, split="val")  # (B, T) token ids
            for i, (stage, device) in enumerate(zip(self.stages, self.devices, strict=True)):
                targets = self.batches.targets(b, 0, split="val").to(device) if i == last else None
                h = eval_hop(stage, h.to(device), device, self.precision, targets)
            losses.append(h.item())
        return sum(losses) / len(losses)

    # ---- losing and replacing stages -----------------------------------------------------------
    def destroy(self, stage: int) -> None:
        """Model the loss of a stage's machine: weights poisoned with NaN, optimizer and replicas gone.
        Anything that reads them afterwards produces NaN, which the tests would catch."""
        with torch.no_grad():
            for p in self.stages[stage].parameters():
                p.fill_(math.nan)
                p.grad = None
        self.optimizers[stage] = None
        for kind in [k for k in self.replicas if replica_holder(k, self.num_stages) == stage]:
            del self.replicas[kind]
        if self.shadows is not None:
            self.shadows.lose_holder(stage)

    def install(self, index: int, rebuilt: RebuiltStage) -> None:
        """Put a rebuilt (or restored) stage in place: weights, optimizer, lr and the norm it starts with."""
        device = self.devices[index]
        self.stages[index] = rebuilt.stage.to(device)  # the same parameters, moved: the optimizer still holds them
        for state in rebuilt.optimizer.state.values():  # a restored Adam state is where the rebuild made it
            for k, v in state.items():
                if k != "step" and torch.is_tensor(v):  # Adam keeps its step count on the CPU
                    state[k] = v.to(device)
        self.optimizers[index] = rebuilt.optimizer
        self.lrs[index] = rebuilt.lr
        self.warmups[index] = LrWarmup(rebuilt.warmup_steps, rebuilt.warmup_done)
        self.grad_norm_raw[index] = rebuilt.grad_norm_raw
        self.grad_norm_smoothed[index] = rebuilt.grad_norm_smoothed
        self.grad_norm_post[index] = rebuilt.grad_norm_post

    def recovery_norm(self, stage: int, source: str) -> float:
        return recovery_norm(
            self.grad_norm_raw[stage], self.grad_norm_smoothed[stage], source, self.grad_norm_post[stage]
        )

    def block_moments(self, stage: int) -> dict[str, dict]:
        """The Adam state of a stage's block parameters, by name (``recovery.optimizer_init=neighbours``)."""
        opt = self.optimizers[stage]
        return {
            name: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            for name, p in self.stages[stage].named_parameters()
            if name.startswith("blocks.") and p in opt.state
        }

    def refresh_replicas(self, step: int) -> None:
        """Copy the embedding to stage 1 and the final norm + head to stage L-2 (CheckFree+)."""
        for kind, owner in (("embed", 0), ("head", self.num_stages - 1)):
            state = edge_state(self.stages[owner].state_dict(), kind)
            self.replicas[kind] = (step, {k: v.detach().clone() for k, v in state.items()})

    def payload(self, index: int, step: int) -> StagePayload:
        """Everything needed to restore a stage exactly (checkpointing)."""
        return StagePayload(
            stage=index,
            step=step,
            model=self.stages[index].state_dict(),
            optim=self.optimizers[index].state_dict(),
            lr=self.lrs[index],
            grad_norm_raw=self.grad_norm_raw[index],
            grad_norm_smoothed=self.grad_norm_smoothed[index],
            grad_norm_post=self.grad_norm_post[index],
            warmup_steps=self.warmups[index].warmup_steps,
            warmup_done=self.warmups[index].done,
        )
