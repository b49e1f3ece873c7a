"""
Benchmark commands
==================

Every benchmark behind ``docs/benchmarks/results.md`` as data: the argument list that makes its result file
(run without a shell), the environment it needs on top of the inherited one, and, apart from the command,
how the recorded result was actually made where that differs (runs trained in parts and moved in). The
analyses that only read result files (``ANALYSES``) run after the benchmarks' results are copied into
``docs/results``. ``scripts/benchmarks_report.py`` reruns and shows them; a unit test parses each with its
script's own parser.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Command:
    """One benchmark's command line, run without a shell (``--run``) and shown on the page."""

    argv: list[str]  # "python" first: --run puts this interpreter in its place
    env: dict[str, str] = field(default_factory=dict)  # set for the run on top of the inherited environment
    provenance: str = ""  # how the recorded result was made, where that differs from argv (runs moved in by hand)
    # result files the command writes away from runs/bench/*.json (which --run copies as they are): path from the
    # repository root -> its name in docs/results
    results: dict[str, str] = field(default_factory=dict)
    only_when_named: str = ""  # why a plain --run leaves it out (it needs root, say); --only NAME runs it

    def shown(self) -> str:
        """The command as a shell would take it (the provenance is not part of it)."""
        return " ".join([*(f"{k}={v}" for k, v in self.env.items()), shlex.join(self.argv)])


# Wrapped by hand: the formatter would give each argument a line of its own.
# fmt: off
COMMANDS: dict[str, Command] = {
    "engine_overhead": Command(["python", "scripts/bench_engine_overhead.py", "--steps", "10", "--rounds", "3"]),
    "overhead": Command(["python", "scripts/bench_overhead.py", "--steps", "30", "--rounds", "2"]),
    "heartbeat_detection": Command(["python", "scripts/bench_heartbeat_detection.py"]),
    "heartbeat_detection_hang": Command(
        ["python", "scripts/bench_heartbeat_detection.py", "--hang", "--out",
         "runs/bench/heartbeat_detection_hang.json"],
    ),
    "recovery_ablation": Command(["python", "scripts/bench_recovery_ablation.py", "configs/bench.yaml"]),
    "recovery_latency": Command(["python", "scripts/bench_recovery_latency.py"]),
    "scaling": Command(["python", "scripts/bench_scaling.py", "--microbatches", "1", "4"]),
    "q_scan": Command(
        ["python", "scripts/measure_q.py", "configs/bench.yaml", "--scan", "50", "150", "300", "600", "1000", "1500",
         "--scan-train", "20", "--seeds", "0", "1", "--methods", "random", "weighted", "copy", "--stages", "0", "1",
         "3", "--out", "runs/bench/q_scan.json"],
    ),
    "q_bench": Command(
        ["python", "scripts/measure_q.py", "configs/bench.yaml", "--seeds", "0", "1", "2", "3", "4", "--fail-at", "300",
         "--horizon", "100", "--target-after", "25", "50", "--methods", "weighted", "uniform", "copy", "random", "plus",
         "partner_copy", "warmup=weighted+recovery.warmup_steps=20",
         "moments=weighted+recovery.optimizer_init=neighbours", "--runs-dir", "runs/q/bench-F300", "--out",
         "runs/bench/q_bench.json"],
        provenance="seeds 0-1 ran with --stages 0 1 3 --eval-every 2 and later --stages 2 --eval-every 2 in a runs "
        "dir of their own, moved in; seeds 2-4 with the defaults: stages 0-3, every step; the table is "
        "--analyse-only over all five",
    ),
    "q_tiny": Command(
        ["python", "scripts/measure_q.py", "configs/tiny.yaml", "--seeds", "0", "1", "2", "3", "4", "--fail-at", "100",
         "--horizon", "30", "--target-after", "10", "20", "--methods", "plus", "--stages", "0", "1", "3", "--runs-dir",
         "runs/q/tiny-F100", "--out", "runs/bench/q_tiny.json"],
    ),
    "q_deep": Command(
        ["python", "scripts/measure_q.py", "configs/deep.yaml", "--seeds", "0", "1", "2", "3", "4", "--fail-at", "1000",
         "--horizon", "100", "--target-after", "25", "50", "--methods", "weighted", "copy", "random", "plus",
         "--stages", "0", "3", "5", "--eval-every", "2", "--runs-dir", "runs/q/deep-F1000", "--out",
         "runs/bench/q_deep.json"],
        provenance="seeds 0-1 trained every method; seeds 2-4 --methods weighted copy random, seeds 2-3 and then "
        "seed 4 --methods plus, in runs of their own moved into runs/q/deep-F1000; the table is --analyse-only over "
        "all five",
    ),
    "fig2_deep": Command(
        ["python", "scripts/bench_convergence.py", "configs/deep.yaml", "num_steps=500", "failures.stages=[1,2,3,4]",
         "--rates", "0.16", "--seeds", "0", "1", "2", "3", "4", "--strategies", "none", "checkfree", "copy", "random",
         "--ours", "checkfree", "--baselines", "copy", "random", "--eval-every", "5", "--jobs", "2", "--out",
         "runs/bench/fig2_deep.json", "--runs-dir", "runs/bench/fig2-deep-runs"],
    ),
    "convergence_ci": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "--rates", "0.10", "0.33", "--seeds", "0", "1",
         "2", "3", "4", "5", "6", "7", "8", "9", "--strategies", "none", "checkfree_plus", "hybrid", "checkpoint:5",
         "checkfree", "--jobs", "2", "--out", "runs/bench/convergence_ci.json", "--runs-dir",
         "runs/bench/convergence-ci-runs"],
        provenance="all 10 seeds trained by this command in one sweep on b09e820 (2026-12-08), beside another "
        "sweep (iterations do not depend on the load); the 5-seed sweep it replaces is "
        "docs/results/convergence_ci_5seeds.*",
    ),
    "convergence_slow": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "checkpoint.storage_mb_s=5", "--rates", "0.10",
         "0.33", "--seeds", "0", "1", "2", "3", "4", "--strategies", "none", "checkfree_plus", "hybrid",
         "checkpoint:25", "--compare-by", "seconds", "--jobs", "2", "--out", "runs/bench/convergence_slow.json",
         "--runs-dir", "runs/bench/convergence-slow-runs"],
    ),
    "whatif": Command(
        ["python", "scripts/whatif.py", "map", "--model-bytes", "6697728", "--step-s", "0.1", "--num-stages", "4",
         "--downtime-s", "1.14", "--iteration-s", "91.3", "--hourly-rate", "0.1", "0.33", "--storage-mb-s", "5", "100",
         "--q", "21", "15", "27", "--q-full-step", "300", "--target-steps", "300", "--intervals", "5", "25",
         "--map-storage", "0.5", "500", "13", "--map-rates", "0.02", "0.5", "10", "--out", "runs/bench/whatif.json"],
    ),
    "whatif_paper": Command(
        ["python", "scripts/whatif.py", "map", "--q", "40", "20", "60", "--out", "runs/bench/whatif_paper.json"],
    ),
    "whatif_validation_local": Command(
        ["python", "scripts/whatif.py", "validate-sweep", "runs/bench/convergence-ci-runs", "checkpoint:5",
         "checkfree_plus", "--q", "21", "15", "27", "--q-full-step", "300", "--out",
         "runs/bench/whatif_validation_local.json"],
    ),
    "whatif_validation_slow": Command(
        ["python", "scripts/whatif.py", "validate-sweep", "runs/bench/convergence-slow-runs", "checkpoint:25",
         "checkfree_plus", "--q", "21", "15", "27", "--q-full-step", "300", "--out",
         "runs/bench/whatif_validation_slow.json"],
    ),
    "overlap_fit": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "--rates", "0.5", "0.05", "0.2", "--seeds",
         "5", "6", "7", "8", "9", "--strategies", "none", "checkfree_plus", "--out", "runs/bench/overlap_fit.json",
         "--runs-dir", "runs/bench/overlap-fit-runs"],
        env={"OMP_NUM_THREADS": "1"},
    ),
    "whatif_overlap_fit": Command(
        ["python", "scripts/whatif.py", "fit-overlap", "runs/bench/overlap-fit-runs", "checkfree_plus", "--q", "21",
         "--q-full-step", "300", "--out", "runs/bench/whatif_overlap_fit.json"],
    ),
    "whatif_validation_local_overlap": Command(
        ["python", "scripts/whatif.py", "validate-sweep", "runs/bench/convergence-ci-runs", "checkpoint:5",
         "checkfree_plus", "--overlap-fit", "runs/bench/whatif_overlap_fit.json", "--out",
         "runs/bench/whatif_validation_local_overlap.json"],
    ),
    "whatif_validation_slow_overlap": Command(
        ["python", "scripts/whatif.py", "validate-sweep", "runs/bench/convergence-slow-runs", "checkpoint:25",
         "checkfree_plus", "--overlap-fit", "runs/bench/whatif_overlap_fit.json", "--out",
         "runs/bench/whatif_validation_slow_overlap.json"],
    ),
    "whatif_overlap": Command(
        ["python", "scripts/whatif.py", "map", "--model-bytes", "6697728", "--step-s", "0.1", "--num-stages", "4",
         "--downtime-s", "1.14", "--iteration-s", "91.3", "--hourly-rate", "0.1", "0.33", "--storage-mb-s", "5", "100",
         "--overlap-fit", "runs/bench/whatif_overlap_fit.json", "--target-steps", "300", "--intervals", "5", "25",
         "--map-storage", "0.5", "500", "13", "--map-rates", "0.02", "0.5", "10", "--out",
         "runs/bench/whatif_overlap.json"],
    ),
    "whatif_null": Command(
        ["python", "scripts/whatif.py", "null", "--sweep", "local", "runs/bench/whatif_validation_local_overlap.json",
         "runs/bench/convergence_ci.rows.json", "--sweep", "slow", "runs/bench/whatif_validation_slow_overlap.json",
         "runs/bench/convergence_slow.rows.json", "--sweep", "local-q21", "runs/bench/whatif_validation_local.json",
         "runs/bench/convergence_ci.rows.json", "--sweep", "slow-q21", "runs/bench/whatif_validation_slow.json",
         "runs/bench/convergence_slow.rows.json", "--out", "runs/bench/whatif_null.json"],
        provenance="the local sweeps validated on the 10-seed convergence_ci runs (2026-12-08); the slow ones read "
        "the validation files in docs/results, copied into runs/bench: convergence-slow-runs and overlap-fit-runs "
        "are not in this checkout",
    ),
    "whatif_paper_table2": Command(
        ["python", "scripts/whatif.py", "paper-table2", "--overlap-fit", "runs/bench/whatif_overlap_fit.json",
         "--swap-tax-json", "6-stage-edge-pairs", "runs/bench/swap_tax_deep6.json", "--swap-tax-json",
         "4-stage-half-swapped", "runs/bench/swap_tax_bench4.json", "--out", "runs/bench/whatif_paper_table2.json"],
        provenance="recorded with the same files from docs/results (whatif_overlap_fit.json, swap_tax_deep6.json, "
        "swap_tax_bench4.json)",
    ),
    "convergence_neighbours": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "failures.neighbour_prob=0.5", "--rates",
         "0.33", "0.1", "--seeds", "0", "1", "2", "3", "4", "--strategies", "none", "checkfree_plus", "hybrid",
         "checkpoint:5", "--out", "runs/bench/convergence_neighbours.json", "--runs-dir",
         "runs/bench/convergence-neighbours-runs"],
        env={"OMP_NUM_THREADS": "1"},
    ),
    "convergence_neighbours_hybrid": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "failures.neighbour_prob=0.5", "--rates",
         "0.33", "0.1", "--seeds", "0", "1", "2", "3", "4", "--strategies", "none", "checkfree_plus", "hybrid",
         "checkpoint:5", "--ours", "hybrid", "--baselines", "checkfree_plus", "--analyse-only", "--out",
         "runs/bench/convergence_neighbours_hybrid.json", "--runs-dir", "runs/bench/convergence-neighbours-runs"],
    ),
    "convergence_swarm": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "num_steps=200", "--swarm", "--rates", "0.10",
         "0.33", "--seeds", "0", "--strategies", "none", "checkfree", "checkfree_plus", "checkpoint:10", "redundant",
         "checkpoint:50", "--out", "runs/bench/convergence_swarm.json", "--runs-dir",
         "runs/bench/convergence-swarm-runs"],
    ),
    "pipelining": Command(
        ["python", "scripts/bench_pipelining.py", "configs/bench.yaml", "--steps", "40", "--rounds", "4",
         "--schedules", "gpipe", "1f1b", "--out", "runs/bench"],
        provenance="recorded with --out docs/results",
    ),
    "precision_cpu": Command(
        ["python", "scripts/bench_precision.py", "configs/bench.yaml", "--seeds", "0", "1", "2", "--out",
         "runs/bench/precision_cpu"],
        provenance="recorded with --out docs/results/precision_cpu",
    ),
    "swap_tax_bench4": Command(
        ["python", "scripts/bench_swap_tax.py", "--configs", "configs/bench.yaml", "--fractions", "0.5", "0.25",
         "0.125", "--seeds", "0", "1", "2", "3", "4", "--steps", "300", "--jobs", "2", "--runs-dir",
         "runs/bench/swap-tax-runs", "--out", "runs/bench/swap_tax_bench4.json"],
        provenance="trained with --out runs/bench/swap_tax (a folder, before --out named the file); the table in "
        "docs/results is this command with --analyse-only over the same runs (equal comparisons)",
    ),
    "swap_tax_deep6": Command(
        ["python", "scripts/bench_swap_tax.py", "--configs", "configs/deep.yaml", "--fractions", "0.5", "0.25",
         "0.125", "--seeds", "0", "1", "2", "3", "4", "--steps", "300", "--jobs", "2", "--step-s", "0.6",
         "--runs-dir", "runs/bench/swap-tax-runs", "--out", "runs/bench/swap_tax_deep6.json"],
        provenance="trained in two parts in the same runs dir (fraction 0.5 first, then 0.25 and 0.125 resumed "
        "beside it); the table in docs/results is this command with --analyse-only over all of them",
    ),
    "swap_tax_lr": Command(
        ["python", "scripts/bench_swap_tax.py", "--configs", "configs/bench.yaml", "--fractions", "0.5", "0.25",
         "--lr-scales", "1.25", "--seeds", "0", "1", "2", "3", "4", "--steps", "300", "--jobs", "2", "--runs-dir",
         "runs/bench/swap-tax-runs", "--out", "runs/bench/swap_tax_lr.json"],
    ),
    **{
        f"q_swap{f}": Command(
            ["python", "scripts/measure_q.py", "configs/bench.yaml", "pipeline.num_microbatches=8",
             f"pipeline.swap_fraction={f}", "--seeds", "0", "1", "2", "3", "4", "--fail-at", "300", "--horizon", "100",
             "--target-after", "25", "50", "--methods", "plus", "--stages", "0", "3", "--eval-every", "2", "--jobs",
             "1", "--runs-dir", f"runs/q/bench8-swap{f}-F300", "--out", f"runs/bench/q_swap{f}.json"],
            provenance="the three fractions ran side by side, one process each (2026-12-07)",
        )
        for f in ("0.5", "0.25", "0.125")
    },
    "paper_local": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "num_steps=1000", "--rates", "0.05", "0.10",
         "0.16", "--seeds", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "--strategies", "none", "checkfree",
         "checkfree_plus", "redundant", "checkpoint:young", "hybrid:5", "--jobs", "2", "--out",
         "runs/bench/paper_local.json", "--runs-dir", "runs/bench/paper-local-runs"],
        provenance="not run yet (issue 22 item 4): its --dry-run costs it at 10.9 h with --jobs 2 (160 runs x 1000 "
        "steps x 0.48 s, measured beside 3 other trainings; rollbacks and redundant computation's extra work not "
        "included); resumable, so it can be run in parts",
    ),
    "paper_slow": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "num_steps=1000", "checkpoint.storage_mb_s=5",
         "--rates", "0.05", "0.10", "0.16", "--seeds", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
         "--strategies", "none", "checkfree_plus", "checkpoint:young", "hybrid:25", "--compare-by", "seconds",
         "--jobs", "1", "--out", "runs/bench/paper_slow.json", "--runs-dir", "runs/bench/paper-slow-runs"],
        provenance="not run yet (issue 22 item 4): seconds-based, so one run at a time; its --dry-run costs it at "
        "55 h (100 runs x 1000 steps x 1.98 s, measured under load: an upper figure) before saves and rollbacks",
    ),
    "swap_tax_full": Command(
        ["python", "scripts/bench_swap_tax.py", "--configs", "configs/bench.yaml", "configs/deep.yaml", "--fractions",
         "0.5", "0.25", "0.125", "--seeds", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "--steps", "600",
         "--microbatches", "8", "--jobs", "2", "--runs-dir", "runs/bench/swap-tax-full-runs", "--out",
         "runs/bench/swap_tax_full.json"],
        provenance="not run yet: 10 seeds x 600 steps on both layouts (its --dry-run costs it, hours on 2 cores)",
    ),
    # the swarm's chaos soaks and the multi-host scenario: each writes its report into its own folder
    "soak_200events_final": Command(
        ["python", "scripts/soak.py", "--tiny", "--events", "200", "--mean-gap-s", "1.0", "--safety", "1.2", "--out",
         "runs/bench/soak200_final", "checkpoint.every_steps=20"],
        provenance="run from a worktree of 9fdbc65, alone on the machine (a soak's timings are wall-clock)",
        results={"runs/bench/soak200_final/soak.json": "soak_200events_final.json",
                 "runs/bench/soak200_final/soak.md": "soak_200events_final.md"},
    ),
    "soak_100events_framed": Command(
        ["python", "scripts/soak.py", "--tiny", "--events", "100", "--mean-gap-s", "1.0", "--safety", "1.2", "--out",
         "runs/bench/soak100_framed", "checkpoint.every_steps=20"],
        provenance="run from a worktree of b8337d6 (the transport change), the 2 cores shared with unit tests for "
        "part of it",
        results={"runs/bench/soak100_framed/soak.json": "soak_100events_framed.json",
                 "runs/bench/soak100_framed/soak.md": "soak_100events_framed.md"},
    ),
    "multihost_scenario": Command(
        ["python", "scripts/multihost_scenario.py", "--out", "runs/bench/multihost"],
        provenance="recorded with the default --out",
        only_when_named="it needs root (network namespaces)",
        results={"runs/bench/multihost/multihost_scenario.json": "multihost_scenario.json",
                 "runs/bench/multihost/multihost_scenario.md": "multihost_scenario.md"},
    ),
    # issue 22 item 5: the largest model this machine trains in a few hours, on BPE tokens made here
    "bpe_data": Command(["python", "scripts/prepare_stdlib_tokens.py", "--out", "runs/data/stdlib-bpe4096"]),
    "bpe5m": Command(
        ["python", "scripts/bench_convergence.py", "configs/bpe5m.yaml", "--rates", "0.10", "--seeds", "0", "1", "2",
         "--strategies", "none", "checkfree_plus", "checkpoint:young", "--jobs", "2", "--out", "runs/bench/bpe5m.json",
         "--runs-dir", "runs/bench/bpe5m-runs"],
        provenance="part of its runs were trained by a first sweep that also listed redundant computation (the entry "
        "below), stopped once it had run redundant computation's first seed; this command trained the rest",
    ),
    "bpe5m_redundant": Command(
        ["python", "scripts/bench_convergence.py", "configs/bpe5m.yaml", "--rates", "0.10", "--seeds", "0", "1", "2",
         "--strategies", "none", "checkfree_plus", "redundant", "--jobs", "2", "--out",
         "runs/bench/bpe5m_redundant.json", "--runs-dir", "runs/bench/bpe5m-runs"],
        provenance="redundant computation's seed 0 was trained by the first sweep (see bpe5m), its seeds 1 and 2 by "
        "this command on b09e820 (2026-12-08), beside another sweep; the failure-free and CheckFree+ runs are "
        "bpe5m's",
    ),
}
# a check that the pipeline runs, not a result: written under runs/bench/quick, never copied into docs/results
QUICK: dict[str, Command] = {
    "convergence_ci": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "num_steps=200", "--rates", "0.33", "--seeds",
         "0", "1", "--strategies", "none", "checkfree_plus", "hybrid", "checkpoint:5", "--jobs", "2", "--out",
         "runs/bench/quick/convergence_ci.json", "--runs-dir", "runs/bench/quick/convergence-ci-runs"],
    ),
}


ANALYSES: dict[str, Command] = {
    # reads docs/results only: runs after the benchmarks' fresh results are copied there
    "reanalysis": Command(["python", "scripts/reanalyse.py"]),
    "swap_fraction_choice": Command(
        ["python", "scripts/choose_swap_fraction.py", "--tax", "docs/results/swap_tax_bench4.json", "--layout", "bench",
         "--q", "0.5=docs/results/q_swap0.5.json", "0.25=docs/results/q_swap0.25.json",
         "0.125=docs/results/q_swap0.125.json", "--q-middle", "docs/results/q_bench.json", "--out",
         "docs/results/swap_fraction_choice.json"],
    ),
}
# a name that stands for several entries (``--only swap_tax``): the tables of issue 22's item 3, in order
GROUPS: dict[str, list[str]] = {
    "swap_tax": [
        "swap_tax_bench4", "swap_tax_deep6", "swap_tax_lr", "q_swap0.5", "q_swap0.25", "q_swap0.125",
        "swap_fraction_choice",
    ],
    "largest_scale": ["bpe_data", "bpe5m", "bpe5m_redundant"],
}
# fmt: on


def select(commands: dict[str, Command], only: Iterable[str] | None) -> dict[str, Command]:
    """The entries named in ``only`` (a ``GROUPS`` name stands for its entries), in the registry's order; when
    None, every entry but those ``only_when_named``.

    Raises:
        ValueError: a name that is no entry and no group.
    """
    if only is None:
        return {name: c for name, c in commands.items() if not c.only_when_named}
    wanted = {name for n in only for name in GROUPS.get(n, [n])}
    unknown = wanted - set(COMMANDS) - set(ANALYSES)
    if unknown:
        known = sorted([*COMMANDS, *ANALYSES, *GROUPS])
        raise ValueError(f"no benchmark named {sorted(unknown)}; known: {known}")
    return {name: c for name, c in commands.items() if name in wanted}


def fresh_results(commands: dict[str, Command], bench: Path, since: float, root: Path = ROOT) -> dict[Path, str]:
    """What a ``--run`` started at ``since`` (``time.time()``) wrote, as {file: its name in docs/results}: every
    ``bench/*.json`` and ``*.md`` modified since then, and each command's ``results``. Files from earlier runs
    left in ``bench`` are not among them, so they never overwrite the versioned ones.

    Raises:
        FileNotFoundError: a command did not write a result it names, or left one from an earlier run (the page
            would show a stale one); nothing is returned, so nothing is copied.
    """
    out = {f: f.name for f in sorted([*bench.glob("*.json"), *bench.glob("*.md")]) if f.stat().st_mtime >= since}
    missing = []
    for name, command in commands.items():
        for source, dest in command.results.items():
            path = root / source
            if not path.is_file() or path.stat().st_mtime < since:
                missing.append(f"{name}: {source}")
            out[path] = dest
    if missing:
        raise FileNotFoundError(f"these runs wrote no fresh result where their entry says: {missing}")
    return out


def rerun(commands: dict[str, Command], timeout_s: float, runner: Callable[..., object] = subprocess.run) -> None:
    """Run each command from the repository root, with this interpreter for "python" and no shell.

    Raises:
        subprocess.CalledProcessError: a benchmark failed (the rest are not run).
        subprocess.TimeoutExpired: a benchmark ran past ``timeout_s``.
    """
    for command in commands.values():
        print(f"$ {command.shown()}", flush=True)
        argv = [sys.executable if command.argv[0] == "python" else command.argv[0], *command.argv[1:]]
        env = {**os.environ, **command.env} if command.env else None  # None: this process's own
        runner(argv, check=True, cwd=ROOT, env=env, timeout=timeout_s)
