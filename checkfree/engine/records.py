"""
Records
=======

The engine's run state (``RunState``: the loop's counters, saved in every resume state) and what the trainer
writes of it: a committed step's ``metrics.jsonl`` record and the run's ``summary.json``. Plain functions over
values: the trainer gathers them and writes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RunState:
    step: int = 0  # next step to run; also the number of committed steps
    iteration: int = 0  # step attempts executed, including interrupted ones
    failures: int = 0
    recoveries: int = 0
    train_s: float = 0.0  # wall-clock spent training, recovering and checkpointing (evaluation excluded)
    last_loss: float = math.nan
    last_val_loss: float | None = None
    first_loss: float | None = None
    tokens_per_s: float = 0.0
    measured_iteration_s: float | None = None
    val_history: list[tuple[int, float]] = field(default_factory=list)


def running_mean(mean: float | None, value: float, count: int) -> float:
    """The mean of ``count`` values given the mean of the first ``count - 1`` (None before the first)."""
    return value if mean is None else mean + (value - mean) / count


def step_record(
    st: RunState,
    loss: float,
    step_s: float,
    val_loss: float | None,
    lrs: list[float],
    grad_norm_raw: list[float],
    grad_norm_smoothed: list[float],
) -> dict:
    """The ``metrics.jsonl`` record of the step just committed (``st`` already counts it): a ``step`` record
    of ``checkfree.core.metrics``' schema.

    Args:
        step_s: the step's own seconds; ``st.train_s`` and ``st.tokens_per_s`` include its saves.
        val_loss: the validation loss evaluated after it, or None when none was.
        lrs, grad_norm_raw, grad_norm_smoothed: per stage, as the engine holds them after the step.
    """
    record = {
        "step": st.step - 1,
        "loss/train": loss,
        "throughput/tokens_per_s": st.tokens_per_s,
        "time/train_s": st.train_s,
        "time/step_s": step_s,
        "iteration": st.iteration - 1,
    }
    if val_loss is not None:
        record["loss/val"] = val_loss
    for i, (lr, raw, smoothed) in enumerate(zip(lrs, grad_norm_raw, grad_norm_smoothed)):
        record[f"stage/{i}/lr"] = lr
        record[f"stage/{i}/grad_norm_raw"] = raw
        record[f"stage/{i}/grad_norm_smoothed"] = smoothed
    return record


def run_summary(
    st: RunState,
    *,
    tokens_per_step: int,
    strategy: str,
    run_dir: str,
    version: str,
    param_bytes: int,
    shadow_param_bytes: int,
    resumed_from: int | None,
    stopped: str | None,
    weights: str,
) -> dict:
    """``summary.json`` (and the ``run_finished`` event's fields) of a run that ended in state ``st``."""
    return {
        "steps": st.step,
        "iterations": st.iteration,
        "failures": st.failures,
        "recoveries": st.recoveries,
        "first_train_loss": st.first_loss,
        "final_train_loss": st.last_loss,
        "final_val_loss": st.last_val_loss,
        "train_s": st.train_s,
        "tokens_per_step": tokens_per_step,
        "mean_tokens_per_s": tokens_per_step * st.step / st.train_s if st.train_s else None,
        "strategy": strategy,
        "run_dir": run_dir,
        "checkfree_version": version,
        "memory/param_bytes": param_bytes,
        "memory/shadow_param_bytes": shadow_param_bytes,
        "resumed_from": resumed_from,
        "stopped": stopped,
        "weights": weights,
    }
