"""
Plots
=====

``plot_runs`` draws validation and training loss against step and against training wall-clock for one
or more run directories, overlaid, with each failure marked, into a PNG; ``save_figure`` writes any
figure the way every plot of the project is written (the benchmark scripts use it too).

On the wall-clock panel a failure is marked when it happened, and the stall it caused (until the next
committed step) is shaded: ``failure_marks`` computes both from the run's files. An engine run's failure
event carries ``train_s``, the training wall-clock at the loss (older runs: the time of the last commit
before the failed iteration); a swarm run's merged metrics carry ``time/wall`` beside ``time/train_s``,
so the launcher's kill time (the event's ``time``) is placed on the same axis.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from checkfree.core.metrics import read_jsonl


def _load(run_dir: Path) -> tuple[list[dict], list[dict]]:
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {metrics_path} not found")
    events_path = run_dir / "events.jsonl"
    events = read_jsonl(events_path) if events_path.is_file() else []
    return read_jsonl(metrics_path), events


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Write a two-panel PNG (loss vs step, loss vs wall-clock) of ``run_dirs`` to ``out``."""
    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    for n, run_dir in enumerate(map(Path, run_dirs)):
        metrics, events = _load(run_dir)
        label = labels[n] if labels else run_dir.name
        color = f"C{n % 10}"
        steps = [m["step"] for m in metrics]
        times = [m["time/train_s"] for m in metrics]
        train = [m["loss/train"] for m in metrics]
        val = [(m["step"], m["time/train_s"], m["loss/val"]) for m in metrics if "loss/val" in m]
        for ax, xs in ((ax_step, steps), (ax_time, times)):
            ax.plot(xs, train, color=color, alpha=0.35, lw=0.8)
        if val:
            ax_step.plot(
                [v[0] for v in val], [v[2] for v in val], color=color, marker="o", ms=3, label=f"{label} (val)"
            )
            ax_time.plot([v[1] for v in val], [v[2] for v in val], color=color, marker="o", ms=3)
        fail_steps = [e["step"] for e in events if e["event"] == "failure"]
        for k, s in enumerate(fail_steps):
            ax_step.axvline(s, color=color, ls=":", lw=0.9, label=f"{label} failures" if k == 0 else None)
        for at, resumed in failure_marks(metrics, events):
            ax_time.axvline(at, color=color, ls=":", lw=0.9)
            if resumed is not None and resumed > at:
                ax_time.axvspan(at, resumed, color=color, alpha=0.08, lw=0)
    ax_step.set_xlabel("step")
    ax_time.set_xlabel("training wall-clock (s)")
    for ax in (ax_step, ax_time):
        ax.set_ylabel("loss (faint: train, markers: validation)")
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize=8)
    return save_figure(fig, out)


def failure_marks(metrics: list[dict], events: list[dict]) -> list[tuple[float, float | None]]:
    """Where each failure lies on the training wall-clock axis (``time/train_s``), and where training
    went on: (at, the first commit after it, None if none), in the order of the events.

    Args:
        metrics: the run's ``metrics.jsonl`` rows, in order.
        events: its ``events.jsonl``; only ``failure`` events are used.
    """
    commits = [m["time/train_s"] for m in metrics if "loss/train" in m]
    # a swarm run: time/train_s is time/wall less the run's start, so an event's unix time maps onto it
    wall = next((m for m in metrics if "time/wall" in m), None)
    offset = wall["time/wall"] - wall["time/train_s"] if wall is not None else None
    marks = []
    for e in events:
        if e["event"] != "failure":
            continue
        if "train_s" in e:
            at = e["train_s"]
        elif offset is not None:
            at = e["time"] - offset
        else:  # an engine run from before failure events carried train_s: the last commit before it
            before = [m["time/train_s"] for m in metrics if m.get("iteration", math.inf) < e["iteration"]]
            at = max(before, default=0.0)
        marks.append((at, next((t for t in commits if t > at), None)))
    return marks


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG (making its folder) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
