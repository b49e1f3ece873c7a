"""
Run reader
==========

One reader of a finished run's ``metrics.jsonl`` for both executors: its validation curve and the first
point at or below a target loss (steps, seconds, iterations). Both executors' step records carry ``step``,
``iteration`` and ``time/train_s`` (``checkfree.core.metrics``' schema). Seconds are the engine's training
seconds; a swarm's rows also carry ``time/wall`` (the clock its peers share) and their ``time/train_s``
counts from the launch, so their seconds count from the start of the first step instead, leaving the DHT
start-up out. Runs written before the swarm logged ``iteration`` have no iterations (None). Every
benchmark that asks "how long to this loss" reads it here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from checkfree.core.metrics import read_jsonl


class Point(NamedTuple):
    """One evaluation of a run: a tuple, so ``point[0]`` is the steps and ``point[1]`` the loss."""

    steps: int  # committed steps when it was evaluated (row's step + 1)
    loss: float  # validation loss
    seconds: float | None  # training seconds so far (engine), or wall-clock since the first step (swarm)
    iterations: int | None  # step attempts so far, redone and interrupted ones included (engine only)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` in the order they were written.

    Raises:
        ValueError: ``run_dir`` has no metrics.jsonl.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl (expected a run directory of either executor)")
    return read_jsonl(path)


def val_curve(rows: Sequence[dict], times: Sequence[float] | None = None) -> list[Point]:
    """Every row with a finite validation loss, as a ``Point``.

    Args:
        rows: a run's metrics rows (``read_metrics``), either executor's.
        times: seconds to use instead of the recorded ones, one per row (a replay's ``row_times``).
    """
    t0 = _first_step_start(rows)
    out = []
    for n, r in enumerate(rows):
        v = r.get("loss/val")
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if times is not None:
            seconds = times[n]
        else:
            seconds = r.get("time/train_s") if t0 is None else r["time/wall"] - t0
        iterations = r["iteration"] + 1 if "iteration" in r else None  # None: a swarm run from before it logged them
        out.append(Point(r["step"] + 1, float(v), seconds, iterations))
    return out


def _first_step_start(rows: Sequence[dict]) -> float | None:
    """The unix time a swarm run's first step started (its rows carry ``time/wall``), from which its seconds
    count; None for the engine's rows, whose ``time/train_s`` is training time already."""
    first = next((r for r in rows if "time/wall" in r), None)
    return None if first is None else first["time/wall"] - first["time/step_s"]


def steps_to_target(curve: Sequence[tuple], target: float) -> tuple | None:
    """The first point of ``curve`` whose loss (its second field) is <= ``target``, or None when the run
    never got there. ``curve`` is a ``val_curve`` or any sequence of (steps, loss, ...) tuples."""
    return next((p for p in curve if p[1] <= target), None)


def run_to_target(run_dir: str | Path, target: float) -> Point | None:
    """``steps_to_target`` of a run directory's validation curve."""
    return steps_to_target(val_curve(read_metrics(run_dir)), target)
