"""Overhead without failures, every side measured in the same run, rounds interleaved.

Five sides train the same config for ``--steps`` steps, failure-free, in each of ``--rounds`` rounds
(the order within a round rotates, so drift on a shared machine falls on every side alike):

- ``swarm``: the local swarm, plain route (one process per stage, DHT heartbeats, epochs, norm
  tracking at the commit, edge-replica refreshes: the fault-tolerance machinery on);
- ``static``: the same stage workers in one process per stage on one fixed gloo group, machinery off
  (``launcher/static.py``);
- ``swarm_swap``: the swarm with the CheckFree+ swapped schedule;
- ``swarm_redundant``: the swarm with redundant computation (every peer also trains a shadow of the
  next stage): what Bamboo-style redundancy costs in time and memory, measured;
- ``engine`` and ``engine_swap``: the single-process engine, plain and swapped.

Reports the median tokens/s of each side (first ``--skip`` steps of each run left out, pooled over
rounds) and the ratios: machinery on/off (swarm/static), swapped/plain (swarm and engine), redundant/plain
(swarm), swarm/engine; the largest resident memory of a stage process per side; and, at equal steps, the
training loss (mean of the last ``--tail`` steps) and the final validation loss of the engine's plain and
swapped runs.

    python scripts/bench_overhead.py [CONFIG.yaml ...] [key=value ...] [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from checkfree.config import load_config, split_args
from checkfree.core.metrics import read_jsonl, report
from checkfree.engine.trainer import Trainer
from launcher.local import run_local_swarm
from launcher.static import run_static_pipeline

SIDES = ("swarm", "static", "swarm_swap", "swarm_redundant", "engine", "engine_swap")


def _run_side(side: str, files, common: list[str], tmp: Path, rnd: int) -> tuple[list[dict], float | None]:
    """One run of one side; returns its per-step records (tokens/s, loss) in step order and the largest
    resident memory (MB) of any of its stage processes (None for the engine: it runs in this process)."""
    name = f"{side}-r{rnd}"
    # the plain route is CheckFree without the swap (checkfree_plus refuses swap=false)
    extra = ["pipeline.swap=true"] if side.endswith("_swap") else ["pipeline.swap=false", "recovery.strategy=checkfree"]
    if side == "swarm_redundant":
        extra.append("recovery.strategy=redundant")
    cfg = load_config(files, [*common, *extra, f"run_name={name}"])
    if side == "static":
        records = run_static_pipeline(cfg, tmp / name)
        return records[0], max(r["memory/max_rss_mb"] for stage in records for r in stage)
    if side.startswith("swarm"):
        code, _ = run_local_swarm(cfg, tmp / name, status=False)
        if code != 0:
            raise SystemExit(f"the swarm of side {side} exited with {code}; see {tmp / name}")
        rss = [
            m["memory/max_rss_mb"]
            for f in (tmp / name / "peers").glob("*/metrics.jsonl")
            for m in read_jsonl(f)
            if "memory/max_rss_mb" in m
        ]
        return [m for m in read_jsonl(tmp / name / "metrics.jsonl") if "loss/train" in m], max(rss)
    Trainer(cfg).run()
    return read_jsonl(tmp / name / "metrics.jsonl"), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps of each run left out of the medians")
    ap.add_argument("--tail", type=int, default=10, help="last steps averaged for the training loss")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--out", default="runs/bench/overhead.json")
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    tmp = Path(tempfile.mkdtemp(prefix="cf-overhead-"))
    common = [
        *overrides,
        f"num_steps={ns.steps}",
        "failures.mode=none",
        "eval_every_steps=0",
        "progress=false",
        "plot=false",
        f"out_dir={tmp}",
        "swarm.num_spares=0",
    ]
    tokens: dict[str, list[float]] = {s: [] for s in ns.sides}
    per_round: dict[str, list[float]] = {s: [] for s in ns.sides}
    losses: dict[str, list[dict]] = {s: [] for s in ns.sides}
    rss: dict[str, list[float | None]] = {s: [] for s in ns.sides}
    for rnd in range(ns.rounds):
        order = ns.sides[rnd % len(ns.sides) :] + ns.sides[: rnd % len(ns.sides)]
        for side in order:
            rows, peak = _run_side(side, files, common, tmp, rnd)
            rss[side].append(peak)
            train = [r for r in rows if "loss/train" in r]
            rates = [r["throughput/tokens_per_s"] for r in train[ns.skip :]]
            tokens[side] += rates
            per_round[side].append(statistics.median(rates))
            vals = [r["loss/val"] for r in rows if "loss/val" in r]
            losses[side].append(
                {
                    "train_tail": statistics.mean(r["loss/train"] for r in train[-ns.tail :]),
                    "val_final": vals[-1] if vals else None,
                }
            )
            print(
                f"round {rnd} {side:11s} median tokens/s {per_round[side][-1]:9.0f}  train loss (last {ns.tail}) "
                f"{losses[side][-1]['train_tail']:.4f}",
                flush=True,
            )
    med = {s: statistics.median(v) for s, v in tokens.items()}

    def ratio(a: str, b: str) -> float | None:
        return med[a] / med[b] if a in med and b in med else None

    result = {
        "steps": ns.steps,
        "rounds": ns.rounds,
        "skipped": ns.skip,
        "median_tokens_per_s": med,
        "per_round_median_tokens_per_s": per_round,
        "losses": losses,
        "max_stage_process_rss_mb": {s: max((x for x in v if x is not None), default=None) for s, v in rss.items()},
        "ratios": {
            "machinery_on_over_off": ratio("swarm", "static"),
            "swap_over_plain_swarm": ratio("swarm_swap", "swarm"),
            "swap_over_plain_engine": ratio("engine_swap", "engine"),
            "redundant_over_plain_swarm": ratio("swarm_redundant", "swarm"),
            "swarm_over_engine": ratio("swarm", "engine"),
        },
        "run_dirs": str(tmp),
    }
    cfg = load_config(files, common)
    result["config"] = {
        "d_model": cfg.model.d_model,
        "num_layers": cfg.model.num_layers,
        "num_stages": cfg.model.num_stages,
        "schedule": cfg.pipeline.schedule,
        "num_microbatches": cfg.pipeline.num_microbatches,
        "swap_fraction": cfg.pipeline.swap_fraction,
        "strategy": cfg.recovery.strategy,
    }
    report(result, ns.out)


if __name__ == "__main__":
    main()
