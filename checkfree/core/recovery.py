"""
Recovery
========

How a lost stage is rebuilt, as pure functions: ``plan_recovery`` decides, for each lost stage, the
method, the (live) source stages and the path taken; ``weighted_average`` / ``uniform_average`` /
``copy_blocks`` compute the new block weights from the sources' state dicts. The single-process engine
and the multi-process runtime both call these; only where the state dicts come from differs.

Strategies:
- ``checkfree``: a middle stage i becomes the average of stages i-1 and i+1, each weighted by its own
  gradient norm (+ eps): by default the last step's pre-clip norm over its transformer blocks only
  (``norm_scope``, ``norm_source``); a first/last stage (one neighbour) copies that neighbour.
- ``checkfree_plus``: as ``checkfree`` for middle stages; the first/last stage copies its swap partner
  (stage 1 / stage L-2), which the swapped schedule trained to stand in for it. Stages 1 and L-2 (the swap
  partners themselves) are averaged like any middle stage (``partner_rule=average``, ours) or copied from
  their swap partner, stage 0 / L-1 (``partner_rule=copy``, the reference code's).
- ``copy``: copy the previous stage (the next one for stage 0).
- ``uniform``: plain average of the two neighbours.
- ``random``: re-initialise.
- ``checkpoint``: roll the whole pipeline back to the last complete checkpoint (done by the trainer).
- ``redundant``: fail over to the shadow copy its predecessor trained alongside it (``redundancy.py``).
- ``hybrid``: CheckFree+ rebuilds for the losses it can rebuild from live neighbours, and asynchronous
  checkpoints (written in the background, no stall) that the whole pipeline rolls back to when it cannot:
  two neighbouring stages (the first two or the last two among them) or every stage lost at once
  (``beyond_rebuild``). The engine and the swarm ask the same question.
- ``none``: the failure-free reference; failures are refused.

A rebuilt stage gets a fresh optimizer at ``lr * lr_factor``. Embedding and head of a rebuilt first/last
stage come from the replica its neighbour holds (refreshed every ``edge_replica_every_steps``), else
they are re-initialised. When a source stage is itself lost in the same step, no lost weights are ever
read: ``adjacent_fallback`` picks the checkpoint of the lost stage if one exists, else the nearest live
stages on each side, else random re-initialisation; the plan records the path taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from checkfree.core.strategies import (  # noqa: F401 (re-exported: the names belong with their rules)
    FALLBACKS,
    NORM_SCOPES,
    NORM_SOURCES,
    OPTIMIZER_INITS,
    PARTNER_RULES,
    PER_STAGE_STRATEGIES,
    STRATEGIES,
    SWAPPED,
)


@dataclass
class RecoveryConfig:
    # how a lost stage is recovered: none, checkfree, checkfree_plus, copy, uniform, random, checkpoint,
    # redundant, hybrid
    strategy: str = "checkfree_plus"
    lr_factor: float = 1.1  # learning-rate multiplier of a rebuilt stage (paper: 1.1)
    eps: float = 1e-4  # added to each neighbour's gradient norm before weighting
    norm_source: str = "raw"  # weight by the last pre-clip norm (raw), its EMA (smoothed) or the post-clip norm
    norm_scope: str = "blocks"  # the norm over the transformer blocks only, or the whole stage (edge params too)
    partner_rule: str = "average"  # checkfree_plus: rebuild stage 1 / L-2 as an average or copy its swap partner
    # a rebuilt stage's lr ramps up linearly over this many steps (0: lr * lr_factor from its first step)
    warmup_steps: int = 0
    # a rebuilt stage's Adam: fresh (the paper), or its sources' moments averaged with the blocks' weights
    # (engine only for now: the swarm does not send moments yet)
    optimizer_init: str = "fresh"
    norm_ema_beta: float = 0.9  # smoothing of the tracked norm: ema = beta * ema + (1 - beta) * raw
    edge_replica_every_steps: int = 10  # refresh neighbours' copies of embedding/head every k steps; 0: off
    adjacent_fallback: str = "checkpoint"  # when a source is lost too: checkpoint, nearest or random

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"recovery.strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.adjacent_fallback not in FALLBACKS:
            raise ValueError(
                f"recovery.adjacent_fallback={self.adjacent_fallback!r} is not one of {', '.join(FALLBACKS)}"
            )
        if self.norm_source not in NORM_SOURCES:
            raise ValueError(f"recovery.norm_source={self.norm_source!r} is not one of {', '.join(NORM_SOURCES)}")
        if self.norm_scope not in NORM_SCOPES:
            raise ValueError(f"recovery.norm_scope={self.norm_scope!r} is not one of {', '.join(NORM_SCOPES)}")
        if self.partner_rule not in PARTNER_RULES:
            raise ValueError(f"recovery.partner_rule={self.partner_rule!r} is not one of {', '.join(PARTNER_RULES)}")
        if self.partner_rule != "average" and self.strategy not in ("checkfree_plus", "hybrid"):
            raise ValueError(
                f"recovery.partner_rule={self.partner_rule} changes how CheckFree+ rebuilds its swap partners; "
                f"recovery.strategy={self.strategy} has none (use checkfree_plus or hybrid, or leave it 'average')"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"recovery.warmup_steps={self.warmup_steps} must be >= 0")
        if self.optimizer_init not in OPTIMIZER_INITS:
            raise ValueError(
                f"recovery.optimizer_init={self.optimizer_init!r} is not one of {', '.join(OPTIMIZER_INITS)}"
            )
        if self.lr_factor <= 0:
            raise ValueError(f"recovery.lr_factor={self.lr_factor} must be > 0")
        if self.eps < 0:
            raise ValueError(f"recovery.eps={self.eps} must be >= 0")
        if not 0.0 <= self.norm_ema_beta < 1.0:
            raise ValueError(f"recovery.norm_ema_beta={self.norm_ema_beta} must be in [0, 1)")
        if self.edge_replica_every_steps < 0:
            raise ValueError(f"recovery.edge_replica_every_steps={self.edge_replica_every_steps} must be >= 0")


def edge_replicas_on(cfg: RecoveryConfig) -> bool:
    """Whether neighbours keep copies of the embedding and head (per-stage rebuild strategies only)."""
    return cfg.strategy in PER_STAGE_STRATEGIES and cfg.edge_replica_every_steps > 0


@dataclass(frozen=True)
class RecoveryPlan:
    stage: int
    method: str  # weighted_average, uniform_average, copy, random, checkpoint or shadow
    sources: tuple[int, ...]  # live stages whose blocks are read
    path: str  # primary, fallback:checkpoint, fallback:nearest or fallback:random
    edge: str | None  # first/last stage only: where embedding/head come from (replica, reinit, checkpoint)


def edge_kind(stage: int, num_stages: int) -> str | None:
    """'embed' for the first stage, 'head' for the last, None for middle stages."""
    return "embed" if stage == 0 else "head" if stage == num_stages - 1 else None


def replica_holder(kind: str, num_stages: int) -> int:
    """The stage that keeps a copy of the embedding (stage 1) or of the norm and head (stage L-2)."""
    return 1 if kind == "embed" else num_stages - 2


def _primary_sources(strategy: str, stage: int, num_stages: int, partner_rule: str = "average") -> tuple[int, ...]:
    last = num_stages - 1
    if strategy == "checkfree_plus" and partner_rule == "copy" and num_stages >= 4:
        if stage == 1:
            return (0,)  # the swap partner, trained to stand in for stage 1 on swapped microbatches
        if stage == last - 1:
            return (last,)
    if strategy == "redundant":
        return ((stage - 1) % num_stages,)  # the shadow's holder
    if strategy == "copy":
        return (stage - 1,) if stage > 0 else (1,)
    if stage == 0:
        return (1,)
    if stage == last:
        return (last - 1,)
    return (stage - 1, stage + 1)


def _method(strategy: str, sources: tuple[int, ...]) -> str:
    if not sources:
        return "random"
    if len(sources) == 1:
        return "copy"
    return "uniform_average" if strategy == "uniform" else "weighted_average"


def plan_recovery(
    lost: set[int] | list[int],
    num_stages: int,
    strategy: str,
    fallback: str,
    has_checkpoint: Callable[[int], bool] = lambda stage: False,
    edge_replicas: set[str] = frozenset(),
    stale_shadows: set[int] = frozenset(),
    partner_rule: str = "average",
) -> list[RecoveryPlan]:
    """Decide how to rebuild each lost stage without reading any lost stage's weights.

    Args:
        lost: stages lost in the same step.
        num_stages: stages in the pipeline (>= 2).
        strategy: a recovery strategy other than ``none`` and ``checkpoint``.
        fallback: what to do when a primary source is lost too (see ``FALLBACKS``).
        has_checkpoint: whether a saved copy of a stage exists (for the ``checkpoint`` fallback).
        edge_replicas: edge kinds ('embed', 'head') whose replica survives on a live holder.
        stale_shadows: stages whose shadow (redundant) is not up to date on its live holder (a swarm peer
            whose join broke off before its shadow was sent): such a stage takes the fallback path.
        partner_rule: ``checkfree_plus`` only: ``copy`` rebuilds stage 1 / L-2 from its swap partner.

    Returns:
        One plan per lost stage, in stage order.
    """
    if strategy in ("none", "checkpoint") or strategy not in STRATEGIES:
        raise ValueError(f"plan_recovery handles per-stage strategies, not {strategy!r}")
    if strategy == "hybrid":
        strategy = "checkfree_plus"  # its rebuilds; the trainer rolls back where a plan is not primary
    lost = set(lost)
    bad = sorted(s for s in lost if not 0 <= s < num_stages)
    if bad or num_stages < 2:
        raise ValueError(f"lost stages {bad or sorted(lost)} invalid for num_stages={num_stages} (need >= 2)")
    live = [s for s in range(num_stages) if s not in lost]
    plans = []
    for stage in sorted(lost):
        kind = edge_kind(stage, num_stages)
        if strategy == "random":
            plans.append(RecoveryPlan(stage, "random", (), "primary", "reinit" if kind else None))
            continue
        sources, path = _primary_sources(strategy, stage, num_stages, partner_rule), "primary"
        if any(s in lost for s in sources) or (strategy == "redundant" and stage in stale_shadows):
            if fallback == "checkpoint" and has_checkpoint(stage):
                plans.append(
                    RecoveryPlan(stage, "checkpoint", (), "fallback:checkpoint", "checkpoint" if kind else None)
                )
                continue
            if fallback == "random":
                sources = ()
            else:
                left = [s for s in live if s < stage][-1:]
                right = [s for s in live if s > stage][:1]
                sources = tuple(left + right)
            path = "fallback:nearest" if sources else "fallback:random"
        method = "shadow" if strategy == "redundant" and path == "primary" else _method(strategy, sources)
        edge = None
        if kind and method == "shadow":
            edge = "shadow"  # the shadow is a whole copy of the stage, embedding or head included
        elif kind:
            edge = "replica" if kind in edge_replicas and method != "random" else "reinit"
        plans.append(RecoveryPlan(stage, method, sources, path, edge))
    return plans


def beyond_rebuild(lost: set[int] | list[int], num_stages: int, partner_rule: str = "average") -> bool:
    """hybrid: whether the rebuild cannot take ``lost`` from live neighbours (a lost stage whose source is
    lost too: two neighbouring stages, the first two or the last two among them, or every stage), so that
    the whole pipeline rolls back to its newest complete checkpoint instead. Both executors ask this."""
    plans = plan_recovery(lost, num_stages, "hybrid", "nearest", partner_rule=partner_rule)
    return any(p.path != "primary" for p in plans)


def _check_same_keys(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))[:4]
        raise ValueError(f"{what}: state dicts do not line up key for key (differ at {diff})")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{what}: {k} has shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}")


def weighted_average(
    prev: dict[str, torch.Tensor],
    nxt: dict[str, torch.Tensor],
    prev_norm: float,
    next_norm: float,
    eps: float = 1e-4,
) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """CheckFree's rule: each neighbour weighted by its own gradient norm (+ eps).

    ``W[k] = (w_next * next[k] + w_prev * prev[k]) / (w_prev + w_next)`` with ``w = ||g|| + eps``: the
    neighbour that is further from convergence (larger gradient) counts more.

    Returns:
        The averaged state dict and the normalised weights ``(prev, next)``, which sum to 1.
    """
    _check_same_keys(prev, nxt, "weighted_average")
    for name, v in (("prev_norm", prev_norm), ("next_norm", next_norm)):
        if not (v >= 0 and v == v and v != float("inf")):
            raise ValueError(f"weighted_average: {name}={v} must be a finite norm >= 0")
    w_prev, w_next = prev_norm + eps, next_norm + eps
    total = w_prev + w_next
    if total <= 0:
        w_prev = w_next = total = 1.0
    out = {k: (w_next * nxt[k].float() + w_prev * prev[k].float()).div_(total).to(prev[k].dtype) for k in prev}
    return out, (w_prev / total, w_next / total)


def uniform_average(
    prev: dict[str, torch.Tensor], nxt: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    _check_same_keys(prev, nxt, "uniform_average")
    return {k: ((prev[k].float() + nxt[k].float()) / 2).to(prev[k].dtype) for k in prev}, (0.5, 0.5)


def copy_blocks(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in src.items()}


def rebuild_blocks(
    plan: RecoveryPlan,
    blocks: dict[int, dict[str, torch.Tensor]],
    norms: dict[int, float],
    eps: float,
) -> tuple[dict[str, torch.Tensor] | None, tuple[float, ...]]:
    """New block weights for ``plan`` from its sources' block state dicts (None: caller re-initialises
    or restores from a checkpoint). Returns the weights used, in source order."""
    if plan.method in ("random", "checkpoint", "shadow"):
        return None, ()
    missing = [s for s in plan.sources if s not in blocks]
    if missing:
        raise ValueError(f"stage {plan.stage}: source stages {missing} sent no weights")
    if plan.method == "copy":
        return copy_blocks(blocks[plan.sources[0]]), (1.0,)
    a, b = plan.sources
    if plan.method == "uniform_average":
        return uniform_average(blocks[a], blocks[b])
    return weighted_average(blocks[a], blocks[b], norms[a], norms[b], eps)
