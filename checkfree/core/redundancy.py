"""
Redundant computation
=====================

The ``redundant`` strategy (Bamboo-style): stage ``t``'s machine is shadowed by its predecessor's, which
keeps a full copy of stage ``t`` (with its own optimizer) and trains it redundantly: the same forward on
the same input and the same backward with the gradient stage ``t`` receives. The copy stays identical to
the real stage, so a lost stage fails over to its shadow with no rollback and no loss of quality, at the
price of doing every stage's work twice and holding twice the weights and optimizer state.

The holder of stage ``t``'s shadow is stage ``(t - 1) % L`` (the last stage shadows the first).

This module holds what both executors share: who holds whose shadow, and the flat list of tensors that carries
a stage's whole training state (``full_state_tensors`` / ``load_full_state``), which is what a fail-over
installs in either executor. In the single-process engine ``engine.shadows.Shadows`` holds every shadow. In
the swarm each stage peer holds one (``swarm.shadow.HeldShadow``): the input of its shadow is its own output
(the first stage's shadow, on the last stage, reads the token ids), and stage ``t`` forwards the output
gradient it receives to its holder (transport kind ``sgrad``), so the shadow's backward uses exactly the
gradient stage ``t`` uses; the holder runs the shadow's forward and backward after its own ops and steps it
only when the step commits. On a loss the holder sends the shadow's weights, Adam moments, step count and
learning rate (``full_state_tensors``) to the replacement peer, which continues from them bit for bit.
"""

from __future__ import annotations

import torch

from checkfree.core.model import Stage


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
    return [
        *(torch.empty_like(v) for v in stage.state_dict().values()),
        *(torch.empty_like(p) for p in params for _ in range(2)),
        torch.empty(2 + len(params), dtype=torch.float64),
    ]


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
    osd["state"] = (
        {}
        if not has
        else {
            i: {
                "step": torch.tensor(steps[i], dtype=torch.float32),
                "exp_avg": moments[2 * i].clone(),
                "exp_avg_sq": moments[2 * i + 1].clone(),
            }
            for i in range(len(params))
        }
    )
    optimizer.load_state_dict(osd)
    return lr
