"""
Held shadow (swarm)
===================

The ``redundant`` strategy in the swarm: each stage peer keeps one ``HeldShadow``, a copy of the next
stage with its own optimizer, trained on the peer's own outputs and the output gradients that stage
forwards (transport kind ``sgrad``). On a loss the holder sends ``state_tensors()`` to the replacement.
"""

from __future__ import annotations

import torch

from checkfree.core.model import Stage
from checkfree.core.redundancy import full_state_tensors, load_full_state, param_bytes
from checkfree.core.stage_step import OptimConfig, clip_stage_, make_optimizer


class HeldShadow:
    """The one shadow a swarm stage peer keeps: a copy of stage ``index`` with its own optimizer, plus the
    inputs of the current step's microbatches (the holder's own outputs), kept until the shadow runs."""

    def __init__(self, stage: Stage, optim: OptimConfig, lr: float):
        self.stage, self.index, self.optim_cfg, self.lr = stage, stage.index, optim, lr
        self.optimizer = make_optimizer(stage, optim, lr)
        self.inputs: dict[int, torch.Tensor] = {}  # microbatch -> input activation (detached)

    def state_tensors(self) -> list[torch.Tensor]:
        return full_state_tensors(self.stage, self.optimizer, self.lr)

    def load(self, tensors: list[torch.Tensor]) -> None:
        self.lr = load_full_state(self.stage, self.optimizer, tensors)

    def step(self) -> None:
        clip_stage_(self.stage, self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.stage.zero_grad(set_to_none=True)

    def bytes(self) -> int:
        """Weights plus Adam's two moments."""
        return 3 * param_bytes(self.stage)
