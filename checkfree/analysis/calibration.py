"""
Calibration
===========

Checkpointing compared at its own best interval, not at one picked by hand (issue 22 item 4): the interval of
Young (1974) or Daly (2006) from the *measured* cost of a save and of a step on this machine and storage, and
the failure rate of the run. ``scripts/bench_convergence.py`` trains a short failure-free calibration run
with a save every few steps; this module reads it and turns it into an interval per rate. The same
measurement costs a sweep before it runs (runs x steps x seconds per step).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from checkfree.analysis import costmodel as cm
from checkfree.analysis.runs import read_metrics

RULES = {"young": cm.young_interval_steps, "daly": cm.daly_interval_steps}
STARTUP_S = 9.0  # per run, imports, data and the final save (bench_swap_tax.py's measurement)


@dataclass(frozen=True)
class Calibration:
    save_s: float  # median blocking save of every stage (checkpoint_save events)
    step_s: float  # median time of a step that runs to the end (time/step_s)
    saves: int  # how many saves the medians are over
    steps: int  # how many steps

    def as_dict(self) -> dict:
        return {"save_s": self.save_s, "step_s": self.step_s, "saves": self.saves, "steps": self.steps}


def read_calibration(run_dir: str | Path, skip_steps: int = 2) -> Calibration:
    """The median save and step times of a finished failure-free run that saved on a schedule. The first
    ``skip_steps`` steps (allocation, first-touch) are left out of the step time.

    Raises:
        ValueError: the run has no metrics, no step after ``skip_steps`` or no blocking save.
    """
    run_dir = Path(run_dir)
    steps = [r["time/step_s"] for r in read_metrics(run_dir) if r.get("step", 0) >= skip_steps and "time/step_s" in r]
    events_path = run_dir / "events.jsonl"
    events = [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.is_file() else []
    saves = [e["save_s"] for e in events if e["event"] == "checkpoint_save" and not e.get("background")]
    if not steps or not saves:
        raise ValueError(
            f"{run_dir}: {len(steps)} steps after the first {skip_steps} and {len(saves)} blocking saves; "
            "expected a finished calibration run that saved on a schedule (recovery.strategy=checkpoint)"
        )
    return Calibration(statistics.median(saves), statistics.median(steps), len(saves), len(steps))


def checkpoint_interval(
    rule: str,
    cal: Calibration,
    hourly_rate: float,
    num_stages: int,
    iteration_s: float,
    acceleration: float = 1.0,
) -> int:
    """Steps between checkpoints by ``rule`` ('young' or 'daly') for stages that each fail at ``hourly_rate``
    with one step standing for ``iteration_s * acceleration`` seconds of exposure (as
    ``failures.mode=hourly`` draws them), from the measured save and step times; at least 1. A rate of 0 (no
    failures) gives no finite interval.

    Raises:
        ValueError: an unknown rule, or a rate with no finite interval.
    """
    if rule not in RULES:
        raise ValueError(f"checkpoint interval rule {rule!r}: expected one of {sorted(RULES)}")
    failures_per_step = num_stages * cm.per_step_probability(hourly_rate, iteration_s, acceleration)
    k = RULES[rule](cal.save_s, cal.step_s, failures_per_step)
    if not math.isfinite(k):
        raise ValueError(f"hourly_rate={hourly_rate}: no failures, so {rule}'s interval is infinite")
    return max(1, round(k))


def interval_rule(strategy: str) -> str | None:
    """'young' or 'daly' for checkpoint:young / checkpoint:daly, else None.

    Raises:
        ValueError: hybrid:young or hybrid:daly (the rules assume blocking saves and a rollback at every
            failure; the hybrid saves in the background and rolls back only when a rebuild is impossible).
    """
    kind, _, k = strategy.partition(":")
    if kind == "hybrid" and k in RULES:
        raise ValueError(
            f"{strategy}: Young's and Daly's rules assume blocking saves and a rollback at every "
            "failure; the hybrid saves in the background and rolls back only when a rebuild is impossible: give "
            "its interval in steps (hybrid:K)"
        )
    return k if kind == "checkpoint" and k in RULES else None


def resolve_strategy(
    strategy: str,
    cal: Calibration | None,
    hourly_rate: float,
    num_stages: int,
    iteration_s: float,
    acceleration: float = 1.0,
) -> str:
    """checkpoint:young (or :daly) at ``hourly_rate`` as checkpoint:K, K by ``checkpoint_interval``; any other
    strategy as it is (``cal`` may then be None).

    Raises:
        ValueError: hybrid:young/daly, or a rate with no finite interval.
    """
    rule = interval_rule(strategy)
    if rule is None:
        return strategy
    k = checkpoint_interval(rule, cal, hourly_rate, num_stages, iteration_s, acceleration)
    return f"{strategy.partition(':')[0]}:{k}"


def sweep_cost_s(num_runs: int, num_steps: int, cal: Calibration) -> float:
    """Training seconds of ``num_runs`` runs of ``num_steps`` steps at the calibration's step time, each with
    its start-up. A lower bound: rollbacks redo steps, saves and redundant computation's second copy add time."""
    return num_runs * (num_steps * cal.step_s + STARTUP_S)
