"""
Stage step helpers
==================

What one stage does around a step, written once for both executors: its Adam optimizer
(``make_optimizer``, which can also restore a saved state and learning rate), per-stage clipping that
returns the norms a stage tracks (``clip_stage_``), the smoothing of a norm (``smooth``), the forward
of one schedule hop (``forward_hop``) and of one stage's part of validation (``eval_hop``).

Precision (``precision``): ``fp32``, or ``bf16``: a hop's forward runs under bf16 autocast while parameters,
their gradients and Adam stay fp32; what crosses to the next stage (an activation, and so its gradient on the
way back) is cast to bf16, the *wire dtype*, and the receiving stage turns it back into fp32 as it takes it,
so each stage's residual stream is fp32 as in an unsplit autocast model (only the boundaries round). Norms,
the commit and every rebuild see fp32 parameters and gradients only. ``fp32`` enters no autocast context
and casts nothing: its runs are bit-identical to those before precision existed.

The norm that weights a neighbour in a CheckFree rebuild is taken over the stage's transformer blocks only
(``recovery.norm_scope=blocks``, the default): the rule compares the blocks being averaged, and stage 0's
embedding or stage L-1's head would otherwise dominate an edge neighbour's weight. ``norm_scope=stage``
takes the whole stage's gradient, as the reference code does. Clipping always uses the whole stage's norm.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from checkfree.core.data import Batches
from checkfree.core.model import BLOCK_PREFIX, Stage
from checkfree.core.schedule import Op, Schedule


@dataclass
class OptimConfig:
    lr: float = 6e-4  # Adam learning rate, constant (paper: no decay)
    beta1: float = 0.9  # Adam first-moment decay
    beta2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # L2 penalty added to the gradient (torch.optim.Adam's weight_decay); 0: none
    grad_clip: float = 1.0  # per-stage clip of the gradient's L2 norm; 0: no clipping
    nonfinite_attempts: int = 3  # runs of one step that may all give non-finite gradients before the run stops
    skip_nonfinite_steps: bool = False  # skip such a step (recorded: step_skipped) instead of stopping

    def __post_init__(self) -> None:
        if self.nonfinite_attempts < 1:
            raise ValueError(f"optim.nonfinite_attempts={self.nonfinite_attempts} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip} must be >= 0")


def make_optimizer(stage: Stage, cfg: OptimConfig, lr: float, state: dict | None = None) -> torch.optim.Optimizer:
    """The stage's Adam at ``lr``; with ``state`` (an optimizer ``state_dict``), its moments and step
    counts are restored and the learning rate is still ``lr``."""
    optimizer = torch.optim.Adam(
        stage.parameters(),
        lr=lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )
    if state is not None:
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            group["lr"] = lr
    return optimizer


NORM_SCOPES = ("blocks", "stage")


@dataclass(frozen=True)
class StepNorms:
    """The gradient norms of one stage's step (L2, not squared)."""

    total: float  # pre-clip norm of the whole stage: what clipping and the non-finite check use
    scoped: float  # pre-clip norm over the parameters of ``norm_scope`` (what ``norm_source=raw`` weights by)
    post_clip: float  # ``scoped`` after clipping: the reference code's weight (``norm_source=post_clip``)


def scoped_params(stage: Stage, scope: str) -> list[torch.nn.Parameter]:
    """The parameters whose gradient norm a stage contributes as a rebuild source."""
    if scope not in NORM_SCOPES:
        raise ValueError(f"recovery.norm_scope={scope!r} is not one of {', '.join(NORM_SCOPES)}")
    if scope == "stage":
        return list(stage.parameters())
    return [p for name, p in stage.named_parameters() if name.startswith(BLOCK_PREFIX)]


def clip_stage_(stage: Stage, max_norm: float, scope: str = "blocks") -> StepNorms:
    """Clip the stage's gradient in place by its whole norm (0: no clipping); returns its norms."""
    grads = [p.grad for p in scoped_params(stage, scope) if p.grad is not None]
    # the L2 norm of the per-tensor norms, as clipping computes its total (get_total_norm needs torch >= 2.6)
    scoped = (
        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
    )
    total = float(torch.nn.utils.clip_grad_norm_(stage.parameters(), max_norm or math.inf, foreach=True))
    if scope == "stage":
        scoped = total  # the same norm; taken from clipping so that both are bit-equal
    # torch scales the gradient by max_norm / (total + 1e-6) when that is below 1
    coef = min(1.0, max_norm / (total + 1e-6)) if max_norm and math.isfinite(total) else 1.0
    return StepNorms(total, scoped, scoped * coef)


def warmup_lr(lr: float, steps_done: int, warmup_steps: int) -> float:
    """The learning rate of a rebuilt stage at its ``steps_done``-th optimizer step since the rebuild: a linear
    ramp from ``lr / warmup_steps`` up to ``lr`` (``recovery.warmup_steps``; 0: ``lr`` from the start)."""
    if warmup_steps <= 0 or steps_done >= warmup_steps:
        return lr
    return lr * (steps_done + 1) / warmup_steps


class LrWarmup:
    """Applies ``warmup_lr`` to a stage's optimizer before each of its steps after a rebuild."""

    def __init__(self, warmup_steps: int = 0, done: int = 0):
        """``done``: steps of the ramp already taken (a stage restored mid-ramp goes on where it was)."""
        self.warmup_steps, self.done = warmup_steps, done

    def before_step(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        if self.warmup_steps <= 0 or self.done > self.warmup_steps:
            return
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(lr, self.done, self.warmup_steps)
        self.done += 1


def smooth(prev: float | None, value: float, beta: float) -> float:
    """Exponential moving average, seeded by the first value."""
    return value if prev is None else beta * prev + (1 - beta) * value


def recovery_norm(raw: float, smoothed: float | None, source: str, post_clip: float | None = None) -> float:
    """The norm a stage contributes as a recovery source: its last pre-clip norm (``raw``), its smoothed
    one (``smoothed``, falling back to raw before the first smoothed value exists) or its last post-clip
    one (``post_clip``, the reference code's; falling back to raw when none was measured)."""
    if source == "smoothed" and smoothed is not None:
        return smoothed
    if source == "post_clip" and post_clip is not None:
        return post_clip
    return raw


WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # precision -> dtype of what crosses stages


def wire_dtype(precision: str) -> torch.dtype:
    """The dtype in which activations and their gradients cross between stages at ``precision``."""
    try:
        return WIRE_DTYPES[precision]
    except KeyError:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(WIRE_DTYPES)}") from None


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The context a hop's forward runs in: bf16 autocast on ``device``'s type, or for fp32 none at all (not
    even a disabled autocast, so fp32 runs stay bit-identical)."""
    if wire_dtype(precision) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def from_wire(x: torch.Tensor) -> torch.Tensor:
    """A received activation as the stage computes with it: fp32 (token ids and fp32 tensors as they are).
    Inside autograd, so the gradient sent back has the wire dtype."""
    return x.float() if x.is_floating_point() else x


def forward_hop(
    stage: Stage,
    schedule: Schedule,
    op: Op,
    x: torch.Tensor,
    step: int,
    batches: Batches,
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """Run the parts of ``stage`` that hop ``op.hop`` of microbatch ``op.mb`` uses, under ``precision``'s
    autocast; return the activation for the next hop in the wire dtype or, at the last hop, the microbatch's
    loss (fp32) divided by the number of microbatches (gradient accumulation)."""
    hop = schedule.routes[op.mb][op.hop]
    with autocast(device, precision):
        h = from_wire(x)
        if hop.embed:
            h = stage.run_embed(h)  # (B, T) -> (B, T, C)
        if hop.blocks:
            h = stage.run_blocks(h)
        if not hop.head:
            return h.to(wire_dtype(precision))  # what crosses to the next stage
        logits = stage.run_head(h)  # (B, T, V)
        targets = batches.targets(step, op.mb).to(device)
        # autocast runs cross_entropy in fp32 (its fp32 list); the loss is fp32 either way
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) / schedule.num_microbatches


@torch.no_grad()
def eval_hop(
    stage: Stage,
    x: torch.Tensor,
    device: torch.device,
    precision: str = "fp32",
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """One stage's part of the validation forward on the plain route: token ids (the first stage) or the
    previous stage's activation in, the activation for the next stage (wire dtype) out; with ``targets``
    (the last stage) the mean cross-entropy instead (fp32)."""
    with autocast(device, precision):
        h = from_wire(x)
        if stage.embed is not None:
            h = stage.run_embed(h)  # (B, T) -> (B, T, C)
        h = stage.run_blocks(h)
        if targets is None:
            return h.to(wire_dtype(precision))
        logits = stage.run_head(h)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class NonFiniteSteps(RuntimeError):
    """A step gave non-finite gradients ``optim.nonfinite_attempts`` times in a row (the run stops)."""


class NonFiniteGuard:
    """Counts the runs of one step that were discarded for non-finite gradients. Every stage of the swarm
    sees the same commit outcome, so every stage reaches the same verdict at the same step."""

    def __init__(self, cfg: OptimConfig):
        self.cfg, self.step, self.attempts = cfg, -1, 0

    def discarded(self, step: int, stages: list[int]) -> bool:
        """Record a discarded run of ``step``; True when the caller must skip it (``skip_nonfinite_steps``).

        Raises:
            NonFiniteSteps: the step failed ``nonfinite_attempts`` times and skipping is not allowed.
        """
        self.attempts = self.attempts + 1 if step == self.step else 1
        self.step = step
        if self.attempts < self.cfg.nonfinite_attempts:
            return False
        if self.cfg.skip_nonfinite_steps:
            self.step, self.attempts = -1, 0
            return True
        raise NonFiniteSteps(
            f"step {step} gave non-finite gradients on stages {stages} in {self.attempts} runs in a row; "
            "lower optim.lr or set optim.skip_nonfinite_steps=true to skip such steps"
        )
