"""Scaling of the swarm: step time against the number of stages and of microbatches, beside the
pipeline's theoretical bounds, and the memory of each peer.

For every (stages, microbatches) pair: the single-process engine runs the config first, on one torch
thread like each peer here, and gives the compute time of one microbatch on one stage, forward and
backward (``t_slot`` = engine step time / (M * L): the engine runs the M * L slots one after another);
then a failure-free local swarm runs it (each peer on max(1, cores // L) threads).
The bounds for a step:

- ``pipeline_bound_s`` = (M + L - 1) * t_slot: a perfect GPipe/1F1B pipeline on L machines (its bubble
  fraction is (L - 1) / (M + L - 1));
- ``machine_bound_s`` = max(pipeline bound, M * L * t_slot / cores): on this machine the L peers share
  ``cores`` cores, so the pipeline cannot run faster than the total work divided by the cores.

Reports the swarm's median step time (first ``--skip`` steps left out), its ratio to each bound, tokens/s,
and the largest resident memory of any peer process (the stage process; the DHT runs in a child process).

    python scripts/bench_scaling.py [CONFIG.yaml ...] [key=value ...] [--stages 2 4 8] [--microbatches 1 2 4 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from checkfree.config import load_config, split_args
from checkfree.core.metrics import read_jsonl, report
from checkfree.engine.trainer import Trainer
from checkfree.plot import save_figure
from launcher.local import run_local_swarm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--out", default="runs/bench/scaling.json")
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    tmp = Path(tempfile.mkdtemp(prefix="cf-scaling-"))
    cores = os.cpu_count() or 1
    rows = []
    for L in ns.stages:
        for M in ns.microbatches:
            name = f"L{L}-M{M}"
            common = [
                *overrides,
                f"model.num_stages={L}",
                f"pipeline.num_microbatches={M}",
                f"num_steps={ns.steps}",
                "failures.mode=none",
                "eval_every_steps=0",
                "progress=false",
                "plot=false",
                f"out_dir={tmp}",
                "swarm.num_spares=0",
            ]
            if L < 4:
                common.append("recovery.strategy=checkfree")  # CheckFree+ needs 4 stages
            engine_cfg = load_config(files, [*common, f"run_name={name}-engine", "num_threads=1"])
            Trainer(engine_cfg).run()
            engine_step = statistics.median(
                m["time/step_s"] for m in read_jsonl(tmp / f"{name}-engine" / "metrics.jsonl")[ns.skip :]
            )
            cfg = load_config(files, [*common, f"run_name={name}-swarm"])
            code, _ = run_local_swarm(cfg, tmp / f"{name}-swarm", status=False)
            if code != 0:
                raise SystemExit(f"swarm {name} exited with {code}; see {tmp / (name + '-swarm')}")
            metrics = [m for m in read_jsonl(tmp / f"{name}-swarm" / "metrics.jsonl") if "loss/train" in m]
            step = statistics.median(m["time/step_s"] for m in metrics[ns.skip :])
            rss = [
                m["memory/max_rss_mb"]
                for f in (tmp / f"{name}-swarm" / "peers").glob("*/metrics.jsonl")
                for m in read_jsonl(f)
                if "memory/max_rss_mb" in m
            ]
            t_slot = engine_step / (M * L)
            pipeline_bound = (M + L - 1) * t_slot
            machine_bound = max(pipeline_bound, M * L * t_slot / cores)
            row = {
                "stages": L,
                "microbatches": M,
                "swarm_step_s": step,
                "engine_step_s": engine_step,
                "t_slot_s": t_slot,
                "bubble_fraction": (L - 1) / (M + L - 1),
                "pipeline_bound_s": pipeline_bound,
                "machine_bound_s": machine_bound,
                "over_pipeline_bound": step / pipeline_bound,
                "over_machine_bound": step / machine_bound,
                "swarm_tokens_per_s": statistics.median(m["throughput/tokens_per_s"] for m in metrics[ns.skip :]),
                "max_peer_rss_mb": max(rss) if rss else None,
            }
            row["peer_threads"] = max(1, cores // L)
            rows.append(row)
            print(
                f"L={L} M={M}: swarm step {step:.3f} s, engine {engine_step:.3f} s, bounds pipeline "
                f"{pipeline_bound:.3f} / machine {machine_bound:.3f} s -> x{row['over_machine_bound']:.2f}; "
                f"peer RSS {row['max_peer_rss_mb']:.0f} MB",
                flush=True,
            )
    _plot(rows, Path(ns.out).with_suffix(".png"))
    cfg = load_config(files, overrides)
    report(
        {
            "rows": rows,
            "cores": cores,
            "steps": ns.steps,
            "skipped": ns.skip,
            "run_dirs": str(tmp),
            "config": {
                "d_model": cfg.model.d_model,
                "num_layers": cfg.model.num_layers,
                "seq_len": cfg.model.seq_len,
                "microbatch_size": cfg.data.microbatch_size,
                "schedule": cfg.pipeline.schedule,
            },
        },
        ns.out,
    )


def _plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for L in sorted({r["stages"] for r in rows}):
        rs = [r for r in rows if r["stages"] == L]
        ms = [r["microbatches"] for r in rs]
        (line,) = axes[0].plot(ms, [r["swarm_step_s"] for r in rs], "o-", label=f"swarm, {L} stages")
        axes[0].plot(ms, [r["machine_bound_s"] for r in rs], "--", color=line.get_color(), label=f"machine bound, {L}")
        axes[0].plot(ms, [r["pipeline_bound_s"] for r in rs], ":", color=line.get_color(), label=f"pipeline bound, {L}")
        axes[1].plot(ms, [r["max_peer_rss_mb"] for r in rs], "o-", label=f"{L} stages")
    axes[0].set(xlabel="microbatches per step", ylabel="step time (s)", xscale="log", yscale="log")
    axes[1].set(xlabel="microbatches per step", ylabel="largest peer RSS (MB)", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
