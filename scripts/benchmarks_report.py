"""Regenerate docs/BENCHMARKS.md from the benchmark results in runs/bench/ (``--run`` first reruns every
benchmark at the documented scale, about 2 hours on 2 cores).

    python scripts/benchmarks_report.py [--run] [--quick] [--timeout-s SECONDS]

Every benchmark's command is an argument list run without a shell; how a recorded result was actually made,
where that differs from its command (runs trained apart and moved in), is its ``note``, shown after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "runs" / "bench"
DOCS = ROOT / "docs"


@dataclass(frozen=True)
class Command:
    """One benchmark's command line, run without a shell (``--run``) and shown on the page."""

    argv: list[str]  # "python" first: --run puts this interpreter in its place
    env: dict[str, str] = field(default_factory=dict)  # set for the run on top of the inherited environment
    note: str = ""  # how the recorded result was made, where that differs from argv (runs moved in by hand)

    def shown(self) -> str:
        """The command as a shell would take it (with the note, if any, after it: not part of the command)."""
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
        note="seeds 0-1 ran with --stages 0 1 3 --eval-every 2 and later --stages 2 --eval-every 2 in a runs dir of "
        "their own, moved in; seeds 2-4 with the defaults: stages 0-3, every step; the table is --analyse-only over "
        "all five",
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
        note="seeds 0-1 trained every method; seeds 2-4 --methods weighted copy random, seeds 2-3 and then seed 4 "
        "--methods plus, in runs of their own moved into runs/q/deep-F1000; the table is --analyse-only over all five",
    ),
    "fig2_deep": Command(
        ["python", "scripts/bench_convergence.py", "configs/deep.yaml", "num_steps=500", "failures.stages=[1,2,3,4]",
         "--rates", "0.16", "--seeds", "0", "1", "2", "3", "4", "--strategies", "none", "checkfree", "copy", "random",
         "--ours", "checkfree", "--baselines", "copy", "random", "--eval-every", "5", "--jobs", "2", "--out",
         "runs/bench/fig2_deep.json", "--runs-dir", "runs/bench/fig2-deep-runs"],
    ),
    "convergence_ci": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "--rates", "0.10", "0.33", "--seeds", "0", "1",
         "2", "3", "4", "--strategies", "none", "checkfree_plus", "hybrid", "checkpoint:5", "checkfree", "--jobs", "2",
         "--out", "runs/bench/convergence_ci.json", "--runs-dir", "runs/bench/convergence-ci-runs"],
        note="checkfree was added later: its runs trained with --strategies none checkfree in "
        "runs/bench/convergence-ci-plain-runs and were copied in; the table is --analyse-only",
    ),
    "convergence_slow": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "checkpoint.storage_mb_s=5", "--rates", "0.10",
         "0.33", "--seeds", "0", "1", "2", "3", "4", "--strategies", "none", "checkfree_plus", "hybrid",
         "checkpoint:25", "--compare-by", "seconds", "--jobs", "2", "--out", "runs/bench/convergence_slow.json",
         "--runs-dir", "runs/bench/convergence-slow-runs"],
    ),
    "whatif": Command(
        ["python", "scripts/whatif.py", "--model-bytes", "6697728", "--step-s", "0.1", "--num-stages", "4",
         "--downtime-s", "1.14", "--iteration-s", "91.3", "--hourly-rate", "0.1", "0.33", "--storage-mb-s", "5", "100",
         "--q", "21", "15", "27", "--q-full-step", "300", "--target-steps", "300", "--intervals", "5", "25",
         "--map-storage", "0.5", "500", "13", "--map-rates", "0.02", "0.5", "10", "--out", "runs/bench/whatif.json"],
    ),
    "whatif_paper": Command(
        ["python", "scripts/whatif.py", "--q", "40", "20", "60", "--out", "runs/bench/whatif_paper.json"],
    ),
    "whatif_validation_local": Command(
        ["python", "scripts/whatif.py", "--validate-sweep", "runs/bench/convergence-ci-runs", "checkpoint:5",
         "checkfree_plus", "--q", "21", "15", "27", "--q-full-step", "300", "--out",
         "runs/bench/whatif_validation_local.json"],
    ),
    "whatif_validation_slow": Command(
        ["python", "scripts/whatif.py", "--validate-sweep", "runs/bench/convergence-slow-runs", "checkpoint:25",
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
        ["python", "scripts/whatif.py", "--fit-overlap", "runs/bench/overlap-fit-runs", "checkfree_plus", "--q", "21",
         "--q-full-step", "300", "--out", "runs/bench/whatif_overlap_fit.json"],
    ),
    "whatif_validation_local_overlap": Command(
        ["python", "scripts/whatif.py", "--validate-sweep", "runs/bench/convergence-ci-runs", "checkpoint:5",
         "checkfree_plus", "--overlap-fit", "runs/bench/whatif_overlap_fit.json", "--out",
         "runs/bench/whatif_validation_local_overlap.json"],
    ),
    "whatif_validation_slow_overlap": Command(
        ["python", "scripts/whatif.py", "--validate-sweep", "runs/bench/convergence-slow-runs", "checkpoint:25",
         "checkfree_plus", "--overlap-fit", "runs/bench/whatif_overlap_fit.json", "--out",
         "runs/bench/whatif_validation_slow_overlap.json"],
    ),
    "whatif_overlap": Command(
        ["python", "scripts/whatif.py", "--model-bytes", "6697728", "--step-s", "0.1", "--num-stages", "4",
         "--downtime-s", "1.14", "--iteration-s", "91.3", "--hourly-rate", "0.1", "0.33", "--storage-mb-s", "5", "100",
         "--overlap-fit", "runs/bench/whatif_overlap_fit.json", "--target-steps", "300", "--intervals", "5", "25",
         "--map-storage", "0.5", "500", "13", "--map-rates", "0.02", "0.5", "10", "--out",
         "runs/bench/whatif_overlap.json"],
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
}
QUICK: dict[str, Command] = {
    "convergence_ci": Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", "num_steps=200", "--rates", "0.33", "--seeds",
         "0", "1", "--strategies", "none", "checkfree_plus", "hybrid", "checkpoint:5", "--jobs", "2", "--out",
         "runs/bench/convergence_ci.json", "--runs-dir", "runs/bench/convergence-ci-runs"],
    ),
}
# fmt: on


def _file(name: str) -> Path:
    """A result file: the fresh one in runs/bench/, else the copy versioned in docs/results/."""
    fresh = BENCH / name
    return fresh if fresh.is_file() else DOCS / "results" / name


def _load(name: str) -> dict | None:
    p = _file(f"{name}.json")
    return json.loads(p.read_text()) if p.is_file() else None


def _copy_png(name: str, doc_name: str) -> None:
    """Copy a fresh figure next to the page (a figure from an earlier run is already there)."""
    if (BENCH / name).is_file():
        shutil.copy(BENCH / name, DOCS / doc_name)


def _machine() -> str:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else "?"
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB memory, Python {platform.python_version()}, "
        f"torch {torch.__version__}, no GPU"
    )


def _section(title: str, name: str, body: str, command: Command | None = None) -> list[str]:
    command = command or COMMANDS.get(name)
    line = "Command: `?`" if command is None else f"Command: `{command.shown()}`"
    if command is not None and command.note:
        line += f" ({command.note})"
    return [f"## {title}", "", line, "", body, ""]


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


SUPERSEDED = (
    "*Measured before issue #11's fixes and kept for the record; do not read verdicts from it:* rates were "
    "labelled with the nominal rate although the time acceleration of 2.5 made them 12-63%/h effective, "
    "failure traces were shorter than the runs, the swarm dropped failures during recoveries, validation ran "
    "every 20 steps, and no interval was computed. The section above replaces it."
)


def first_convergence_command(r: dict) -> Command:
    """The command behind docs/results/convergence.json, from what it recorded (it predates the table above)."""
    return Command(
        ["python", "scripts/bench_convergence.py", "configs/bench.yaml", f"num_steps={r['num_steps']}"]
        + (["--swarm"] if r.get("swarm") else [])
        + (["--jobs", str(r["jobs"])] if r.get("jobs", 1) > 1 else [])
        + ["--rates", *map(str, r["rates"]), "--seeds", *map(str, r["seeds"])]
    )


def _issue11() -> list[str]:
    """The measurements behind "when does CheckFree beat checkpointing?" (issue #11)."""
    out = ["# When does CheckFree beat checkpointing?", ""]
    reading = DOCS / "BENCHMARKS-issue11.md"  # hand-written: what the figures below say, with their data
    if reading.is_file():
        out += [reading.read_text(), ""]
    for name, title in (
        ("q_scan", "Where losing a stage hurts: the jump of a rebuild against training progress"),
        ("q_bench", "q: extra steps to the target per lost stage, per method and position (bench, 5 seeds)"),
        ("q_tiny", "q at the tiny default's scale (CheckFree+, 5 seeds)"),
        ("q_deep", "q on 6 stages after 1000 steps (configs/deep.yaml; 5 seeds, swap off and CheckFree+)"),
        ("fig2_deep", "The paper's Fig. 2 setup on 6 stages: swap off, middle stages failing at 16%/h"),
        ("convergence_ci", "Convergence under failures, 5 seeds, paired intervals"),
        ("convergence_slow", "Convergence with slow checkpoint storage (the what-if validation points)"),
        ("whatif", "The what-if map at the bench scale, first version (q measured here; no tax, no overlap)"),
        (
            "whatif_paper",
            "The what-if map at the paper's medium scale (q from the paper's Table 2 as read in issue #11)",
        ),
        ("whatif_validation_slow", "What-if validation: slow storage (5 MB/s), CheckFree+ against checkpointing"),
        ("whatif_validation_local", "What-if validation: local disk, CheckFree+ against checkpointing every 5 steps"),
        ("whatif_overlap_fit", "What-if: swap tax, q and overlap fitted on a sweep of their own (seeds 5-9)"),
        ("whatif_validation_local_overlap", "What-if validation with the fitted overlap: local disk"),
        ("whatif_validation_slow_overlap", "What-if validation with the fitted overlap: slow storage (5 MB/s)"),
        ("whatif_overlap", "The what-if map at the bench scale with the fitted overlap"),
        ("convergence_neighbours", "Convergence when neighbours are lost together (failures.neighbour_prob=0.5)"),
        ("convergence_neighbours_hybrid", "The hybrid against CheckFree+ when neighbours are lost together"),
    ):
        r = _load(name)
        md = _file(f"{name}.md")
        if r is None or not md.is_file():
            continue
        body = md.read_text()
        for png in sorted([*BENCH.glob(f"{name}.png"), *BENCH.glob(f"{name}_rate*.png")]):
            _copy_png(png.name, f"bench_{png.name}")
        pngs = sorted([*DOCS.glob(f"bench_{name}.png"), *DOCS.glob(f"bench_{name}_rate*.png")])
        body += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
        out += _section(title, name, body, command=COMMANDS.get(name))
    return out


def build() -> str:
    out = [
        "# Benchmarks",
        "",
        f"Machine: {_machine()}. Every figure below is read from `runs/bench/*.json` (copied to",
        "`docs/results/`), written by",
        "the command shown; regenerate this page with `python scripts/benchmarks_report.py` (add `--run` to rerun",
        "everything). These are 2-core CPU figures on small models: they say how the system behaves, not what a",
        "GPU cluster would measure.",
        "",
    ]
    out += _issue11()
    r = _load("engine_overhead")
    if r:
        out += _section(
            "Pipeline engine against the unsplit model",
            "engine_overhead",
            f"Median step {r['median_step_s']['engine']:.3f} s (engine, {r['config']['num_stages']} stages) vs "
            f"{r['median_step_s']['unsplit']:.3f} s (unsplit): ratio **{r['ratio_engine_over_unsplit']:.3f}**.",
        )
    r = _load("overhead")
    if r:
        med, ratios = r["median_tokens_per_s"], r["ratios"]
        peaks = r.get("max_stage_process_rss_mb", {})
        rows = _table(
            ["side", "median tokens/s", "per-round medians", "largest stage-process RSS (MB)"],
            [
                [
                    side,
                    f"{v:.0f}",
                    ", ".join(f"{x:.0f}" for x in r["per_round_median_tokens_per_s"][side]),
                    "-" if peaks.get(side) is None else f"{peaks[side]:.0f}",
                ]
                for side, v in med.items()
            ],
        )
        sides = [
            s for s in ("engine", "engine_swap", "swarm", "swarm_swap", "swarm_redundant", "static") if s in r["losses"]
        ]
        loss = _table(
            ["side", "train loss, mean of last steps (per round)", "final val loss (per round)"],
            [
                [
                    side,
                    ", ".join(f"{x['train_tail']:.4f}" for x in r["losses"][side]),
                    ", ".join("-" if x["val_final"] is None else f"{x['val_final']:.4f}" for x in r["losses"][side]),
                ]
                for side in sides
            ],
        )
        fmt = lambda v: "-" if v is None else f"**{v:.3f}**"
        out += _section(
            "Overhead without failures (side by side, rounds interleaved)",
            "overhead",
            f"{r['rounds']} rounds of {r['steps']} steps per side, config {r['config']}.\n\n"
            + rows
            + f"\n\nMachinery on / off (swarm / static pipeline): {fmt(ratios['machinery_on_over_off'])}; "
            f"CheckFree+ swapped / plain schedule: {fmt(ratios['swap_over_plain_swarm'])} in the swarm, "
            f"{fmt(ratios['swap_over_plain_engine'])} in the engine; redundant computation / plain (swarm): "
            f"{fmt(ratios.get('redundant_over_plain_swarm'))}; swarm / engine: "
            f"{fmt(ratios['swarm_over_engine'])}.\n\nLoss at equal steps:\n\n" + loss,
        )
    for name, what in (("heartbeat_detection", "crash (SIGKILL)"), ("heartbeat_detection_hang", "hang (SIGSTOP)")):
        r = _load(name)
        if r:
            out += _section(
                f"Heartbeat expiry after a {what}",
                name,
                f"period {r['period_s']} s, TTL {r['ttl_s']} s, observer polling every {r['poll_s']} s: "
                f"median **{r['median_s']:.2f} s**, worst {r['max_s']:.2f} s over {len(r['latencies_s'])} trials.",
            )
    r = _load("recovery_latency")
    if r:
        fmt = lambda d: "-" if d is None else f"{d['median']:.2f} [{d['min']:.2f}, {d['max']:.2f}]"
        rows = _table(
            [
                "experiment",
                "stages",
                "d_model",
                "stage params (MB)",
                "DHT period / TTL, watch (s)",
                "kills recovered",
                "detect s",
                "decide s",
                "rendezvous s",
                "transfer s",
                "resume s",
                "kill to first commit s",
            ],
            [
                [
                    name,
                    e["num_stages"],
                    e["d_model"],
                    f"{e['stage_param_bytes'] / 2**20:.2f}",
                    f"{e['period_s']} / {e['ttl_s']}, {e.get('watch_s', '-')}",
                    f"{e['recovered']}/{e['kills']}",
                    fmt(e["detect_s"]),
                    fmt(e.get("decide_s")),
                    fmt(e.get("rendezvous_s")),
                    fmt(e.get("transfer_s")),
                    fmt(e["resume_s"]),
                    fmt(e.get("kill_to_commit_s")),
                ]
                for name, e in r["experiments"].items()
            ],
        )
        _copy_png("recovery_latency.png", "bench_recovery_latency.png")
        out += _section(
            "Recovery latency in the swarm",
            "recovery_latency",
            "Kills of the first, a middle and the last stage per experiment (the base `crash` kills every "
            "stage once); each experiment changes one thing from it. Median [min, max] of each phase: detect "
            "(kill to the first peer noticing), decide (to the new epoch's publication), rendezvous (to the "
            "transfer starting), transfer (weights sent and the stage rebuilt), resume (to the first committed "
            "step: about one step), kill to first commit (all of it).\n\n"
            + rows
            + "\n\n![latency](bench_recovery_latency.png)",
        )
    r = _load("scaling")
    if r:
        rows = _table(
            [
                "stages",
                "microbatches",
                "swarm step s",
                "pipeline bound s",
                "machine bound s",
                "swarm / machine bound",
                "bubble fraction",
                "swarm tokens/s",
                "largest peer RSS MB",
            ],
            [
                [
                    x["stages"],
                    x["microbatches"],
                    f"{x['swarm_step_s']:.3f}",
                    f"{x['pipeline_bound_s']:.3f}",
                    f"{x['machine_bound_s']:.3f}",
                    f"{x['over_machine_bound']:.2f}",
                    f"{x['bubble_fraction']:.2f}",
                    f"{x['swarm_tokens_per_s']:.0f}",
                    f"{x['max_peer_rss_mb']:.0f}",
                ]
                for x in r["rows"]
            ],
        )
        _copy_png("scaling.png", "bench_scaling.png")
        out += _section(
            "Scaling: step time against stages and microbatches",
            "scaling",
            f"{r['cores']} cores, config {r['config']}; bounds from the engine's per-slot compute time "
            "(see the script's docstring).\n\n" + rows + "\n\n![scaling](bench_scaling.png)",
        )
    r = _load("recovery_ablation")
    if r:
        tables = r.get("tables") or {"single": r["table"]}  # results before the adjacent cases had one table
        rows = _table(
            [
                "lost",
                "method",
                "spike right after",
                "final val loss",
                "final ppl",
                "regained within budget",
                "median steps to regain",
            ],
            [
                [
                    kind,
                    m,
                    f"{t['spike_mean']:+.3f} ± {t['spike_std']:.3f}",
                    f"{t['final_val_mean']:.3f} ± {t['final_val_std']:.3f}",
                    f"{t['final_ppl_mean']:.2f}",
                    f"{t['regained_within_budget']}/{t['cases']}",
                    t["steps_to_regain_median"],
                ]
                for kind, table in tables.items()
                for m, t in table.items()
            ],
        )
        cases = (
            ", ".join("{" + ",".join(map(str, c)) + "}" for c in r["cases"]) if "cases" in r else "each middle stage"
        )
        _copy_png("recovery_ablation.png", "bench_recovery_ablation.png")
        out += _section(
            "Recovery quality: weighted average, uniform, copy, random (superseded)",
            "recovery_ablation",
            f"{SUPERSEDED} This ablation trained with the swap on, so with 4 stages both middle stages were swap "
            "partners and 'copy' copied a stage trained to stand in: it did not isolate the rule.\n\n"
            f"Seeds {r['seeds']}, {r['train_steps']} training steps, then each case of stages lost in turn "
            f"({cases}) and {r['after_steps']} more steps. Where a method's source is lost too, its "
            "fallback takes the nearest live stage on each side.\n\n"
            + rows
            + f"\n\nSingle-stage losses, order by final loss: {' < '.join(r['order_by_final_val'])}. The "
            f"paper's order weighted < copy < random holds here: "
            f"**{r['paper_order_weighted_lt_copy_lt_random']}**.\n\n![ablation](bench_recovery_ablation.png)",
        )
    names = {p.name for d in (BENCH, DOCS / "results") for p in d.glob("convergence*.json")}
    for res in sorted(_file(n) for n in names if not n.endswith(".rows.json")):
        r, md = json.loads(res.read_text()), res.with_suffix(".md")
        if "comparisons" in r:
            continue  # issue #11's convergence: in the section above
        pngs = [Path(f"{res.stem}_rate{rate}.png") for rate in r["rates"]]
        for png in pngs:
            _copy_png(png.name, f"bench_{png.name}")
        where = "in the multi-process swarm" if r.get("swarm") else "in the single-process engine"
        out += _section(
            f"Convergence under failures {where} at {', '.join(f'{x:.0%}' for x in r['rates'])} per hour "
            "(nominal), superseded",
            "convergence",
            f"{SUPERSEDED}\n\nRates {r['rates']}, seeds {r['seeds']}, {r['num_steps']} steps; one iteration stands for "
            f"{r['iteration_s']} s accelerated {r['acceleration']}x; target: the failure-free run's validation "
            f"loss at {r.get('target_frac', 0.75):.0%} of its steps.\n\n"
            + md.read_text()
            + "\n"
            + "\n".join(f"![{p.stem}](bench_{p.name})" for p in pngs),
            command=first_convergence_command(r) if res.stem == "convergence" else COMMANDS.get(res.stem),
        )
    reading = DOCS / "BENCHMARKS-reading.md"  # hand-written: what the figures mean, revised with them
    if reading.is_file():
        out += [reading.read_text()]
    return "\n".join(out) + "\n"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="rerun every benchmark first")
    ap.add_argument("--quick", action="store_true", help="with --run: the reduced convergence sweep")
    ap.add_argument(
        "--timeout-s",
        type=float,
        default=6 * 3600.0,  # all of them take about 2 hours on 2 cores: a hung benchmark must not hold --run forever
        help="with --run: give up on a benchmark that runs longer than this (seconds)",
    )
    ns = ap.parse_args()
    if ns.run:
        rerun({name: QUICK.get(name, c) if ns.quick else c for name, c in COMMANDS.items()}, ns.timeout_s)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "BENCHMARKS.md").write_text(build())
    results = DOCS / "results"  # the raw figures behind every table, versioned with the page
    results.mkdir(exist_ok=True)
    for f in sorted(BENCH.glob("*.json")) + sorted(BENCH.glob("*.md")):
        shutil.copy(f, results / f.name)
    print(f"wrote {DOCS / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
