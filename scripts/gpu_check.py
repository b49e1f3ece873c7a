"""The CUDA path, checked on whatever GPUs this machine has (never in CI: it needs a GPU).

1. The engine on ``device=cuda`` (stage i on GPU i mod N), fp32 and ``precision=bf16``, failure-free: tokens/s
   and the final validation loss (the bf16 loss is compared with the fp32 one on the same device).
2. A local swarm with ``device=cuda precision=bf16`` (peer k on GPU k mod N, NCCL groups), through one kill
   and then one hang of stage 1 at iteration ``--fail-at``: tokens/s, kill (or freeze) to the first committed
   step after the recovery, and the final validation loss against the failure-free engine's. NCCL cannot put
   two ranks of one group on one GPU, so the swarm needs as many GPUs as stages plus one for the spare; with
   fewer it is skipped and the table says so.

Prints a markdown table and saves it with the numbers as JSON and markdown under ``--out``.

    python scripts/gpu_check.py [CONFIG.yaml ...] [key=value ...] [--steps 200] [--fail-at 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from checkfree.config import load_config, split_args
from checkfree.core.devices import cuda_count
from checkfree.core.failures import Failure, write_trace
from checkfree.core.metrics import read_jsonl


def _engine(files, common: list[str], tmp: Path, precision: str) -> dict:
    from checkfree.engine.trainer import Trainer

    name = f"engine-{precision}"
    cfg = load_config(files, [*common, f"precision={precision}", f"run_name={name}", "failures.mode=none"])
    Trainer(cfg).run()
    rows = read_jsonl(tmp / name / "metrics.jsonl")
    return _summary(name, rows)


def _summary(name: str, rows: list[dict], recovery_s: float | None = None, note: str = "") -> dict:
    train = [r for r in rows if "loss/train" in r]
    rates = [r["throughput/tokens_per_s"] for r in train[5:]] or [0.0]
    vals = [r["loss/val"] for r in rows if "loss/val" in r]
    return {
        "run": name,
        "tokens_per_s": statistics.median(rates),
        "final_val_loss": vals[-1] if vals else None,
        "recovery_s": recovery_s,
        "note": note,
    }


def _swarm(files, common: list[str], tmp: Path, how: str, fail_at: int, num_stages: int) -> dict:
    from launcher.local import run_local_swarm

    name = f"swarm-bf16-{how}"
    trace = tmp / f"{name}-trace.jsonl"
    write_trace(trace, [Failure(fail_at, 1, "mid_forward", 0.5)], num_stages)
    overrides = [
        *common,
        "precision=bf16",
        f"run_name={name}",
        "failures.mode=trace",
        f"failures.trace_path={trace}",
        f"swarm.hang_fraction={1.0 if how == 'hang' else 0.0}",
        "swarm.num_spares=1",
    ]
    cfg = load_config(files, overrides)
    code, summary = run_local_swarm(cfg, tmp / name, status=False)
    rows = [r for r in read_jsonl(tmp / name / "metrics.jsonl")]
    done = [r["kill_to_commit_s"] for r in summary.get("recovery_rows", []) if r.get("kill_to_commit_s") is not None]
    note = f"exit {code}, {summary.get('steps')} steps, repeated {summary.get('repeated_steps')}"
    return _summary(name, rows, done[0] if done else None, note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides (default configs/bench.yaml)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--fail-at", type=int, default=60, help="iteration at which stage 1 is killed, then hung")
    ap.add_argument("--out", default="runs/bench/gpu_check")
    ns = ap.parse_args()
    gpus = cuda_count()
    if gpus == 0:
        raise SystemExit("gpu_check: torch sees no CUDA device here; run it on a GPU machine")
    files, overrides = split_args(ns.args or ["configs/bench.yaml"])
    tmp = Path(tempfile.mkdtemp(prefix="cf-gpu-"))
    common = [*overrides, "device=cuda", f"num_steps={ns.steps}", "progress=false", "plot=false", f"out_dir={tmp}"]
    num_stages = load_config(files, common).model.num_stages
    rows = [_engine(files, common, tmp, "fp32"), _engine(files, common, tmp, "bf16")]
    if gpus >= num_stages + 1:
        rows += [_swarm(files, common, tmp, how, ns.fail_at, num_stages) for how in ("kill", "hang")]
    else:
        rows.append(
            _summary(
                "swarm-bf16", [], note=f"skipped: NCCL needs {num_stages + 1} GPUs (stages + spare), this has {gpus}"
            )
        )
    reference = rows[0]["final_val_loss"]
    lines = [
        f"GPUs: {gpus} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}; steps {ns.steps}",
        "",
        "| run | tokens/s | recovery s (fault to first commit) | final val loss | vs fp32 engine | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        loss = r["final_val_loss"]
        diff = f"{loss - reference:+.4f}" if loss is not None and reference is not None else "-"
        rec = f"{r['recovery_s']:.2f}" if r["recovery_s"] is not None else "-"
        shown = f"{loss:.4f}" if loss is not None else "-"
        lines.append(f"| {r['run']} | {r['tokens_per_s']:.0f} | {rec} | {shown} | {diff} | {r['note']} |")
    table = "\n".join(lines)
    print(table)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"gpus": gpus, "rows": rows}, indent=2))
    (out / "gpu_check.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
