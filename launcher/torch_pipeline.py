"""
Torch pipeline
==============

The reference that ``scripts/bench_pipelining.py`` measures checkfree against: ``torch.distributed.pipelining``
training the same config, one OS process per stage over gloo on this machine, through a TCP store this
launcher hosts (``run_torch_pipeline``). Each process wraps checkfree's own ``Stage`` in a ``PipelineStage``
(``TorchStage``: embedding on the first, head on the last) under ``ScheduleGPipe`` / ``Schedule1F1B``, with the
loss of a microbatch divided by the number of microbatches as checkfree's (``microbatch_loss``,
``scale_grads=False``), per-stage clipping with ``clip_grad_norm_`` and per-stage Adam; no commit all-reduce.
Each stage logs the per-step record ``launcher/static.py`` logs, timed the same way.

``measure`` runs the benchmark: every side (this one, the static pipeline, the local swarm) under every
schedule, round after round, and folds each run into ``checkfree.analysis.pipelining``'s data.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from checkfree.analysis.pipelining import PipeliningBench, add_run, empty_data
from checkfree.config import TrainConfig, load_config
from checkfree.core.data import Batches
from checkfree.core.metrics import peak_rss_mb, read_jsonl
from checkfree.core.model import Stage, init_stage_
from checkfree.core.stage_step import make_optimizer
from launcher.local import run_local_swarm
from launcher.static import run_stage_processes, run_static_pipeline


class TorchStage(nn.Module):
    """checkfree's ``Stage`` as one ``PipelineStage`` module: the plain route's hop of that stage (embedding
    on the first, blocks, final norm and head on the last); the loss is ``microbatch_loss``."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage.run_embed(x) if self.stage.embed is not None else x  # (B, T) -> (B, T, C)
        h = self.stage.run_blocks(h)
        return self.stage.run_head(h) if self.stage.head is not None else h  # (B, T, V) on the last


def microbatch_loss(logits: torch.Tensor, targets: torch.Tensor, num_microbatches: int) -> torch.Tensor:
    """A microbatch's loss as checkfree's last hop computes it: mean cross-entropy / number of microbatches."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) / num_microbatches


def stacked(read, step: int, num_microbatches: int) -> torch.Tensor:
    """A step's microbatches (``read``: ``Batches.inputs`` or ``Batches.targets``) stacked on the batch
    dimension, ``(M*B, T)``: torch's schedule splits them back into the same microbatches, in order."""
    return torch.cat([read(step, m) for m in range(num_microbatches)])


def _pipeline_stage(cfg: TrainConfig, stage: int, wrapped: TorchStage) -> PipelineStage:
    L, B, T = cfg.model.num_stages, cfg.data.microbatch_size, cfg.model.seq_len
    C, V = cfg.model.d_model, cfg.model.vocab_size
    # shapes given up front, so no shape-inference round trip runs in the first step; an activation's example
    # must require grad: torch derives from that flag whether a gradient comes back (else backward gets None)
    act = torch.zeros(B, T, C, requires_grad=True)
    example_in = torch.zeros(B, T, dtype=torch.long) if stage == 0 else act
    example_out = torch.zeros(B, T, V, requires_grad=True) if stage == L - 1 else act
    return PipelineStage(wrapped, stage, L, torch.device(cfg.device), input_args=example_in, output_args=example_out)


def _torch_step(
    schedule: ScheduleGPipe | Schedule1F1B,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    cfg: TrainConfig,
    stage: int,
    step: int,
) -> float | None:
    """One step of one stage: the schedule's forwards and backwards, per-stage clipping, the optimizer; returns
    the step's loss on the last stage (None elsewhere)."""
    first, last, M = stage == 0, stage == cfg.model.num_stages - 1, cfg.pipeline.num_microbatches
    args = (stacked(batches.inputs, step, M),) if first else ()
    targets = stacked(batches.targets, step, M) if last else None
    losses: list[torch.Tensor] | None = [] if last else None
    schedule.step(*args, target=targets, losses=losses, return_outputs=False)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or math.inf, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(sum(x.item() for x in losses)) if last else None


def _torch_stage_main(cfg: TrainConfig, kind: str, stage: int, port: int, out_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    L, M = cfg.model.num_stages, cfg.pipeline.num_microbatches
    timeout = timedelta(seconds=cfg.transport.rendezvous_timeout_s)
    store = dist.TCPStore("127.0.0.1", port, L + 1, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=stage, world_size=L, timeout=timeout)
    module = Stage(cfg.model, stage)
    init_stage_(module, cfg.model, cfg.seed)
    optimizer = make_optimizer(module, cfg.optim, cfg.optim.lr)
    batches = Batches(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.seed)
    schedule_cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
    loss_fn = partial(microbatch_loss, num_microbatches=M)
    schedule = schedule_cls(_pipeline_stage(cfg, stage, TorchStage(module)), M, loss_fn=loss_fn, scale_grads=False)
    tokens = batches.tokens_per_microbatch() * M
    with open(Path(out_dir) / f"stage-{stage}.jsonl", "w") as f:
        for step in range(cfg.num_steps):
            t0 = time.monotonic()
            loss = _torch_step(schedule, optimizer, batches, cfg, stage, step)
            step_s = time.monotonic() - t0
            record = {
                "step": step,
                "loss/train": loss,
                "time/step_s": step_s,
                "throughput/tokens_per_s": tokens / step_s,
            }
            f.write(json.dumps({**record, "stage": stage, "memory/max_rss_mb": peak_rss_mb()}) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def run_torch_pipeline(cfg: TrainConfig, kind: str, out_dir: Path, timeout_s: float = 600.0) -> list[list[dict]]:
    """Train ``cfg.num_steps`` steps with ``torch.distributed.pipelining`` under ``kind``, one process per
    stage; returns each stage's per-step records (the last stage's carry the loss).

    Raises:
        RuntimeError: a stage process failed or the run exceeded ``timeout_s`` (every process is ended).
    """
    L = cfg.model.num_stages
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // L)  # the static side's share
    stage_args = lambda port: [(cfg, kind, s, port, str(out_dir), threads) for s in range(L)]
    run_stage_processes("torch pipelining", cfg, stage_args, _torch_stage_main, out_dir, timeout_s)
    return [read_jsonl(out_dir / f"stage-{s}.jsonl") for s in range(L)]


# ---- running the sides ----------------------------------------------------------------------------------


def _run_side(side: str, kind: str, bench: PipeliningBench, common: list[str], tmp: Path, rnd: int):
    """One run; returns its per-step records (tokens/s from the timing stage, loss from the last) and the
    largest resident memory (MB) of its stage processes."""
    name = f"{side}-{kind}-r{rnd}"
    extra = [f"pipeline.schedule={kind}", "pipeline.swap=false", "recovery.strategy=checkfree", f"run_name={name}"]
    cfg = load_config(bench.files, [*common, *extra])
    if side in ("torch", "static"):
        stages = run_torch_pipeline(cfg, kind, tmp / name) if side == "torch" else run_static_pipeline(cfg, tmp / name)
        loss = {r["step"]: r["loss/train"] for r in stages[-1]}
        rows = [{**r, "loss/train": loss[r["step"]]} for r in stages[0]]
        return rows, max(r["memory/max_rss_mb"] for s in stages for r in s)
    code, _ = run_local_swarm(cfg, tmp / name, status=False)
    if code != 0:
        raise RuntimeError(f"the swarm ({kind}) exited with {code}; see {tmp / name}")
    peers = (tmp / name / "peers").glob("*/metrics.jsonl")
    rss = [m["memory/max_rss_mb"] for f in peers for m in read_jsonl(f) if "memory/max_rss_mb" in m]
    return [m for m in read_jsonl(tmp / name / "metrics.jsonl") if "loss/train" in m], max(rss)


def measure(bench: PipeliningBench, say: Callable[[str], None] = print) -> dict:
    """Every (schedule, side) run of every round, in a fresh temporary folder; returns ``data`` (as
    ``checkfree.analysis.pipelining.empty_data``, filled) and ``run_dirs`` (that folder). One line per run
    goes to ``say``.

    Raises:
        RuntimeError: a torch or static stage process failed or timed out, or the swarm exited non-zero.
    """
    tmp = Path(tempfile.mkdtemp(prefix="cf-pipelining-"))
    common = bench.common_overrides(tmp)
    data = empty_data(bench)
    for rnd in range(bench.rounds):
        for kind, side in bench.order(rnd):
            t0 = time.monotonic()
            rows, peak = _run_side(side, kind, bench, common, tmp, rnd)
            d = data[(kind, side)]
            add_run(d, rows, peak, time.monotonic() - t0, bench.skip)
            rate, wall = d["per_round"][-1], d["wall_s"][-1]
            say(f"round {rnd} {kind:5s} {side:6s} median tokens/s {rate:9.0f}  run {wall:.0f} s")
    return {"data": data, "run_dirs": str(tmp)}


def machine() -> dict:
    """The machine a measurement ran on, as the result records it."""
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
