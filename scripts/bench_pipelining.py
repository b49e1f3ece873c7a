"""Throughput against torch's own pipelining, every side measured in the same run, rounds interleaved.

Three sides train the same config (model, data, microbatches, sequence length, per-stage Adam at
``optim.lr`` with per-stage clipping), failure-free, one process per stage over gloo on this machine, for
``--steps`` steps under each schedule of ``--schedules``, in each of ``--rounds`` rounds (the order within a
round rotates, so drift on a shared machine falls on every side alike):

- ``torch``: ``torch.distributed.pipelining``: a ``PipelineStage`` per process around checkfree's own
  ``Stage`` (embedding on the first, head and loss on the last) under ``ScheduleGPipe`` / ``Schedule1F1B``,
  the loss of a microbatch divided by the number of microbatches as checkfree's (``scale_grads=False``;
  ``launcher/torch_pipeline.py``);
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
with a 95% t interval on their logarithms (none from one round; the JSON says which), the ratio of the
pooled medians, the training loss of the last ``--tail`` steps and the largest loss gap to torch at equal
steps (the sides train the same model on the same data, so it stays near float rounding), and the largest
resident memory of a stage process (``checkfree/analysis/pipelining.py``). Writes ``OUT/pipelining.json``
and ``OUT/pipelining.md``.

    python scripts/bench_pipelining.py [CONFIG.yaml ...] [key=value ...] [--steps 30] [--rounds 3]
        [--schedules gpipe 1f1b] [--out runs/bench/pipelining]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from checkfree.analysis.pipelining import SIDES, PipeliningBench, page, result, summarise, table
from checkfree.config import load_config, split_args
from checkfree.core.schedule import KINDS
from launcher.torch_pipeline import machine, measure

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


def _say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    ns = parse_args()
    bench = PipeliningBench(ns.files, ns.overrides, ns.steps, ns.rounds, ns.skip, ns.tail, ns.schedules, ns.sides)
    try:
        measured = measure(bench, _say)
    except RuntimeError as e:  # a side failed: its message names the run directory to look in
        raise SystemExit(f"bench_pipelining: {e}") from e
    summary = summarise(measured["data"], bench.tail)
    cfg = load_config(bench.files, bench.common_overrides(Path(measured["run_dirs"])))
    command = shlex.join(["python", "scripts/bench_pipelining.py", *sys.argv[1:]])
    res = result(bench, command, summary, cfg, machine(), measured["run_dirs"])
    print(table(summary))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipelining.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "pipelining.md").write_text(page(res))


if __name__ == "__main__":
    main()
