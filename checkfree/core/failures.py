"""
Failure injection
=================

Seeded stage failures, from one of three sources, turned into a *trace*: the list of failures that
actually fired, written for every run and replayable exactly.

- ``hourly``: the paper's failure rate, the probability that a given stage fails within an hour. One
  iteration stands for ``iteration_time_s * time_acceleration`` seconds of exposure, so the per-iteration,
  per-stage probability is ``1 - (1 - rate) ** (exposure_s / 3600)``. With ``iteration_time_s`` unset
  the run's measured mean iteration time is used (draws stay seeded; only the threshold moves).
- ``per_step``: a fixed per-iteration, per-stage probability.
- ``trace``: replay a trace file.

Failures are keyed by *iteration*, the count of step attempts executed (an interrupted step and its
redo are two iterations), not by optimizer step: a strategy that rolls back and redoes work stays
exposed to failures while it does, as on a real cluster.

``neighbour_prob`` (hourly and per_step) makes losses correlated: each neighbour of a drawn failure fails in
the same iteration with that probability (a zone's spot capacity reclaimed at once), from a draw of its own,
so the independent failures stay exactly those without it. Neighbours lost together are what CheckFree
cannot rebuild from live neighbours and the hybrid rolls back for.

Each failure lands in a phase: before the forward pass, in the middle of the forward pass or in the
middle of the backward pass; ``at`` in [0, 1) picks the point among the failing stage's ops of that phase.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from checkfree.core.seeding import hash_seed

MODES = ("none", "hourly", "per_step", "trace")
PHASES = ("before_forward", "mid_forward", "mid_backward")


@dataclass
class FailureConfig:
    mode: str = "none"  # none, hourly, per_step or trace
    hourly_rate: float = 0.16  # hourly mode: probability that a given stage fails within an hour
    iteration_time_s: float | None = None  # hourly mode: seconds one iteration stands for; None: measured
    time_acceleration: float = 1.0  # hourly mode: multiplies the exposure of each iteration
    per_step_prob: float = 0.0  # per_step mode: probability that a given stage fails in one iteration
    trace_path: str | None = None  # trace mode: a trace.jsonl written by an earlier run
    phases: list[str] = field(default_factory=lambda: list(PHASES))  # phases a failure may land in
    stages: list[int] | None = None  # stages that may fail; None: all
    seed: int = 0  # seeds the failure draws, separately from the training seed
    max_failures: int | None = None  # stop injecting after this many failures; None: no limit
    # hourly / per_step: when a stage fails, each pipeline neighbour (of those that may fail) fails in the
    # same iteration with this probability: correlated losses, as when spot capacity is reclaimed in a zone
    # that hosts neighbouring stages. 0: independent failures (the paper's model)
    neighbour_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"failures.mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "hourly" and not 0.0 < self.hourly_rate <= 1.0:
            raise ValueError(f"failures.hourly_rate={self.hourly_rate} must be in (0, 1] in hourly mode")
        if self.iteration_time_s is not None and self.iteration_time_s <= 0:
            raise ValueError(f"failures.iteration_time_s={self.iteration_time_s} must be > 0 (or null: measured)")
        if self.time_acceleration <= 0:
            raise ValueError(f"failures.time_acceleration={self.time_acceleration} must be > 0")
        if self.mode == "per_step" and not 0.0 < self.per_step_prob <= 1.0:
            raise ValueError(f"failures.per_step_prob={self.per_step_prob} must be in (0, 1] in per_step mode")
        if self.mode == "trace":
            if not self.trace_path:
                raise ValueError("failures.trace_path is required when failures.mode='trace'")
            if not Path(self.trace_path).is_file():
                raise ValueError(f"failures.trace_path={self.trace_path!r}: no such file")
        bad = [p for p in self.phases if p not in PHASES]
        if bad or not self.phases:
            raise ValueError(f"failures.phases={self.phases} must be a non-empty subset of {list(PHASES)}")
        if self.max_failures is not None and self.max_failures < 0:
            raise ValueError(f"failures.max_failures={self.max_failures} must be >= 0")
        if not 0.0 <= self.neighbour_prob <= 1.0:
            raise ValueError(f"failures.neighbour_prob={self.neighbour_prob} must be in [0, 1]")
        if self.neighbour_prob and self.mode == "trace":
            raise ValueError(
                f"failures.neighbour_prob={self.neighbour_prob} does not apply to failures.mode='trace' (a trace "
                "already lists every failure, correlated ones included); use hourly or per_step"
            )


@dataclass(frozen=True)
class Failure:
    iteration: int  # step attempt at which the stage is lost
    stage: int
    phase: str  # one of PHASES
    at: float  # position within the phase, in [0, 1)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"failure phase {self.phase!r} is not one of {', '.join(PHASES)}")
        if not 0.0 <= self.at < 1.0 or self.iteration < 0 or self.stage < 0:
            raise ValueError(
                f"failure at iteration {self.iteration}, stage {self.stage}, position {self.at}: "
                "expected iteration >= 0, stage >= 0 and position in [0, 1)"
            )


def hourly_to_per_iteration(rate: float, exposure_s: float) -> float:
    """Per-iteration failure probability of one stage for an hourly failure probability ``rate``."""
    if rate >= 1.0:
        return 1.0
    return 1.0 - math.exp(math.log1p(-rate) * exposure_s / 3600.0)


def write_trace(path: str | Path, failures: list[Failure], num_stages: int) -> None:
    with open(path, "w") as f:
        f.write(json.dumps({"trace_version": 1, "num_stages": num_stages}) + "\n")
        for fl in failures:
            f.write(json.dumps(asdict(fl)) + "\n")


def read_trace(path: str | Path, num_stages: int) -> list[Failure]:
    """Failures from a trace file, checked against ``num_stages``.

    Raises:
        ValueError: a malformed line, an unknown phase, or a stage outside 0..num_stages-1.
    """
    failures = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from e
            if "trace_version" in rec:
                continue
            try:
                fl = Failure(int(rec["iteration"]), int(rec["stage"]), str(rec["phase"]), float(rec["at"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: expected iteration, stage, phase, at; got {rec} ({e})") from e
            if not 0 <= fl.stage < num_stages:
                raise ValueError(f"{path}:{n}: stage {fl.stage} out of range 0..{num_stages - 1}")
            failures.append(fl)
    return failures


class FailureInjector:
    """Decides which stages fail at each iteration and records every failure that fires."""

    def __init__(self, cfg: FailureConfig, num_stages: int):
        self.cfg, self.num_stages = cfg, num_stages
        self.stages = list(range(num_stages)) if cfg.stages is None else list(cfg.stages)
        bad = [s for s in self.stages if not 0 <= s < num_stages]
        if bad:
            raise ValueError(f"failures.stages={cfg.stages}: stages {bad} out of range 0..{num_stages - 1}")
        self.replay = read_trace(cfg.trace_path, num_stages) if cfg.mode == "trace" else []
        self.fired: list[Failure] = []

    def probability(self, measured_iteration_s: float | None) -> float:
        if self.cfg.mode == "per_step":
            return self.cfg.per_step_prob
        if self.cfg.mode != "hourly":
            return 0.0
        iteration_s = self.cfg.iteration_time_s or measured_iteration_s
        if not iteration_s:
            return 0.0  # no measurement yet: the first iteration is never failed
        return hourly_to_per_iteration(self.cfg.hourly_rate, iteration_s * self.cfg.time_acceleration)

    def _with_neighbours(self, iteration: int, drawn: list[Failure], room: float) -> list[Failure]:
        """``neighbour_prob``: each stage next to an independently drawn failure (and allowed to fail) fails
        with it, by one seeded draw of its own (one chance even between two drawn failures; separate from the
        independent draws, so those stay exactly the draws without it), while ``room`` is left under
        ``max_failures`` (the independent failures come first)."""
        if not self.cfg.neighbour_prob or not drawn:
            return drawn
        failing = {f.stage for f in drawn}
        next_to = sorted({nb for f in drawn for nb in (f.stage - 1, f.stage + 1)} - failing)
        extra = []
        for nb in next_to:
            if nb not in self.stages or len(extra) >= room:
                continue
            rng = np.random.default_rng(hash_seed(self.cfg.seed, iteration, nb, 1))
            draw, phase_draw, at = rng.random(3)
            if draw < self.cfg.neighbour_prob:
                phase = self.cfg.phases[int(phase_draw * len(self.cfg.phases))]
                extra.append(Failure(iteration, nb, phase, float(at)))
        return sorted(drawn + extra, key=lambda f: f.stage)

    def failures_at(self, iteration: int, measured_iteration_s: float | None = None) -> list[Failure]:
        """The failures that fire at ``iteration`` (each recorded in ``fired``)."""
        room = math.inf if self.cfg.max_failures is None else self.cfg.max_failures - len(self.fired)
        if room <= 0:
            return []
        if self.cfg.mode == "trace":
            out = [f for f in self.replay if f.iteration == iteration]
        else:
            p = self.probability(measured_iteration_s)
            out = []
            for stage in self.stages:
                rng = np.random.default_rng(hash_seed(self.cfg.seed, iteration, stage))
                draw, phase_draw, at = rng.random(3)
                if draw < p:
                    phase = self.cfg.phases[int(phase_draw * len(self.cfg.phases))]
                    out.append(Failure(iteration, stage, phase, float(at)))
            out = out[: int(min(room, len(out)))]
            out = self._with_neighbours(iteration, out, room - len(out))
        if self.cfg.max_failures is not None:
            out = out[: int(room)]
        self.fired += out
        return out
