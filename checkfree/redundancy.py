"""
Redundant computation
=====================

The ``redundant`` strategy (Bamboo-style): stage ``t``'s machine is shadowed by its predecessor's, which
keeps a full copy of stage ``t`` (with its own optimizer) and trains it redundantly: the same forward on
the same input and the same backward with the gradient stage ``t`` receives. The copy stays identical to
the real stage, so a lost stage fails over to its shadow with no rollback and no loss of quality, at the
price of doing every stage's work twice and holding twice the weights and optimizer state.

The holder of stage ``t``'s shadow is stage ``(t - 1) % L`` (the first stage shadows the last). Runs in
the single-process engine; the swarm refuses this strategy.
"""

from __future__ import annotations

import copy

import torch

from checkfree.data import Batches
from checkfree.engine import OptimConfig, clip_stage_, forward_hop, make_optimizer
from checkfree.model import Stage
from checkfree.schedule import Op, Schedule


def shadow_holder(stage: int, num_stages: int) -> int:
    return (stage - 1) % num_stages


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Shadows:
    """Shadow copies indexed by the stage they copy (``stages[t]`` is held by ``shadow_holder(t)``)."""

    def __init__(self, stages: list[Stage], optimizers: list, lrs: list[float], schedule: Schedule,
                 batches: Batches, optim: OptimConfig, device: torch.device):
        self.schedule, self.batches, self.optim_cfg, self.device = schedule, batches, optim, device
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
        self.outputs[(op.mb, op.hop)] = forward_hop(shadow, self.schedule, op, xs, step, self.batches, self.device)

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

    def take_over(self, t: int) -> tuple[Stage, dict, float]:
        """The shadow of lost stage ``t`` becomes the real stage: weights, optimizer state, learning rate."""
        assert self.stages[t] is not None, f"no live shadow of stage {t}"
        stage, opt = self.stages[t], self.optimizers[t]
        self.stages[t] = self.optimizers[t] = None
        return stage, copy.deepcopy(opt.state_dict()), self.lrs[t]

    def shadow_bytes(self) -> int:
        return sum(param_bytes(s) for s in self.stages if s is not None)
