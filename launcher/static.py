"""
Static pipeline
===============

The swarm's stage workers and schedules, one OS process per stage, with the fault-tolerance machinery
off: one gloo group formed once through a TCP store this launcher hosts, no DHT, no heartbeats, no
epochs, no spares, no recovery (a lost stage ends the run with an error). Each stage process runs the
same ``StageWorker.run_step`` / ``commit`` as a swarm peer and logs the same per-step record, so the
two can be compared step for step: this is the "machinery off" side of ``scripts/bench_overhead.py``
and the baseline of ``scripts/bench_scaling.py``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from checkfree.config import TrainConfig
from checkfree.core.data import Batches
from checkfree.core.metrics import peak_rss_mb, read_jsonl
from checkfree.core.model import Stage, init_stage_
from checkfree.core.schedule import schedule_for
from checkfree.swarm.config import config_fingerprint
from checkfree.swarm.transport import EpochGroup
from checkfree.swarm.worker import StageWorker


def _stage_main(cfg: TrainConfig, stage: int, port: int, out_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    L = cfg.model.num_stages
    module = Stage(cfg.model, stage)
    init_stage_(module, cfg.model, cfg.seed)
    batches = Batches(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.seed)
    worker = StageWorker.for_config(cfg, module, schedule_for(cfg.pipeline, L, cfg.swap_enabled), batches)
    store = dist.TCPStore(
        "127.0.0.1", port, L + 1, is_master=False, timeout=timedelta(seconds=cfg.transport.rendezvous_timeout_s)
    )
    group = EpochGroup(
        store, 0, stage, list(range(L)), cfg.transport, run_tag=int(config_fingerprint(cfg)[:6], 16), device=cfg.device
    )
    tokens = batches.tokens_per_microbatch() * cfg.pipeline.num_microbatches
    with open(Path(out_dir) / f"stage-{stage}.jsonl", "w") as f:
        for step in range(cfg.num_steps):
            t0 = time.monotonic()
            worker.run_step(group, step)
            loss = worker.commit(group, step)
            step_s = time.monotonic() - t0
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss/train": loss,
                        "time/step_s": step_s,
                        "throughput/tokens_per_s": tokens / step_s,
                        "stage": stage,
                        "memory/max_rss_mb": peak_rss_mb(),
                    }
                )
                + "\n"
            )
        group.all_reduce(torch.zeros(1, dtype=torch.float64), cfg.num_steps)  # nobody leaves before the last read


def run_static_pipeline(cfg: TrainConfig, out_dir: str | Path, timeout_s: float = 600.0) -> list[list[dict]]:
    """Train ``cfg.num_steps`` steps on a fixed pipeline of ``cfg.model.num_stages`` processes; returns
    each stage's per-step records (also written to ``out_dir/stage-K.jsonl``).

    Raises:
        RuntimeError: a stage process failed or the run exceeded ``timeout_s`` (every process is ended).
    """
    L = cfg.model.num_stages
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // L)  # the local swarm's share, for a fair match
    stage_args = lambda port: [(cfg, s, port, str(out_dir), threads) for s in range(L)]
    run_stage_processes("static pipeline", cfg, stage_args, _stage_main, out_dir, timeout_s)
    return [read_jsonl(out_dir / f"stage-{s}.jsonl") for s in range(L)]


def run_stage_processes(
    what: str,
    cfg: TrainConfig,
    args_for: Callable[[int], list[tuple]],
    target: Callable[..., None],
    out_dir: Path,
    timeout_s: float,
) -> None:
    """Start one spawned process per stage on ``target`` (``args_for(store_port)``: each one's arguments,
    around a TCPStore they rendezvous on) and wait for all of them.

    Raises:
        RuntimeError: a stage process failed or they ran past ``timeout_s`` (every process is ended).
    """
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        cfg.model.num_stages + 1,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=cfg.transport.rendezvous_timeout_s),
    )
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=a, daemon=True) for a in args_for(store.port)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        bad = [(s, p.exitcode) for s, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(
                f"{what}: stages (stage, exit code) {bad} failed or ran past {timeout_s} s; see {out_dir}"
            )
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    del store
