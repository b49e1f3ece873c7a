"""
Shadows (engine)
================

The ``redundant`` strategy in the single-process engine: ``Shadows`` holds a shadow copy of every stage
(stage ``t``'s held by ``shadow_holder(t)``), runs it on the same inputs and output gradients as the stage
and steps it when the step commits. On a loss, ``full_state`` hands the shadow's whole training state to
the one rebuild path (``checkfree.core.rebuild``), exactly what a swarm holder sends over the network.
A shadow lives on the device of the stage it copies and runs at the engine's precision, so it sees exactly
the inputs and gradients the stage does.
"""

from __future__ import annotations

import copy

import torch

from checkfree.core.data import Batches
from checkfree.core.model import Stage
from checkfree.core.redundancy import full_state_tensors, param_bytes
from checkfree.core.schedule import Op, Schedule
from checkfree.core.stage_step import OptimConfig, clip_stage_, forward_hop, make_optimizer


class Shadows:
    """Shadow copies indexed by the stage they copy (``stages[t]`` is held by ``shadow_holder(t)``)."""

    def __init__(
        self,
        stages: list[Stage],
        optimizers: list,
        lrs: list[float],
        schedule: Schedule,
        batches: Batches,
        optim: OptimConfig,
        devices: list[torch.device],
        precision: str = "fp32",
    ):
        """``devices``: the engine's, one per stage (shadow ``t`` runs on ``devices[t]``)."""
        self.schedule, self.batches, self.optim_cfg = schedule, batches, optim
        self.devices, self.precision = list(devices), precision
        self.stages: list[Stage | None] = [None] * len(stages)
        self.optimizers: list = [None] * len(stages)
        self.lrs = list(lrs)
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        for t in range(len(stages)):
            self.copy_from(t, stages[t], optimizers[t], lrs[t])

    def copy_from(self, t: int, stage: Stage, optimizer, lr: float) -> None:
        """(Re)create the shadow of stage ``t`` as an exact copy of it, optimizer state included."""
        self.stages[t] = copy.deepcopy(stage)
        self.optimizers[t] = make_optimizer(self.stages[t], self.optim_cfg, lr)
        self.optimizers[t].load_state_dict(copy.deepcopy(optimizer.state_dict()))
        self.lrs[t] = lr

    def forward(self, op: Op, x: torch.Tensor, step: int) -> None:
        shadow = self.stages[op.stage]
        if shadow is None:
            return  # its holder is lost; recreated at recovery
        xs = x if not x.is_floating_point() else x.detach().requires_grad_()
        out = forward_hop(shadow, self.schedule, op, xs, step, self.batches, self.devices[op.stage], self.precision)
        self.outputs[(op.mb, op.hop)] = out

    def backward(self, op: Op, grad: torch.Tensor | None) -> None:
        out = self.outputs.pop((op.mb, op.hop), None)
        if out is None:
            return
        out.backward() if grad is None else out.backward(grad)

    def commit(self) -> None:
        for shadow, opt in zip(self.stages, self.optimizers):
            if shadow is not None:
                clip_stage_(shadow, self.optim_cfg.grad_clip)
                opt.step()
        self.discard()

    def discard(self) -> None:
        self.outputs.clear()
        for shadow in self.stages:
            if shadow is not None:
                shadow.zero_grad(set_to_none=True)

    def lose_holder(self, holder: int) -> None:
        """The machine of stage ``holder`` is gone, and the shadow it held with it."""
        t = (holder + 1) % len(self.stages)
        self.stages[t] = self.optimizers[t] = None

    def hand_over(self, t: int) -> list[torch.Tensor]:
        """The shadow of lost stage ``t`` leaves as its whole training state (``full_state_tensors``:
        weights, Adam state, learning rate), to become the real stage; the engine recreates the shadow."""
        assert self.stages[t] is not None, f"no live shadow of stage {t}"
        state = full_state_tensors(self.stages[t], self.optimizers[t], self.lrs[t])
        self.stages[t] = self.optimizers[t] = None
        return state

    def shadow_bytes(self) -> int:
        return sum(param_bytes(s) for s in self.stages if s is not None)
