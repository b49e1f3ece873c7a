"""Failure-free throughput of the multi-process swarm against the single-process engine, same config.

Runs the engine (``Trainer``) and then a local swarm (one process per stage, heartbeats and DHT on,
no failures, no spares) for the same number of steps, one after the other in this one command, and
reports the median tokens/s of each (first ``--skip`` steps excluded) and their ratio.

    python scripts/bench_swarm_vs_engine.py [CONFIG.yaml ...] [key=value ...] [--steps N] [--skip K]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from checkfree.config import load_config, split_args
from checkfree.metrics import read_jsonl, report
from checkfree.trainer import Trainer
from launcher.local import run_local_swarm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    ap.add_argument("--out", default="runs/bench/swarm_vs_engine.json")
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    tmp = Path(tempfile.mkdtemp(prefix="cf-bench-"))
    common = [*overrides, f"num_steps={ns.steps}", "failures.mode=none", "eval_every_steps=0", "progress=false",
              "plot=false", f"out_dir={tmp}", "swarm.num_spares=0"]
    engine_cfg = load_config(files, [*common, "run_name=engine"])
    Trainer(engine_cfg).run()
    swarm_cfg = load_config(files, [*common, "run_name=swarm"])
    code, _ = run_local_swarm(swarm_cfg, tmp / "swarm", status=False)
    if code != 0:
        raise SystemExit(f"the swarm exited with {code}; see {tmp / 'swarm'}")
    rates = {}
    for name in ("engine", "swarm"):
        rows = read_jsonl(tmp / name / "metrics.jsonl")[ns.skip:]
        rates[name] = statistics.median(r["throughput/tokens_per_s"] for r in rows)
    result = {"steps": ns.steps, "skipped": ns.skip, "median_tokens_per_s": rates,
              "ratio_swarm_over_engine": rates["swarm"] / rates["engine"], "run_dirs": str(tmp),
              "config": {"d_model": engine_cfg.model.d_model, "num_stages": engine_cfg.model.num_stages,
                         "schedule": engine_cfg.pipeline.schedule, "swap": engine_cfg.swap_enabled}}
    report(result, ns.out)


if __name__ == "__main__":
    main()
