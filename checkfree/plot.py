"""
Plots
=====

``plot_runs`` draws validation and training loss against step and against training wall-clock for one
or more run directories, overlaid, with each failure marked, into a PNG; ``save_figure`` writes any
figure the way every plot of the project is written (the benchmark scripts use it too).
"""

from __future__ import annotations

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
        time_at = {m["step"]: m["time/train_s"] for m in metrics}
        fail_steps = [e["step"] for e in events if e["event"] == "failure"]
        for k, s in enumerate(fail_steps):
            ax_step.axvline(s, color=color, ls=":", lw=0.9, label=f"{label} failures" if k == 0 else None)
            if s in time_at:
                ax_time.axvline(time_at[s], color=color, ls=":", lw=0.9)
    ax_step.set_xlabel("step")
    ax_time.set_xlabel("training wall-clock (s)")
    for ax in (ax_step, ax_time):
        ax.set_ylabel("loss (faint: train, markers: validation)")
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize=8)
    return save_figure(fig, out)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG (making its folder) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
