"""Throughput against torch's own pipelining, every side measured in the same run, rounds interleaved.

Three sides train the same config (model, data, microbatches, sequence length, per-stage Adam at
``optim.lr`` with per-stage clipping), failure-free, one process per stage over gloo on this machine, for
``--steps`` steps under each schedule of ``--schedules``, in each of ``--rounds`` rounds (the order within a
round rotates, so drift on a shared machine falls on every side alike):

- ``torch``: ``torch.distributed.pipelining``: a ``PipelineStage`` per process around checkfree's own
  ``Stage`` (embedding on the first, head and loss on the last) under ``ScheduleGPipe`` / ``Schedule1F1B``,
  the loss of a microbatch divided by the number of microbatches as checkfree's (``scale_grads=False``);
- ``static``: checkfree's stage workers on one fixed gloo group, machinery off (``launcher/static.py``);
- ``swarm``: the local swarm, machinery on (DHT heartbeats, epochs, commit, edge replicas), no failures.

checkfree runs both schedules itself (``pipeline.schedule``: gpipe, all forwards then all backwards; 1f1b,
at most ``L - stage`` microbatches in flight, as ``Schedule1F1B``), so each schedule is compared like for
like; checkfree's sides take the plain route (``pipeline.swap=false``, ``recovery.strategy=checkfree``).
The torch side clips with ``clip_grad_norm_`` and steps; it has no commit all-reduce (checkfree's step has
one). Its step time is measured on the first stage, whose last backward ends every step, as the static
side's.

Reports per schedule and side the median tokens/s (first ``--skip`` steps of each run left out, pooled over
rounds), the ratios static/torch and swarm/torch as the geometric mean of the per-round ratios of medians
with a 95% t interval on their logarithms (a percentile bootstrap where scipy is absent; the JSON says
which), the ratio of the pooled medians, the training loss of the last ``--tail`` steps and the largest
loss gap to torch at equal steps (the sides train the same model on the same data, so it stays near float
rounding), and the largest resident memory of a stage process. Writes ``OUT/pipelining.json`` and
``OUT/pipelining.md``.

    python scripts/bench_pipelining.py [CONFIG.yaml ...] [key=value ...] [--steps 30] [--rounds 3]
        [--schedules gpipe 1f1b] [--out runs/bench/pipelining]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from checkfree.analysis.stats import bootstrap, fmt_interval
from checkfree.config import TrainConfig, load_config, split_args
from checkfree.core.data import Batches
from checkfree.core.metrics import peak_rss_mb, read_jsonl
from checkfree.core.model import Stage, init_stage_
from checkfree.core.schedule import KINDS
from checkfree.core.stage_step import make_optimizer
from launcher.local import run_local_swarm
from launcher.static import run_static_pipeline

SIDES = ("torch", "static", "swarm")
NOTES = (
    "checkfree runs both schedules itself; each torch schedule is compared with checkfree's of the same name",
    "checkfree's sides take the plain route (pipeline.swap=false, recovery.strategy=checkfree)",
    "the torch side has no commit all-reduce; checkfree's step has one (its commit point)",
    "tokens/s is timed on the first stage of each run (the swarm: on the stage its merged metrics keep)",
)
DEFAULT_CONFIG = "configs/bench.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``files`` and ``overrides`` are split out of the positional arguments, and the
    config defaults to ``configs/bench.yaml`` when no file is given."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of each run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps of each run left out of the medians")
    ap.add_argument("--tail", type=int, default=10, help="last steps averaged for the training loss")
    ap.add_argument("--schedules", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--out", default="runs/bench/pipelining", help="folder for pipelining.json and .md")
    ns = ap.parse_args(argv)
    if ns.steps <= ns.skip:
        ap.error(f"--steps {ns.steps} must exceed --skip {ns.skip}")
    if ns.rounds < 1:
        ap.error(f"--rounds {ns.rounds} must be >= 1")
    ns.files, ns.overrides = split_args(ns.args)
    ns.files = ns.files or [DEFAULT_CONFIG]
    return ns


def ratio_interval(ours: list[float], theirs: list[float], level: float = 0.95) -> dict:
    """Geometric mean of the paired per-round ratios ``ours[r] / theirs[r]`` and its interval: a t interval
    on the log ratios (scipy's t quantile), or a percentile bootstrap of their mean where scipy is absent.
    One round gives the estimate and no interval (``low`` = ``high`` = None)."""
    logs = np.log(np.asarray(ours, dtype=float) / np.asarray(theirs, dtype=float))
    n = int(logs.size)
    out = {"estimate": float(np.exp(logs.mean())), "low": None, "high": None, "n": n, "level": level}
    if n < 2:
        return {**out, "method": "one round: no interval"}
    try:
        from scipy.stats import t
    except ImportError:
        iv = bootstrap(logs, level=level)
        return {**out, "low": math.exp(iv.low), "high": math.exp(iv.high), "method": "percentile bootstrap"}
    half = float(t.ppf((1 + level) / 2, n - 1)) * float(logs.std(ddof=1)) / math.sqrt(n)
    low, high = math.exp(logs.mean() - half), math.exp(logs.mean() + half)
    return {**out, "low": low, "high": high, "method": "t interval on per-round log ratios"}


# ---- the torch side -----------------------------------------------------------------------------------


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
    timeout = timedelta(seconds=cfg.transport.rendezvous_timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, L + 1, is_master=True, wait_for_workers=False, timeout=timeout)
    ctx = mp.get_context("spawn")
    args = [(cfg, kind, s, store.port, str(out_dir), threads) for s in range(L)]
    procs = [ctx.Process(target=_torch_stage_main, args=a, daemon=True) for a in args]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        bad = [(s, p.exitcode) for s, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"torch pipelining: stages (stage, exit code) {bad} failed or timed out; see {out_dir}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    del store
    return [read_jsonl(out_dir / f"stage-{s}.jsonl") for s in range(L)]


# ---- running the sides ----------------------------------------------------------------------------------


def _run_side(side: str, kind: str, ns: argparse.Namespace, common: list[str], tmp: Path, rnd: int):
    """One run; returns its per-step records (tokens/s from the timing stage, loss from the last) and the
    largest resident memory (MB) of its stage processes."""
    name = f"{side}-{kind}-r{rnd}"
    extra = [f"pipeline.schedule={kind}", "pipeline.swap=false", "recovery.strategy=checkfree", f"run_name={name}"]
    cfg = load_config(ns.files, [*common, *extra])
    if side in ("torch", "static"):
        stages = run_torch_pipeline(cfg, kind, tmp / name) if side == "torch" else run_static_pipeline(cfg, tmp / name)
        loss = {r["step"]: r["loss/train"] for r in stages[-1]}
        rows = [{**r, "loss/train": loss[r["step"]]} for r in stages[0]]
        return rows, max(r["memory/max_rss_mb"] for s in stages for r in s)
    code, _ = run_local_swarm(cfg, tmp / name, status=False)
    if code != 0:
        raise SystemExit(f"the swarm ({kind}) exited with {code}; see {tmp / name}")
    peers = (tmp / name / "peers").glob("*/metrics.jsonl")
    rss = [m["memory/max_rss_mb"] for f in peers for m in read_jsonl(f) if "memory/max_rss_mb" in m]
    return [m for m in read_jsonl(tmp / name / "metrics.jsonl") if "loss/train" in m], max(rss)


def _common_overrides(ns: argparse.Namespace, tmp: Path) -> list[str]:
    return [
        *ns.overrides,
        f"num_steps={ns.steps}",
        "failures.mode=none",
        "eval_every_steps=0",
        "progress=false",
        "plot=false",
        f"out_dir={tmp}",
        "swarm.num_spares=0",
    ]


def measure(ns: argparse.Namespace) -> dict:
    """Every (schedule, side) run of every round; returns per (schedule, side): per-round medians, pooled
    tokens/s, per-step losses, largest RSS, wall seconds of each run."""
    tmp = Path(tempfile.mkdtemp(prefix="cf-pipelining-"))
    common = _common_overrides(ns, tmp)
    runs = [(kind, side) for kind in ns.schedules for side in ns.sides]
    data = {r: {"rates": [], "per_round": [], "losses": [], "rss": [], "wall_s": []} for r in runs}
    for rnd in range(ns.rounds):
        for kind, side in runs[rnd % len(runs) :] + runs[: rnd % len(runs)]:
            t0 = time.monotonic()
            rows, peak = _run_side(side, kind, ns, common, tmp, rnd)
            d = data[(kind, side)]
            d["wall_s"].append(time.monotonic() - t0)
            rates = [r["throughput/tokens_per_s"] for r in rows[ns.skip :]]
            d["rates"] += rates
            d["per_round"].append(statistics.median(rates))
            d["losses"].append({r["step"]: r["loss/train"] for r in rows})
            d["rss"].append(peak)
            rate, wall = d["per_round"][-1], d["wall_s"][-1]
            print(f"round {rnd} {kind:5s} {side:6s} median tokens/s {rate:9.0f}  run {wall:.0f} s", flush=True)
    return {"data": data, "run_dirs": str(tmp)}


def _loss_gap(ours: list[dict], theirs: list[dict]) -> float | None:
    """Largest |loss difference| at equal steps, over rounds (the runs are seeded alike)."""
    gaps = [abs(a[s] - b[s]) for a, b in zip(ours, theirs) for s in a if s in b and None not in (a[s], b[s])]
    return max(gaps, default=None)


def summarise(data: dict, ns: argparse.Namespace) -> dict:
    """Medians, ratios to torch with intervals, losses and memory per schedule and side."""
    out: dict = {}
    for (kind, side), d in data.items():
        torch_d = data.get((kind, "torch"))
        tail = [statistics.mean(list(losses.values())[-ns.tail :]) for losses in d["losses"]]
        row = {
            "median_tokens_per_s": statistics.median(d["rates"]),
            "per_round_median_tokens_per_s": d["per_round"],
            "train_loss_tail": statistics.mean(tail),
            "max_stage_process_rss_mb": max(d["rss"]),
            "run_wall_s": d["wall_s"],  # a whole run: start-up, steps, shutdown
        }
        if torch_d is not None and side != "torch":
            row["ratio_to_torch"] = ratio_interval(d["per_round"], torch_d["per_round"])
            row["ratio_of_pooled_medians"] = row["median_tokens_per_s"] / statistics.median(torch_d["rates"])
            row["max_abs_loss_gap_to_torch"] = _loss_gap(d["losses"], torch_d["losses"])
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


def _result(ns: argparse.Namespace, measured: dict, summary: dict) -> dict:
    cfg = load_config(ns.files, _common_overrides(ns, Path(measured["run_dirs"])))
    methods = {r["ratio_to_torch"]["method"] for s in summary.values() for r in s.values() if "ratio_to_torch" in r}
    return {
        "command": shlex.join(["python", "scripts/bench_pipelining.py", *sys.argv[1:]]),
        "steps": ns.steps,
        "rounds": ns.rounds,
        "skipped": ns.skip,
        "interval_method": sorted(methods),
        "notes": list(NOTES),
        "results": summary,
        "config": {
            "files": ns.files,
            "d_model": cfg.model.d_model,
            "num_layers": cfg.model.num_layers,
            "num_stages": cfg.model.num_stages,
            "seq_len": cfg.model.seq_len,
            "microbatch_size": cfg.data.microbatch_size,
            "num_microbatches": cfg.pipeline.num_microbatches,
            "lr": cfg.optim.lr,
        },
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "run_dirs": measured["run_dirs"],
    }


def main() -> None:
    ns = parse_args()
    measured = measure(ns)
    summary = summarise(measured["data"], ns)
    result = _result(ns, measured, summary)
    text = table(summary)
    print(text)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipelining.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "pipelining.md").write_text(
        f"# Throughput against torch.distributed.pipelining\n\n`{result['command']}`\n\n"
        f"{ns.steps} steps x {ns.rounds} rounds, first {ns.skip} steps of each run skipped; {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}; intervals: {', '.join(result['interval_method'])}.\n\n{text}\n\n"
        + "".join(f"- {n}\n" for n in NOTES)
    )


if __name__ == "__main__":
    main()
