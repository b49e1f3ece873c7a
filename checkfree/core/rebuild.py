"""
Rebuild
=======

The one path by which a lost stage is put back, in both executors. ``rebuild_stage`` is a pure function:
given a ``RecoveryPlan`` and whatever the sources handed over (``RebuildInputs``: neighbours' blocks and
gradient norms, an edge replica, a checkpoint payload, a shadow's full state), it assembles the new stage
(blocks, embedding or head), its optimizer and learning rate, and the gradient norm it starts with. The
engine reads the inputs from its own stages; a swarm peer receives them over the network. Nothing else
decides what a rebuilt stage holds, so an experiment run in the engine predicts the swarm tensor for
tensor (``tests/integration/test_rebuild_equivalence.py``).

What each method installs:

| method | blocks | embedding / head | optimizer | lr |
|---|---|---|---|---|
| weighted_average, uniform_average, copy | the sources' | replica, else fresh draw | fresh (1) | ``lr*lr_factor`` (2) |
| random | fresh draw | fresh draw | fresh | ``lr * lr_factor`` (2) |
| shadow | the shadow's | the shadow's | the shadow's Adam | the shadow's |
| checkpoint | the stage's checkpoint | the checkpoint's | the checkpoint's Adam | the checkpoint's |
| handoff | the leaving peer's | the leaving peer's | its Adam | its lr |

(1) or, with ``recovery.optimizer_init=neighbours`` (engine only), the blocks' Adam moments averaged from
the sources' with the blocks' weights. (2) ramped up over ``recovery.warmup_steps`` when set; a warm-up
in progress is not saved with a checkpoint or hand-over (a restored stage resumes at its full lr).

A fresh draw is seeded by the step (``seeding.reinit_salt``), never by a process's own randomness, so
both executors draw the same weights. A restore from a checkpoint (the adjacent-failure fallback, or a
rollback) installs the stage's whole saved training state, Adam moments and learning rate included: the
checkpoint is a consistent snapshot of that stage, and throwing its moments away would restart Adam's
bias correction on weights that are not new, which is what the fresh optimizer of an *averaged* stage is
for. A rebuilt stage starts with no gradient norm measured (0, unsmoothed) unless its checkpoint saved
one: the norm of the lost stage died with its machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from checkfree.core.checkpoint import StagePayload
from checkfree.core.model import ModelConfig, Stage, edge_state, init_stage_
from checkfree.core.recovery import RecoveryConfig, RecoveryPlan, edge_kind, rebuild_blocks
from checkfree.core.redundancy import load_full_state
from checkfree.core.seeding import reinit_salt
from checkfree.core.stage_step import OptimConfig, make_optimizer


@dataclass(frozen=True)
class RebuildSpec:
    """The parts of a run's config that decide what a rebuilt stage holds."""

    model: ModelConfig
    optim: OptimConfig
    recovery: RecoveryConfig
    seed: int
    device: str = "cpu"  # where the rebuilt stage lives: its optimizer state is created there too

    @classmethod
    def of(cls, cfg) -> RebuildSpec:
        """From a ``TrainConfig`` (taken by attribute: the core does not import the config root)."""
        return cls(cfg.model, cfg.optim, cfg.recovery, cfg.seed, cfg.device)

    def new_stage(self, index: int) -> Stage:
        """An uninitialised stage on the device (Adam state loaded later must land beside its parameters)."""
        return Stage(self.model, index).to(self.device)


@dataclass
class RebuildInputs:
    """What the plan's sources handed over; each field is used only by the methods that need it."""

    blocks: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # source stage -> block state
    norms: dict[int, float] = field(default_factory=dict)  # source stage -> its gradient norm for weighting
    edge: tuple[int, dict[str, torch.Tensor]] | None = None  # (step taken, embedding or head) from the replica
    checkpoint: StagePayload | None = None  # the lost stage's newest checkpoint (method checkpoint)
    full_state: list[torch.Tensor] | None = None  # the shadow's ``full_state_tensors`` (method shadow)
    # source stage -> block parameter name -> its Adam state (``recovery.optimizer_init=neighbours``)
    moments: dict[int, dict[str, dict]] = field(default_factory=dict)


@dataclass
class RebuiltStage:
    stage: Stage
    optimizer: torch.optim.Optimizer
    lr: float
    weights: tuple[float, ...]  # of the sources, in source order (empty when nothing was averaged)
    source_norms: tuple[float, ...]
    edge_staleness_steps: int | None  # steps since the embedding / head it got was copied or saved
    grad_norm_raw: float
    grad_norm_smoothed: float | None
    grad_norm_post: float | None = None
    warmup_steps: int = 0  # steps over which its lr ramps up (``recovery.warmup_steps``; a restore: the saved ramp)
    warmup_done: int = 0  # steps of the ramp already taken (a restore mid-ramp)

    def event_fields(self, plan: RecoveryPlan, step: int, strategy: str, duration_s: float) -> dict:
        """The required fields of the ``rebuilt`` event (``checkfree.core.events``), as both executors log it."""
        return dict(
            stage=plan.stage, step=step, strategy=strategy, method=plan.method, path=plan.path,
            sources=list(plan.sources), weights=list(self.weights), source_norms=list(self.source_norms),
            edge=plan.edge, edge_staleness_steps=self.edge_staleness_steps, lr=self.lr, duration_s=duration_s,
        )  # fmt: skip


def initial_stage(spec: RebuildSpec, index: int) -> tuple[Stage, torch.optim.Optimizer]:
    """Stage ``index`` as the run starts it (a pure function of the seed), with a fresh optimizer."""
    stage = spec.new_stage(index)
    init_stage_(stage, spec.model, spec.seed)
    return stage, make_optimizer(stage, spec.optim, spec.optim.lr)


def restore_stage(spec: RebuildSpec, index: int, payload: StagePayload) -> RebuiltStage:
    """Stage ``index`` exactly as a checkpoint saved it: weights, Adam state, lr and tracked norms."""
    stage = spec.new_stage(index)
    stage.load_state_dict(payload.model)
    optimizer = make_optimizer(stage, spec.optim, payload.lr, payload.optim)
    return RebuiltStage(
        stage, optimizer, payload.lr, (), (), None,
        payload.grad_norm_raw, payload.grad_norm_smoothed, payload.grad_norm_post,
        payload.warmup_steps, payload.warmup_done,
    )  # fmt: skip


def rebuild_stage(spec: RebuildSpec, plan: RecoveryPlan, step: int, inputs: RebuildInputs) -> RebuiltStage:
    """Assemble the stage that replaces ``plan.stage`` when training resumes at ``step``.

    Raises:
        ValueError: an input the plan needs is missing or does not fit the stage (a source that sent
            nothing, a checkpoint of another stage, a full state of the wrong size).
    """
    if plan.method in ("checkpoint", "handoff"):  # handoff: the state a peer leaving on a preemption notice sent
        if inputs.checkpoint is None:
            raise ValueError(f"stage {plan.stage}: plan {plan.method} but no checkpoint was handed over")
        if inputs.checkpoint.stage != plan.stage:
            raise ValueError(f"stage {plan.stage}: got the checkpoint of stage {inputs.checkpoint.stage}")
        rebuilt = restore_stage(spec, plan.stage, inputs.checkpoint)
        rebuilt.edge_staleness_steps = step - inputs.checkpoint.step  # the whole stage is that old
        return rebuilt
    stage = spec.new_stage(plan.stage)
    init_stage_(stage, spec.model, spec.seed, salt=reinit_salt(step))  # what no source overwrites is a fresh draw
    if plan.method == "shadow":
        if inputs.full_state is None:
            raise ValueError(f"stage {plan.stage}: plan shadow but no shadow state was handed over")
        optimizer = make_optimizer(stage, spec.optim, spec.optim.lr)
        lr = load_full_state(stage, optimizer, inputs.full_state)
        return RebuiltStage(stage, optimizer, lr, (1.0,), (), 0, 0.0, None)
    new_blocks, weights = rebuild_blocks(plan, inputs.blocks, inputs.norms, spec.recovery.eps)
    if new_blocks is not None:
        stage.load_state_dict(new_blocks, strict=False)
    staleness = None
    kind = edge_kind(plan.stage, spec.model.num_stages)
    if kind and plan.edge == "replica":
        if inputs.edge is None:
            raise ValueError(f"stage {plan.stage}: plan takes the {kind} from its replica but none was handed over")
        taken_at, replica = inputs.edge
        expected = edge_state(stage.state_dict(), kind)
        if replica.keys() != expected.keys() or any(replica[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(
                f"stage {plan.stage}: the {kind} replica does not fit the stage "
                f"(keys {sorted(replica)}; expected {sorted(expected)})"
            )
        stage.load_state_dict(replica, strict=False)
        staleness = step - taken_at
    lr = spec.optim.lr * spec.recovery.lr_factor
    optimizer = make_optimizer(stage, spec.optim, lr)
    if spec.recovery.optimizer_init == "neighbours" and new_blocks is not None:
        _average_moments(stage, optimizer, plan, inputs, weights)
    norms = tuple(inputs.norms[s] for s in plan.sources if s in inputs.norms)
    rebuilt = RebuiltStage(stage, optimizer, lr, tuple(weights), norms, staleness, 0.0, None)
    rebuilt.warmup_steps = spec.recovery.warmup_steps
    return rebuilt


def _average_moments(
    stage: Stage, optimizer: torch.optim.Optimizer, plan: RecoveryPlan, inputs: RebuildInputs, weights
) -> None:
    """Start the rebuilt blocks' Adam from their sources' moments, averaged with the weights the blocks were
    averaged with, at the sources' step count (so bias correction does not restart): the first updates of a
    rebuilt stage are then as large as its neighbours' instead of Adam's full-size first steps."""
    missing = [s for s in plan.sources if s not in inputs.moments]
    if missing:
        raise ValueError(f"stage {plan.stage}: recovery.optimizer_init=neighbours but stages {missing} sent no moments")
    params = dict(stage.named_parameters())
    for name, p in params.items():
        states = [inputs.moments[s].get(name) for s in plan.sources]
        if not name.startswith("blocks.") or any(st is None for st in states):
            continue
        optimizer.state[p] = {
            "step": torch.tensor(float(min(float(st["step"]) for st in states))),
            "exp_avg": sum(w * st["exp_avg"].to(p.device) for w, st in zip(weights, states, strict=True)),
            "exp_avg_sq": sum(w * st["exp_avg_sq"].to(p.device) for w, st in zip(weights, states, strict=True)),
        }
