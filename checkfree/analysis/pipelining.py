"""
Throughput against torch's pipelining
=====================================

What ``scripts/bench_pipelining.py`` concludes from its runs: the benchmark's plan (``PipeliningBench``: the
sides, schedules, rounds and the overrides every run shares), each run's per-step records folded into
per-round medians (``add_run``), and the result: per schedule and side the median tokens/s, the ratio to
torch's side as the geometric mean of the per-round ratios with a t interval on their logarithms
(``ratio_interval``), the ratio of the pooled medians, the training loss of the last steps, the largest loss
gap to torch at equal steps and the largest stage process's memory (``summarise``); its markdown table
(``table``), JSON (``result``) and page (``page``).

The runs themselves (torch's ``PipelineStage`` processes, the static pipeline, the local swarm) are the
launcher's: ``launcher/torch_pipeline.py``. This module imports no executor and no torch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from checkfree.analysis.stats import fmt_interval, t_interval

if TYPE_CHECKING:
    from checkfree.config import TrainConfig

SIDES = ("torch", "static", "swarm")
NOTES = (
    "checkfree runs both schedules itself; each torch schedule is compared with checkfree's of the same name",
    "checkfree's sides take the plain route (pipeline.swap=false, recovery.strategy=checkfree)",
    "the torch side has no commit all-reduce; checkfree's step has one (its commit point)",
    "tokens/s is timed on the first stage of each run (the swarm: on the stage its merged metrics keep)",
)
INTERVAL_METHOD = "t interval on per-round log ratios"


@dataclass(frozen=True)
class PipeliningBench:
    """What to run: every side of ``sides`` under every schedule of ``schedules``, ``steps`` steps each, in
    each of ``rounds`` rounds; the first ``skip`` steps of a run are left out of its medians, the last
    ``tail`` steps give its training loss."""

    files: list[str]  # config files
    overrides: list[str]  # key=value, before the benchmark's own
    steps: int
    rounds: int
    skip: int
    tail: int
    schedules: list[str]
    sides: list[str]

    def common_overrides(self, out_dir: Path) -> list[str]:
        """The overrides every run shares: failure-free, no validation, no progress bar or plot, no spares."""
        return [
            *self.overrides,
            f"num_steps={self.steps}",
            "failures.mode=none",
            "eval_every_steps=0",
            "progress=false",
            "plot=false",
            f"out_dir={out_dir}",
            "swarm.num_spares=0",
        ]

    def runs(self) -> list[tuple[str, str]]:
        """Every (schedule, side), in the order of the first round."""
        return [(kind, side) for kind in self.schedules for side in self.sides]

    def order(self, rnd: int) -> list[tuple[str, str]]:
        """The runs of round ``rnd``: the order rotates, so drift on a shared machine falls on every side alike."""
        runs = self.runs()
        return runs[rnd % len(runs) :] + runs[: rnd % len(runs)]


def empty_data(bench: PipeliningBench) -> dict:
    """Per (schedule, side): tokens/s pooled over rounds, per-round medians, per-round losses by step, the
    largest resident memory (MB) and the wall seconds of each run."""
    return {r: {"rates": [], "per_round": [], "losses": [], "rss": [], "wall_s": []} for r in bench.runs()}


def add_run(entry: dict, rows: list[dict], peak_rss_mb: float, wall_s: float, skip: int) -> None:
    """Fold one run into its (schedule, side) entry: ``rows`` are its per-step records in step order, with
    ``throughput/tokens_per_s`` and ``loss/train``."""
    entry["wall_s"].append(wall_s)
    rates = [r["throughput/tokens_per_s"] for r in rows[skip:]]
    entry["rates"] += rates
    entry["per_round"].append(statistics.median(rates))
    entry["losses"].append({r["step"]: r["loss/train"] for r in rows})
    entry["rss"].append(peak_rss_mb)


def ratio_interval(ours: list[float], theirs: list[float], level: float = 0.95) -> dict:
    """Geometric mean of the paired per-round ratios ``ours[r] / theirs[r]`` and its t interval on the log
    ratios. One round gives the estimate and no interval (``low`` = ``high`` = None)."""
    logs = np.log(np.asarray(ours, dtype=float) / np.asarray(theirs, dtype=float))
    n = int(logs.size)
    out = {"estimate": float(np.exp(logs.mean())), "low": None, "high": None, "n": n, "level": level}
    if n < 2:
        return {**out, "method": "one round: no interval"}
    iv = t_interval(logs, level)
    return {**out, "low": math.exp(iv.low), "high": math.exp(iv.high), "method": INTERVAL_METHOD}


def loss_gap(ours: list[dict], theirs: list[dict]) -> float | None:
    """Largest |loss difference| at equal steps, over rounds (the runs are seeded alike)."""
    gaps = [abs(a[s] - b[s]) for a, b in zip(ours, theirs) for s in a if s in b and None not in (a[s], b[s])]
    return max(gaps, default=None)


def summarise(data: dict, tail: int) -> dict:
    """Medians, ratios to torch with intervals, losses and memory per schedule and side (``data``: as
    ``empty_data`` filled by ``add_run``; ``tail``: the last steps averaged for the training loss)."""
    out: dict = {}
    for (kind, side), d in data.items():
        torch_d = data.get((kind, "torch"))
        tails = [statistics.mean(list(losses.values())[-tail:]) for losses in d["losses"]]
        row = {
            "median_tokens_per_s": statistics.median(d["rates"]),
            "per_round_median_tokens_per_s": d["per_round"],
            "train_loss_tail": statistics.mean(tails),
            "max_stage_process_rss_mb": max(d["rss"]),
            "run_wall_s": d["wall_s"],  # a whole run: start-up, steps, shutdown
        }
        if torch_d is not None and side != "torch":
            row["ratio_to_torch"] = ratio_interval(d["per_round"], torch_d["per_round"])
            row["ratio_of_pooled_medians"] = row["median_tokens_per_s"] / statistics.median(torch_d["rates"])
            row["max_abs_loss_gap_to_torch"] = loss_gap(d["losses"], torch_d["losses"])
        out.setdefault(kind, {})[side] = row
    return out


def table(summary: dict) -> str:
    """The result as a markdown table, one row per schedule and side."""
    lines = [
        "| schedule | side | median tokens/s | / torch (geo-mean of rounds, 95% interval) | / torch (pooled medians) "
        "| train loss (tail) | max loss gap to torch | max stage RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, sides in summary.items():
        for side, r in sides.items():
            pooled = r.get("ratio_of_pooled_medians")
            gap = r.get("max_abs_loss_gap_to_torch")
            lines.append(
                f"| {kind} | {side} | {r['median_tokens_per_s']:.0f} | {fmt_interval(r.get('ratio_to_torch'), 3)} | "
                f"{'-' if pooled is None else f'{pooled:.3f}'} | {r['train_loss_tail']:.4f} | "
                f"{'-' if gap is None else f'{gap:.2e}'} | {r['max_stage_process_rss_mb']:.0f} |"
            )
    return "\n".join(lines)


def result(bench: PipeliningBench, command: str, summary: dict, cfg: TrainConfig, machine: dict, run_dirs: str) -> dict:
    """The benchmark's JSON: the command that made it, the plan, ``summary``, the config's shape (``cfg``:
    resolved with the overrides every run shares), the machine and where the runs are kept."""
    methods = {r["ratio_to_torch"]["method"] for s in summary.values() for r in s.values() if "ratio_to_torch" in r}
    return {
        "command": command,
        "steps": bench.steps,
        "rounds": bench.rounds,
        "skipped": bench.skip,
        "interval_method": sorted(methods),
        "notes": list(NOTES),
        "results": summary,
        "config": {
            "files": bench.files,
            "d_model": cfg.model.d_model,
            "num_layers": cfg.model.num_layers,
            "num_stages": cfg.model.num_stages,
            "seq_len": cfg.model.seq_len,
            "microbatch_size": cfg.data.microbatch_size,
            "num_microbatches": cfg.pipeline.num_microbatches,
            "lr": cfg.optim.lr,
        },
        "machine": machine,
        "run_dirs": run_dirs,
    }


def page(result: dict) -> str:
    """The markdown page of a ``result``: the command, the plan and machine, the table and the notes."""
    machine = result["machine"]
    return (
        f"# Throughput against torch.distributed.pipelining\n\n`{result['command']}`\n\n"
        f"{result['steps']} steps x {result['rounds']} rounds, first {result['skipped']} steps of each run skipped; "
        f"{machine['cpus']} CPUs, torch {machine['torch']}; intervals: {', '.join(result['interval_method'])}.\n\n"
        f"{table(result['results'])}\n\n" + "".join(f"- {n}\n" for n in result["notes"])
    )
