"""
Stage worker
============

One stage of the pipeline in its own process (or thread): runs its share of the schedule's ops for a
step, exchanging activations and gradients with other stages over an ``EpochGroup``, then commits the
step with every other stage or not at all.

Commit point: after its ops and sends complete, each stage clips its gradient and joins an all-reduce
of ``[done, loss, norm_0 .. norm_{L-1}]`` (each stage fills its own slots). Only when the sum shows
every stage done does any stage step its optimizer, so a step is applied by all stages or by none; as a
side effect every stage learns all stages' pre-clip gradient norms, which recovery weights need.

Precision (``precision=bf16``): each hop's forward runs under bf16 autocast (``stage_step.forward_hop``) and
activations and their gradients travel in bf16, half the bytes; parameters, Adam, the clipped norms and the
commit's all-reduce stay fp32 (float64 for the reduce). ``bytes_sent`` counts what this stage sent in the
last step's ops (headers included; the commit's all-reduce excluded).

Redundant computation (``redundant=True``): the worker also forwards each output gradient it receives
to the holder of its shadow, and runs the shadow it holds (``HeldShadow``, see ``redundancy.py``)
after its own ops; the shadow steps exactly when the stage does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from checkfree.core.checkpoint import StagePayload
from checkfree.core.data import Batches
from checkfree.core.model import Stage
from checkfree.core.rebuild import RebuiltStage
from checkfree.core.redundancy import shadow_holder
from checkfree.core.schedule import Op, Schedule
from checkfree.core.stage_step import (
    LrWarmup,
    OptimConfig,
    clip_stage_,
    eval_hop,
    forward_hop,
    make_optimizer,
    recovery_norm,
    smooth,
    wire_dtype,
)
from checkfree.swarm.records import Lineage
from checkfree.swarm.shadow import HeldShadow
from checkfree.swarm.transport import EpochGroup


class StageWorker:
    @classmethod
    def for_config(
        cls, cfg, stage: Stage, schedule: Schedule, batches: Batches, redundant: bool = False
    ) -> StageWorker:
        """A worker of ``stage`` with every setting the run's ``TrainConfig`` gives one, in one place: the swarm's
        and the static pipeline's workers cannot drift apart (the static pipeline once ignored precision and
        recovery.norm_scope)."""
        return cls(
            stage,
            schedule,
            batches,
            cfg.optim,
            cfg.optim.lr,
            cfg.model.d_model,
            cfg.recovery.norm_ema_beta,
            cfg.device,
            redundant=redundant,
            norm_scope=cfg.recovery.norm_scope,
            precision=cfg.precision,
        )

    def __init__(
        self,
        stage: Stage,
        schedule: Schedule,
        batches: Batches,
        optim: OptimConfig,
        lr: float,
        d_model: int,
        norm_ema_beta: float = 0.9,
        device: str = "cpu",
        redundant: bool = False,
        norm_scope: str = "blocks",
        precision: str = "fp32",
    ):
        self.device = torch.device(device)
        self.precision, self.wire = precision, wire_dtype(precision)  # wire: the dtype activations travel in
        self.bytes_sent = 0  # sent by this stage in the last step's ops
        self.stage = stage.to(self.device)
        self.index = stage.index
        self.schedule, self.batches, self.optim_cfg = schedule, batches, optim
        self.lr, self.norm_ema_beta, self.norm_scope = lr, norm_ema_beta, norm_scope
        self.optimizer = make_optimizer(self.stage, optim, lr)
        self.warmup = LrWarmup()  # lr ramp of a rebuilt stage (recovery.warmup_steps)
        self.act_shape = (batches.cfg.microbatch_size, batches.seq_len, d_model)  # (B, T, C)
        self.grad_norm_raw = 0.0  # over the norm scope: pre-clip, its EMA and post-clip (as the engine's)
        self.grad_norm_smoothed: float | None = None
        self.grad_norm_post: float | None = None
        self.all_norms: list[float] = [0.0] * schedule.num_stages  # every stage's, from the last commit
        self.pending_step: int | None = None  # a step whose ops completed but whose commit is undecided
        self.pending_norm = 0.0
        self.pending_post = 0.0
        self.nonfinite_stages: list[int] = []  # stages whose gradient was not finite in the last discarded step
        self.loss = 0.0
        self.replica: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, copy of a neighbour's edge)
        self.lineage = Lineage(kind="initial")  # where these weights come from (the hand-over sets it)
        self.redundant = redundant
        self.shadow: HeldShadow | None = None  # redundant: the copy of the next stage this worker trains
        self.shadow_ok = True  # the shadow is up to date (a new peer's is stale until it is sent)
        if redundant and any(
            op.dst not in (None, op.stage + 1) for ops in schedule.ops for op in ops if op.kind == "F"
        ):
            raise ValueError(
                "redundant computation in the swarm needs the plain route (pipeline.swap=false): a "
                "shadow's input is its holder's own output"
            )

    def run_step(self, group: EpochGroup, step: int, fail: tuple[int, Callable[[], None]] | None = None) -> None:
        """This stage's ops of ``step``; gradients accumulate in the stage's parameters. ``fail``: (op index,
        callback): an injected failure, called before that op of this stage (it does not return).

        Raises:
            StageLostError, PeerProtocolError: from the transport; the caller discards the step.
        """
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.loss = 0.0
        sent_before = group.bytes_sent
        for i, op in enumerate(self.schedule.ops[self.index]):
            if fail is not None and i == fail[0]:
                fail[1]()
            if op.kind == "F":
                self._forward(group, op, step, inputs, outputs)
            else:
                self._backward(group, op, step, inputs, outputs)
        if self.shadow is not None:
            self._run_shadow(group, step)
        group.wait_sends()
        self.bytes_sent = group.bytes_sent - sent_before
        self.pending_step = step

    def _forward(self, group: EpochGroup, op: Op, step: int, inputs: dict, outputs: dict) -> None:
        if op.src is None:
            x = self.batches.inputs(step, op.mb).to(self.device)  # (B, T) token ids
        else:
            x = group.recv(op.src, step, op.mb, op.hop, "act", self.act_shape, self.wire).requires_grad_()
            inputs[(op.mb, op.hop)] = x
        out = forward_hop(self.stage, self.schedule, op, x, step, self.batches, self.device, self.precision)
        if op.dst is None:
            self.loss += out.item()
        else:
            group.send(out, op.dst, step, op.mb, op.hop + 1, "act")
            if self.shadow is not None:
                self.shadow.inputs[op.mb] = out.detach()
        outputs[(op.mb, op.hop)] = out

    def _backward(self, group: EpochGroup, op: Op, step: int, inputs: dict, outputs: dict) -> None:
        out = outputs.pop((op.mb, op.hop))
        if op.src is None:
            out.backward()  # the loss
        else:
            grad = group.recv(op.src, step, op.mb, op.hop, "grad", self.act_shape, self.wire)
            out.backward(grad)
            if self.redundant:  # the shadow of this stage trains on the very same gradient
                group.send(grad, shadow_holder(self.index, self.schedule.num_stages), step, op.mb, op.hop, "sgrad")
        if op.dst is not None:
            group.send(inputs.pop((op.mb, op.hop)).grad, op.dst, step, op.mb, op.hop - 1, "grad")

    def _run_shadow(self, group: EpochGroup, step: int) -> None:
        """Forward and backward of the held shadow on every microbatch of ``step``, in the shadowed stage's
        order: inputs are this stage's outputs (token ids for the first stage's shadow), output gradients
        are the ones the shadowed stage received (its loss for the last stage's shadow)."""
        sh = self.shadow
        for op in self.schedule.ops[sh.index]:
            if op.kind != "F":
                continue
            x = self.batches.inputs(step, op.mb).to(self.device) if op.src is None else sh.inputs.pop(op.mb)
            out = forward_hop(sh.stage, self.schedule, op, x, step, self.batches, self.device, self.precision)
            if op.dst is None:
                out.backward()
            else:
                out.backward(group.recv(sh.index, step, op.mb, op.hop, "sgrad", self.act_shape, self.wire))

    def commit(self, group: EpochGroup, step: int) -> float | None:
        """Agree with every stage on ``step`` and apply it; returns the step's loss, or None when some
        stage could not finish (nothing applied).

        Raises:
            StageLostError: the commit all-reduce failed; the step stays pending (``pending_step``).
        """
        L = self.schedule.num_stages
        norms = clip_stage_(self.stage, self.optim_cfg.grad_clip, self.norm_scope)
        norm = norms.total if not math.isfinite(norms.total) else norms.scoped
        vec = torch.zeros(2 + 2 * L, dtype=torch.float64, device=self.device)  # done, loss, norms, non-finite
        vec[0] = 1.0 if math.isfinite(norm) else 0.0
        vec[1] = self.loss
        vec[2 + self.index] = norm if math.isfinite(norm) else 0.0
        vec[2 + L + self.index] = 0.0 if math.isfinite(norm) else 1.0
        self.pending_norm, self.pending_post = norm, norms.post_clip
        vec = group.all_reduce(vec, step).tolist()
        if round(vec[0]) != L:
            self.nonfinite_stages = [s for s in range(L) if vec[2 + L + s] > 0.5]
            self.pending_step = None
            self.discard()
            return None
        self.all_norms = vec[2 : 2 + L]
        self.apply_pending()
        return vec[1]

    def apply_pending(self) -> None:
        """Step the optimizer with the gradients of ``pending_step`` (clipped already): at the commit
        point, or in the next epoch when the commit all-reduce broke after another stage completed it."""
        assert self.pending_step is not None, "no pending step to apply"
        self.grad_norm_raw, self.grad_norm_post = self.pending_norm, self.pending_post
        self.grad_norm_smoothed = smooth(self.grad_norm_smoothed, self.pending_norm, self.norm_ema_beta)
        self.warmup.before_step(self.optimizer, self.lr)
        self.optimizer.step()
        if self.shadow is not None:
            self.shadow.step()
        self.pending_step = None
        self.discard()

    def payload(self, step: int) -> StagePayload:
        """This stage's whole training state after ``step`` committed steps (a checkpoint, a hand-over)."""
        return StagePayload(
            stage=self.index,
            step=step,
            model=self.stage.state_dict(),
            optim=self.optimizer.state_dict(),
            lr=self.lr,
            grad_norm_raw=self.grad_norm_raw,
            grad_norm_smoothed=self.grad_norm_smoothed,
            grad_norm_post=self.grad_norm_post,
            warmup_steps=self.warmup.warmup_steps,
            warmup_done=self.warmup.done,
        )

    def recovery_norm(self, source: str) -> float:
        return recovery_norm(self.grad_norm_raw, self.grad_norm_smoothed, source, self.grad_norm_post)

    def install(self, rebuilt: RebuiltStage) -> None:
        """Take a rebuilt or restored stage (``checkfree.core.rebuild``): weights, optimizer, lr, norms."""
        assert rebuilt.stage.index == self.index, f"stage {rebuilt.stage.index} installed on worker {self.index}"
        self.stage = rebuilt.stage.to(self.device)
        self.optimizer, self.lr = rebuilt.optimizer, rebuilt.lr
        self.warmup = LrWarmup(rebuilt.warmup_steps, rebuilt.warmup_done)
        self.grad_norm_raw, self.grad_norm_smoothed = rebuilt.grad_norm_raw, rebuilt.grad_norm_smoothed
        self.grad_norm_post = rebuilt.grad_norm_post
        self.pending_step = None

    @torch.no_grad()
    def evaluate(self, group: EpochGroup, num_batches: int, step: int) -> float:
        """Validation loss of the whole pipeline on the plain route; every stage returns it."""
        L, total = self.schedule.num_stages, 0.0
        for b in range(num_batches):
            if self.index == 0:
                x = self.batches.inputs(b, 0, split="val").to(self.device)  # (B, T) token ids
            else:
                x = group.recv(self.index - 1, step, b, self.index, "act", self.act_shape, self.wire)
            targets = self.batches.targets(b, 0, split="val").to(self.device) if self.index == L - 1 else None
            h = eval_hop(self.stage, x, self.device, self.precision, targets)  # the activation on, or the loss
            if targets is None:
                group.send(h, self.index + 1, step, b, self.index + 1, "act")
            else:
                total += h.item()
        group.wait_sends()
        vec = torch.tensor([total / num_batches], dtype=torch.float64, device=self.device)
        return group.all_reduce(vec, step).item()

    def discard(self) -> None:
        self.stage.zero_grad(set_to_none=True)
        if self.shadow is not None:
            self.shadow.clear()
