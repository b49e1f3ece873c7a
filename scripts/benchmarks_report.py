"""Regenerate docs/benchmarks/results.md from the benchmark results (``--run`` first reruns the benchmarks
at the documented scale, copies the results that run wrote into docs/results and re-analyses them). Each
entry's ``--dry-run`` (convergence sweeps) costs it: most take minutes to an hour on 2 cores, the paper-scale
comparisons (paper_local, paper_slow) 11 to 55 hours; entries that need root run only when named with
``--only``.

    python scripts/benchmarks_report.py [--run] [--only NAME ...] [--quick] [--timeout-s SECONDS]

The commands are ``checkfree.analysis.benchmarks``: argument lists run without a shell; how a recorded result
was actually made, where that differs from its command (runs trained apart and moved in), is its
``provenance``, shown on the page apart from the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from checkfree.analysis.benchmarks import ANALYSES, COMMANDS, QUICK, ROOT, Command, fresh_results, rerun, select
from checkfree.analysis.tables import markdown_table

BENCH = ROOT / "runs" / "bench"
DOCS = ROOT / "docs"
PAGES = DOCS / "benchmarks"  # results.md (written here), findings.md and issue11.md (by hand), the index
IMAGES = PAGES / "images"
RESULTS = DOCS / "results"  # the raw figures behind every table, versioned with the page


def _file(name: str) -> Path:
    """A result file, as versioned in docs/results/ (``--run`` copies the fresh ones there first)."""
    return RESULTS / name


def _load(name: str) -> dict | None:
    p = _file(f"{name}.json")
    return json.loads(p.read_text()) if p.is_file() else None


def _copy_png(name: str, doc_name: str) -> None:
    """Copy a fresh figure into the page's images (a figure from an earlier run is already there)."""
    if (BENCH / name).is_file():
        IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(BENCH / name, IMAGES / doc_name)


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
    """A page section: its title, the command that made its result, how the result was made where that
    differs from the command, and the body."""
    command = command or COMMANDS.get(name) or ANALYSES.get(name)
    lines = [f"## {title}", "", "Command: `?`" if command is None else f"Command: `{command.shown()}`", ""]
    if command is not None and command.provenance:
        lines += [f"How the recorded result was made: {command.provenance}.", ""]
    return [*lines, body, ""]


def _issue11() -> list[str]:
    """The measurements behind "when does CheckFree beat checkpointing?" (issue #11)."""
    out = ["# When does CheckFree beat checkpointing?", ""]
    reading = PAGES / "issue11.md"  # hand-written: what the figures below say, with their data
    if reading.is_file():
        out += [reading.read_text(), ""]
    for name, title in (
        ("q_scan", "Where losing a stage hurts: the jump of a rebuild against training progress"),
        ("q_bench", "q: extra steps to the target per lost stage, per method and position (bench, 5 seeds)"),
        ("q_tiny", "q at the tiny default's scale (CheckFree+, 5 seeds)"),
        ("q_deep", "q on 6 stages after 1000 steps (configs/deep.yaml; 5 seeds, swap off and CheckFree+)"),
        ("fig2_deep", "The paper's Fig. 2 setup on 6 stages: swap off, middle stages failing at 16%/h"),
        ("convergence_ci", "Convergence under failures against checkpointing to local disk, paired intervals"),
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
        ("whatif_null", "What-if: the cost model against the null predictor (each run's own seconds per iteration)"),
        ("whatif_paper_table2", "What-if at the paper's scale beside its Table 2 (the fitted q, overlap and swap tax)"),
        ("convergence_neighbours", "Convergence when neighbours are lost together (failures.neighbour_prob=0.5)"),
        ("convergence_neighbours_hybrid", "The hybrid against CheckFree+ when neighbours are lost together"),
        (
            "bpe5m",
            "The largest scale here: 6.3M parameters on 4096-token BPE, CheckFree+ against checkpointing at its "
            "Young interval at 10%/h (3 seeds)",
        ),
        ("bpe5m_redundant", "The largest scale here: CheckFree+ against redundant computation at 10%/h (3 seeds)"),
    ):
        r = _load(name)
        md = _file(f"{name}.md")
        if r is None or not md.is_file():
            continue
        body = md.read_text()
        for png in sorted([*BENCH.glob(f"{name}.png"), *BENCH.glob(f"{name}_rate*.png")]):
            _copy_png(png.name, f"bench_{png.name}")
        pngs = sorted([*IMAGES.glob(f"bench_{name}.png"), *IMAGES.glob(f"bench_{name}_rate*.png")])
        body += "\n" + "\n".join(f"![{p.stem}](images/{p.name})" for p in pngs)
        out += _section(title, name, body, command=COMMANDS.get(name))
    return out


SWARM_RUNS = (
    ("soak_200events_final", "Chaos soak: 200 events on the swarm, failures during recoveries (tiny model)"),
    ("soak_100events_framed", "Chaos soak: 100 events after the framed step messages (tiny model)"),
    ("multihost_scenario", "Multi-host scenario: a kill, a vanished host, a partition and a preemption notice"),
)


def _swarm_runs() -> list[str]:
    """The soaks' and the multi-host scenario's own reports, each under its section (its title line dropped)."""
    out = []
    for name, title in SWARM_RUNS:
        md = _file(f"{name}.md")
        if md.is_file():
            lines = md.read_text().splitlines()
            body = "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines)  # its own title dropped
            out += _section(title, name, body.strip())
    return out


def build() -> str:
    out = [
        "# Benchmarks",
        "",
        f"Page generated on: {_machine()}; the machine the results were measured on is named in",
        "[findings.md](findings.md). Every figure below is read from [docs/results/](../results/), written by the",
        "command shown; regenerate this page with `python scripts/benchmarks_report.py` (add `--run` to rerun",
        "everything, `--run --only NAME ...` for some). These are 2-core CPU figures on small models: they say how",
        "the system behaves, not what a GPU cluster would measure. Verdicts in the convergence tables are the",
        "re-analysis's: t interval on the per-seed log ratios (or differences) and a BCa bootstrap, both excluding",
        "no difference, and Holm's correction over the sweep ([reanalysis.md](../results/reanalysis.md)).",
        "Superseded sections are in [CHANGELOG.md](../CHANGELOG.md#superseded-measurements).",
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
        rows = markdown_table(
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
        loss = markdown_table(
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
        rows = markdown_table(
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
            + "\n\n![latency](images/bench_recovery_latency.png)",
        )
    r = _load("scaling")
    if r:
        rows = markdown_table(
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
            "(see the script's docstring).\n\n" + rows + "\n\n![scaling](images/bench_scaling.png)",
        )
    out += _swarm_runs()
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="rerun the benchmarks (all, or --only) and the analyses first")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="with --run: only these entries (e.g. convergence_ci)")
    ap.add_argument("--quick", action="store_true", help="with --run: the reduced convergence sweep")
    ap.add_argument(
        "--timeout-s",
        type=float,
        default=6 * 3600.0,  # a hung benchmark must not hold --run forever
        help="with --run: give up on a benchmark that runs longer than this (seconds; an entry whose --dry-run "
        "costs it above that, paper_local or paper_slow say, needs more)",
    )
    ns = ap.parse_args()
    if ns.run:
        try:
            benchmarks, analyses = select(COMMANDS, ns.only), select(ANALYSES, ns.only or list(ANALYSES))
        except ValueError as e:
            ap.error(str(e))
        chosen = {name: QUICK.get(name, c) if ns.quick else c for name, c in benchmarks.items()}
        left_out = [name for name, c in COMMANDS.items() if ns.only is None and c.only_when_named]
        for name in left_out:
            print(f"not run: {name} ({COMMANDS[name].only_when_named}; --only {name} runs it)", flush=True)
        started = time.time()
        rerun(chosen, ns.timeout_s)
        try:
            fresh = fresh_results(chosen, BENCH, started)
        except FileNotFoundError as e:
            ap.error(str(e))
        RESULTS.mkdir(parents=True, exist_ok=True)
        for f, name in fresh.items():
            shutil.copyfile(f, RESULTS / name)
        if ns.quick:
            print(f"the quick sweep's results are under {BENCH / 'quick'} (not copied into docs/results)")
        rerun(analyses, ns.timeout_s)  # they read docs/results: after the copy
    PAGES.mkdir(parents=True, exist_ok=True)
    (PAGES / "results.md").write_text(build())
    print(f"wrote {PAGES / 'results.md'}")


if __name__ == "__main__":
    main()
