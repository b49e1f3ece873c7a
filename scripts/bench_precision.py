"""fp32 against bf16 mixed precision (``precision=bf16``) in the single-process engine, and the bytes a swarm stage
sends per step at each.

For every seed an fp32 and a bf16 engine train the same model on the same batches in lockstep, one step each in
turn (which goes first alternates), so machine noise hits both alike. Per run: the median of its per-step
tokens/s (the first ``--warmup`` steps left out), the mean training loss of the last ``--last`` steps and the
validation loss at the end. Across seeds, paired by seed: the loss difference bf16 - fp32 and the speed ratio
bf16 / fp32, each with a 95% Student t interval over seeds (the ratio's on its log). Then one short
failure-free swarm at each precision (``checkfree swarm``; the byte counts are deterministic):
``comm/bytes_sent`` per committed step and stage. Prints a table and writes ``OUT.json`` and ``OUT.md``.

    python scripts/bench_precision.py [CONFIG.yaml ...] [key=value ...] [--seeds 0 1 2] [--steps N]
        [--last K] [--swarm-steps S] [--out docs/results/precision_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from checkfree.analysis.stats import as_summary, fmt_interval, ratio_t, t_interval
from checkfree.config import load_config, split_args
from checkfree.core.metrics import read_jsonl
from checkfree.engine.trainer import Trainer

PRECISIONS = ("fp32", "bf16")
LEVEL = 0.95


def interval(values: list[float]) -> dict:
    """Mean of ``values`` with a 95% Student t interval (no interval from one seed)."""
    return as_summary(t_interval(values, LEVEL))


def ratio_interval(ratios: list[float]) -> dict:
    """Geometric mean of per-seed ratios, its t interval taken on the logs."""
    return as_summary(ratio_t(ratios, [1.0] * len(ratios), LEVEL))


def run_seed(files: list[str], overrides: list[str], seed: int, steps: int, root: Path) -> dict[str, dict]:
    """An fp32 and a bf16 engine of ``seed`` trained in lockstep; per precision its figures."""
    trainers, rows = {}, {p: [] for p in PRECISIONS}
    for p in PRECISIONS:
        cfg = load_config(files, [*overrides, f"seed={seed}", f"num_steps={steps}", f"precision={p}",
                                  f"run_name={p}-seed{seed}", f"out_dir={root}"])  # fmt: skip
        trainers[p] = Trainer(cfg)
        trainers[p].start()
    for step in range(steps):
        for p in PRECISIONS if step % 2 == 0 else PRECISIONS[::-1]:
            trainers[p].continue_for(1, on_step=lambda st, p=p: rows[p].append((st.last_loss, st.tokens_per_s)))
    out = {}
    for p, t in trainers.items():
        val = t.engine.evaluate(t.cfg.data.num_val_batches)
        t.metrics.close()
        t.events.close()
        out[p] = {"rows": rows[p], "val_loss": val}
    return out


def summarise(rows: list[tuple[float, float]], val: float, warmup: int, last: int) -> dict:
    losses = [loss for loss, _ in rows]
    speeds = [s for _, s in rows[warmup:]] or [s for _, s in rows]
    return {
        "tokens_per_s": statistics.median(speeds),
        "train_loss_last": statistics.mean(losses[-last:]),
        "val_loss": val,
        "first_loss": losses[0],
    }


def swarm_bytes(files: list[str], overrides: list[str], precision: str, steps: int, root: Path) -> dict:
    """``comm/bytes_sent`` per stage of a short failure-free swarm at ``precision`` (every step's, as a set)."""
    name = f"swarm-{precision}"
    cmd = [sys.executable, "-m", "checkfree", "swarm", *files, *overrides, f"num_steps={steps}",
           f"precision={precision}", f"run_name={name}", f"out_dir={root}", "eval_every_steps=0",
           "failures.mode=none", "swarm.num_spares=0", "progress=false", "plot=false"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(
            f"the {precision} swarm failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    per_stage: dict[int, set[int]] = {}
    for f in (root / name / "peers").glob("*/metrics.jsonl"):
        for r in read_jsonl(f):
            if "comm/bytes_sent" in r:
                per_stage.setdefault(r["stage"], set()).add(r["comm/bytes_sent"])
    return {
        "bytes_per_step": {str(s): sorted(v) for s, v in sorted(per_stage.items())},
        "wall_s": time.monotonic() - t0,
    }


def verdicts(result: dict) -> dict[str, str]:
    speed, val = result["speed_ratio_bf16_over_fp32"], result["val_loss_diff_bf16_minus_fp32"]
    if speed["low"] is None:
        pace = "speed not resolved (one seed)"
    elif speed["high"] < 1:
        pace = "bf16 is slower than fp32 on this machine: fp32 stays the default on CPU"
    elif speed["low"] > 1:
        pace = "bf16 is faster than fp32 on this machine"
    else:
        pace = "speed difference not resolved: fp32 stays the default on CPU"
    if val["low"] is None:
        quality = "loss difference not resolved (one seed)"
    elif val["low"] > 0:
        quality = "bf16 ends at a higher validation loss"
    elif val["high"] < 0:
        quality = "bf16 ends at a lower validation loss"
    else:
        quality = "no validation-loss difference resolved"
    return {"speed": pace, "loss": quality}


def markdown(result: dict, command: str) -> str:
    per = result["per_seed"]
    lines = [
        "# fp32 against bf16 mixed precision",
        "",
        f"Made by `{command}` ({result['config']['threads']} torch threads, {result['host']}).",
        f"{len(per)} seeds, {result['config']['steps']} steps each, both precisions in lockstep; tokens/s: median "
        f"per run without the first {result['config']['warmup']} steps; train loss: mean of the last "
        f"{result['config']['last']} steps. Intervals: 95%, {result['val_loss_diff_bf16_minus_fp32']['method']}, "
        "paired by seed.",
        "",
        "| seed | precision | tokens/s | train loss (last) | val loss |",
        "|---|---|---|---|---|",
    ]
    for seed, runs in per.items():
        for p in PRECISIONS:
            r = runs[p]
            lines.append(
                f"| {seed} | {p} | {r['tokens_per_s']:.0f} | {r['train_loss_last']:.4f} | {r['val_loss']:.4f} |"
            )
    lines += [
        "",
        "| bf16 against fp32 | estimate [95% CI] |",
        "|---|---|",
        f"| speed ratio (tokens/s) | {fmt_interval(result['speed_ratio_bf16_over_fp32'], 3)} |",
        f"| train loss difference | {fmt_interval(result['train_loss_diff_bf16_minus_fp32'], 4)} |",
        f"| val loss difference | {fmt_interval(result['val_loss_diff_bf16_minus_fp32'], 4)} |",
        "",
        "Bytes a swarm stage sends per committed step (activations and gradients, with their headers):",
        "",
        "| stage | fp32 | bf16 | bf16 / fp32 |",
        "|---|---|---|---|",
    ]
    sw = result["swarm"]
    for s, fp32 in sw["fp32"]["bytes_per_step"].items():
        bf16 = sw["bf16"]["bytes_per_step"][s]
        ratio = f"{bf16[0] / fp32[0]:.3f}" if len(fp32) == len(bf16) == 1 and fp32[0] else "-"
        lines.append(f"| {s} | {', '.join(map(str, fp32))} | {', '.join(map(str, bf16))} | {ratio} |")
    lines += ["", f"Verdict: {result['verdict']['speed']}; {result['verdict']['loss']}.", ""]
    return "\n".join(lines)


def compare(per_seed: dict[str, dict]) -> dict:
    """bf16 against fp32, paired by seed: the speed ratio, the loss differences, the median speeds."""
    pairs = list(per_seed.values())

    def paired(key: str) -> list[tuple[float, float]]:
        return [(r["bf16"][key], r["fp32"][key]) for r in pairs]

    return {
        "speed_ratio_bf16_over_fp32": ratio_interval([b / f for b, f in paired("tokens_per_s")]),
        "train_loss_diff_bf16_minus_fp32": interval([b - f for b, f in paired("train_loss_last")]),
        "val_loss_diff_bf16_minus_fp32": interval([b - f for b, f in paired("val_loss")]),
        "median_tokens_per_s": {p: statistics.median(r[p]["tokens_per_s"] for r in pairs) for p in PRECISIONS},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: the config's num_steps)")
    ap.add_argument("--last", type=int, default=20, help="final train loss: mean over this many last steps")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of each run's tokens/s")
    ap.add_argument("--swarm-steps", type=int, default=3, help="steps of each swarm run (bytes only)")
    ap.add_argument("--out", default="runs/bench/precision", help="writes OUT.json and OUT.md")
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    overrides = ["failures.mode=none", "eval_every_steps=0", "progress=false", "plot=false", *overrides]
    base = load_config(files, overrides)
    if base.num_threads:
        torch.set_num_threads(base.num_threads)
    steps = ns.steps or base.num_steps
    per_seed: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_precision-") as tmp:
        root = Path(tmp)
        for seed in ns.seeds:
            runs = run_seed(files, overrides, seed, steps, root)
            per_seed[str(seed)] = {p: summarise(r["rows"], r["val_loss"], ns.warmup, ns.last) for p, r in runs.items()}
            print(f"seed {seed}: " + "; ".join(f"{p} {json.dumps(v)}" for p, v in per_seed[str(seed)].items()))
        swarm = {p: swarm_bytes(files, overrides, p, ns.swarm_steps, root) for p in PRECISIONS}
    m = base.model
    result = {
        "config": {
            "files": files,
            "overrides": overrides,
            "steps": steps,
            "last": ns.last,
            "warmup": ns.warmup,
            "d_model": m.d_model,
            "num_layers": m.num_layers,
            "num_stages": m.num_stages,
            "seq_len": m.seq_len,
            "num_microbatches": base.pipeline.num_microbatches,
            "microbatch_size": base.data.microbatch_size,
            "device": base.device,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "host": f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {base.device}",
        "per_seed": per_seed,
        **compare(per_seed),
        "swarm": swarm,
    }
    result["verdict"] = verdicts(result)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, "python scripts/bench_precision.py " + " ".join(sys.argv[1:]))
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
