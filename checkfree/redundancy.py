"""
Redundant computation
=====================

The ``redundant`` strategy (Bamboo-style): stage ``t``'s machine is shadowed by its predecessor's, which
keeps a full copy of stage ``t`` (with its own optimizer) and trains it redundantly: the same forward on
the same input and the same backward with the gradient stage ``t`` receives. The copy stays identical to
the real stage, so a lost stage fails over to its shadow with no rollback and no loss of quality, at the
price of doing every stage's work twice and holding twice the weights and optimizer state.

The holder of stage ``t``'s shadow is stage ``(t - 1) % L`` (the last stage shadows the first).

In the single-process engine ``Shadows`` holds every shadow. In the swarm each stage peer holds one
(``HeldShadow``): the input of its shadow is its own output (the first stage's shadow, on the last
stage, reads the token ids), and stage ``t`` forwards the output gradient it receives to its holder
(transport kind ``sgrad``), so the shadow's backward uses exactly the gradient stage ``t`` uses; the
holder runs the shadow's forward and backward after its own ops and steps it only when the step
commits. On a loss the holder sends the shadow's weights, Adam moments, step count and learning rate
(``full_state_tensors``) to the replacement peer, which continues from them bit for bit.
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


def shadow_of(holder: int, num_stages: int) -> int:
    """The stage whose shadow ``holder`` keeps."""
    return (holder + 1) % num_stages


def full_state_like(stage: Stage) -> list[torch.Tensor]:
    """Empty tensors shaped like what ``full_state_tensors`` sends for a stage of this structure."""
    params = list(stage.parameters())
    return [*(torch.empty_like(v) for v in stage.state_dict().values()),
            *(torch.empty_like(p) for p in params for _ in range(2)),
            torch.empty(2 + len(params), dtype=torch.float64)]


def full_state_tensors(stage: Stage, optimizer: torch.optim.Optimizer, lr: float) -> list[torch.Tensor]:
    """A stage's whole training state as a flat list of tensors in a fixed order: the state dict's values,
    Adam's two moments per parameter, then ``[lr, has_optimizer_state, step_0 .. step_{P-1}]``."""
    params = list(stage.parameters())
    has = bool(params) and all(p in optimizer.state and "exp_avg" in optimizer.state[p] for p in params)
    moments = []
    for p in params:
        st = optimizer.state[p] if has else None
        moments += [st["exp_avg"], st["exp_avg_sq"]] if has else [torch.zeros_like(p), torch.zeros_like(p)]
    steps = [float(optimizer.state[p]["step"]) if has else 0.0 for p in params]
    meta = torch.tensor([lr, 1.0 if has else 0.0, *steps], dtype=torch.float64)
    return [*stage.state_dict().values(), *moments, meta]


def load_full_state(stage: Stage, optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> float:
    """Install what ``full_state_tensors`` produced into a stage of the same structure and its Adam;
    returns the learning rate it carried."""
    keys = list(stage.state_dict())
    params = list(stage.parameters())
    expected = len(keys) + 2 * len(params) + 1
    if len(tensors) != expected:
        raise ValueError(f"full stage state has {len(tensors)} tensors; expected {expected} for stage {stage.index}")
    stage.load_state_dict(dict(zip(keys, tensors[: len(keys)])))
    moments, meta = tensors[len(keys) : -1], tensors[-1].tolist()
    lr, has, steps = meta[0], meta[1] > 0.5, meta[2:]
    osd = optimizer.state_dict()
    for group in osd["param_groups"]:
        group["lr"] = lr
    osd["state"] = {} if not has else {
        i: {"step": torch.tensor(steps[i], dtype=torch.float32), "exp_avg": moments[2 * i].clone(),
            "exp_avg_sq": moments[2 * i + 1].clone()} for i in range(len(params))}
    optimizer.load_state_dict(osd)
    return lr


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
