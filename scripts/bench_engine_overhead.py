"""Step time of the single-process pipeline engine against the same model trained unsplit.

Both train the same model (same init, same microbatches, Adam, clipping at 1.0: per stage for the
engine, global for the unsplit model) in one process, interleaved in rounds so that machine noise hits
both alike. Prints and saves the median step times and their ratio (engine / unsplit).

    python scripts/bench_engine_overhead.py [CONFIG.yaml ...] [key=value ...] [--steps N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from checkfree.config import load_config, split_args
from checkfree.core.data import Batches
from checkfree.core.metrics import report
from checkfree.core.model import build_stages
from checkfree.core.schedule import schedule_for
from checkfree.engine.pipeline import PipelineEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="runs/bench/engine_overhead.json")
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    cfg = load_config(files, ["failures.mode=none", "recovery.strategy=none", *overrides])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    batches = Batches(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.seed)
    engine = PipelineEngine(
        build_stages(cfg.model, cfg.seed),
        schedule_for(cfg.pipeline, cfg.model.num_stages, cfg.swap_enabled),
        batches,
        cfg.optim,
    )
    (whole,) = build_stages(cfg.model, cfg.seed, num_stages=1)
    opt = torch.optim.Adam(
        whole.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, foreach=True
    )
    M = cfg.pipeline.num_microbatches

    def unsplit_step(step: int) -> None:
        for mb in range(M):
            logits = whole.run_head(whole.run_blocks(whole.run_embed(batches.inputs(step, mb))))
            (F.cross_entropy(logits.flatten(0, 1), batches.targets(step, mb).flatten()) / M).backward()
        torch.nn.utils.clip_grad_norm_(whole.parameters(), cfg.optim.grad_clip or float("inf"), foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def engine_step(step: int) -> None:
        engine.run_step(step)
        engine.commit()

    times: dict[str, list[float]] = {"engine": [], "unsplit": []}
    for fn in (engine_step, unsplit_step):  # warm-up
        fn(0)
    step = 1
    for _ in range(ns.rounds):
        for name, fn in (("engine", engine_step), ("unsplit", unsplit_step)):
            for _ in range(ns.steps):
                t0 = time.perf_counter()
                fn(step)
                times[name].append(time.perf_counter() - t0)
                step += 1
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": {
            "d_model": cfg.model.d_model,
            "num_layers": cfg.model.num_layers,
            "num_stages": cfg.model.num_stages,
            "schedule": cfg.pipeline.schedule,
            "num_microbatches": M,
            "swap": cfg.swap_enabled,
            "threads": torch.get_num_threads(),
        },
        "median_step_s": med,
        "ratio_engine_over_unsplit": med["engine"] / med["unsplit"],
        "steps_per_side": len(times["engine"]),
    }
    report(result, ns.out)


if __name__ == "__main__":
    main()
