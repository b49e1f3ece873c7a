"""The swap tax: how many more steps CheckFree+'s swapped schedule needs than the plain one, without failures.

For each layout (``--configs``: configs/bench.yaml, 4 stages, where every block stage is out of place on a
swapped microbatch; configs/deep.yaml, 6 stages, where stages 2-3 stay in place), each seed (``--seeds``) trains
the plain schedule once (``recovery.strategy=checkfree pipeline.swap=false``) and, for each swapped fraction
(``--fractions``, of ``--microbatches`` microbatches a step) and each learning-rate scale (``--lr-scales``,
applied to the swapped runs only: a retuned lr), the swapped one (``recovery.strategy=checkfree_plus
pipeline.swap=true pipeline.swap_fraction=F``), all with ``failures.mode=none``, ``--steps`` steps and
validation every ``--eval-every`` steps on the config's fixed validation batches.

Targets, as in scripts/bench_convergence.py: for each seed, ``--target-fracs`` (50/75/90%) of the progress the
plain run of that seed makes from its first to its best validation loss, ``target = first - frac * (first -
best)``. Steps to a target: the first evaluation at or below it (so the best-so-far curve crosses it there).
The tax at a target is the per-seed ratio steps_swap / steps_plain, paired by seed (same init, same batches):
geometric mean with a 95% t interval on the log ratios, a BCa bootstrap beside it, and Holm's correction over
the whole family (every layout, fraction, lr scale and target, and the final-loss differences); a verdict is
claimed only where both intervals exclude 1 and it survives Holm (``checkfree.analysis.stats.judge``). A
swapped run that never reaches a target is not dropped: it is counted as reaching it at step ``--steps + 1``
(the earliest it could have), so that ratio, and the tax, are lower bounds; the table says how many seeds
were censored. The final validation loss difference (swap - plain) gets the same treatment (null 0).

Runs go through ``checkfree.analysis.sweep`` (``--jobs`` at a time, one torch thread each; finished runs of
the same config are skipped, so the sweep can be run in parts and resumed). ``--dry-run`` trains nothing and
prints the sweep's cost: runs left x (steps x seconds per step + start-up), over ``--jobs``. Writes
``--out`` (JSON, every per-seed value) and the markdown table beside it.

    python scripts/bench_swap_tax.py --configs configs/bench.yaml configs/deep.yaml --seeds 0 1 2 3 4 5 6 7 8 9 \\
        --steps 600 --jobs 2 --dry-run
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from checkfree.analysis.stats import Comparison
from checkfree.analysis.swap_tax import GOAL, family, goal_met, paired_row, tables
from checkfree.analysis.sweep import RunSpec, SweepError, is_done, run_sweep
from checkfree.analysis.tables import markdown_table
from checkfree.config import load_config
from checkfree.core.schedule import swapped_count

# Seconds per step (train_s / steps) with 8 microbatches, one torch thread, eval every 2 steps, measured
# 2026-12-07 over 20 steps of each config as given, one run alone while the 2 cores carried other work (load
# average ~6); two bench runs side by side then took 1.02 s/step each. Used only for those configs at 8
# microbatches without --set; the dry run prefers finished runs in --runs-dir, and --step-s overrides both.
MEASURED_STEP_S = {"bench": 0.76, "deep": 1.32}
STARTUP_S = 9.0  # wall-clock of a 20-step run minus its train_s, same measurement (imports, data, saves)


@dataclass(frozen=True)
class Arm:
    """One run of the sweep; ``fraction`` None: the plain schedule."""

    layout: str  # the config file's stem
    seed: int
    fraction: float | None = None
    lr_scale: float = 1.0

    @property
    def name(self) -> str:
        if self.fraction is None:
            return f"{self.layout}-plain-s{self.seed}"
        return f"{self.layout}-swap{self.fraction:g}-lrx{self.lr_scale:g}-s{self.seed}"


def plan(ns: argparse.Namespace) -> dict[Arm, RunSpec]:
    """Every run of the sweep, plain runs first, in the order they train."""
    out: dict[Arm, RunSpec] = {}
    for config in ns.configs:
        layout = Path(config).stem
        base = load_config([config], ns.set)
        common = [
            *ns.set,
            f"num_steps={ns.steps}",
            f"eval_every_steps={ns.eval_every}",
            f"pipeline.num_microbatches={ns.microbatches}",
            "failures.mode=none",
        ]
        for seed in ns.seeds:
            plain = ["recovery.strategy=checkfree", "pipeline.swap=false", f"seed={seed}"]
            out[Arm(layout, seed)] = RunSpec(Arm(layout, seed).name, (config,), (*common, *plain))
        for fraction in ns.fractions:
            for scale in ns.lr_scales:
                swap = ["recovery.strategy=checkfree_plus", "pipeline.swap=true", f"pipeline.swap_fraction={fraction}"]
                if scale != 1.0:
                    swap.append(f"optim.lr={base.optim.lr * scale!r}")
                for seed in ns.seeds:
                    arm = Arm(layout, seed, fraction, scale)
                    out[arm] = RunSpec(arm.name, (config,), (*common, *swap, f"seed={seed}"))
    return out


# ---- cost -------------------------------------------------------------------------------------------------
def step_seconds(ns: argparse.Namespace, runs: dict[Arm, RunSpec]) -> dict[str, tuple[float | None, str]]:
    """Per layout: (seconds per step, where it comes from): --step-s, else the median over the finished runs in
    --runs-dir, else this script's measurement (MEASURED_STEP_S), else unknown (None)."""
    out: dict[str, tuple[float | None, str]] = {}
    for i, config in enumerate(ns.configs):
        layout = Path(config).stem
        if ns.step_s:
            out[layout] = (ns.step_s[min(i, len(ns.step_s) - 1)], "--step-s")
            continue
        done = [ns.runs_dir / s.name / "summary.json" for a, s in runs.items() if a.layout == layout]
        per_step = [d["train_s"] / d["steps"] for d in map(_json, done) if d and d.get("train_s") and d.get("steps")]
        if per_step:
            out[layout] = (statistics.median(per_step), f"median of {len(per_step)} finished runs in --runs-dir")
        elif layout in MEASURED_STEP_S and ns.microbatches == 8 and not ns.set:
            out[layout] = (MEASURED_STEP_S[layout], "measured 2026-12-07, 1 run on 2 loaded cores")
        else:
            out[layout] = (None, "unknown: pass --step-s")
    return out


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cost(ns: argparse.Namespace, runs: dict[Arm, RunSpec]) -> tuple[list[list], float | None]:
    """Rows (layout, runs, left, steps, s/step, source, run-seconds left) and the wall-clock hours over --jobs."""
    rows, total = [], 0.0
    for layout, (per_step, source) in step_seconds(ns, runs).items():
        mine = [s for a, s in runs.items() if a.layout == layout]
        left = [s for s in mine if not is_done(s, ns.runs_dir)]
        seconds = len(left) * (ns.steps * per_step + STARTUP_S) if per_step is not None else None
        total = total + seconds if seconds is not None and total is not None else None
        shown = lambda x, fmt: "-" if x is None else format(x, fmt)
        rows.append([layout, len(mine), len(left), ns.steps, shown(per_step, ".3g"), source, shown(seconds, ",.0f")])
    return rows, None if total is None else total / ns.jobs / 3600


# ---- analysis ---------------------------------------------------------------------------------------------
def per_seed(ns: argparse.Namespace, runs: dict[Arm, RunSpec]) -> list[dict]:
    """One row per swapped run, paired with its seed's plain run (``checkfree.analysis.swap_tax.paired_row``)."""
    rows = []
    for arm, spec in runs.items():
        if arm.fraction is None:
            continue
        plain_dir = ns.runs_dir / runs[Arm(arm.layout, arm.seed)].name
        row = {"layout": arm.layout, "fraction": arm.fraction, "lr_scale": arm.lr_scale, "seed": arm.seed}
        rows.append(row | paired_row(plain_dir, ns.runs_dir / spec.name, ns.target_fracs, ns.steps))
    return rows


def markdown(ns: argparse.Namespace, judged: list[tuple[dict, Comparison]]) -> str:
    ratio_h, ratio, diff_h, diff = tables(judged)
    intro = (
        f"Swap tax without failures: {len(ns.seeds)} seeds, {ns.steps} steps, {ns.microbatches} microbatches a step, "
        f"validation every {ns.eval_every} steps. Targets: {', '.join(f'{f:.0%}' for f in ns.target_fracs)} of the "
        "plain run's progress from its first to its best validation loss, per seed. Tax: steps to the target, "
        "swapped over plain, paired by seed; geometric mean, 95% t interval on the log ratios, BCa beside it, "
        "Holm over every row of both tables. A swapped run that never reached a target counts at step "
        f"{ns.steps + 1} (censored: the tax is then a lower bound). Fraction: share of microbatches swapped; lr: "
        f"the swapped runs' learning rate over the config's. '<= {GOAL}x': the t interval's upper end is within "
        f"the goal with no censored seed (yes), its lower end is above it (no), or neither (undecided).\n"
    )
    return "\n".join(
        [
            intro,
            markdown_table(ratio_h, ratio),
            "Final validation loss, swapped minus plain (paired by seed, 95% t interval, BCa, Holm).\n",
            markdown_table(diff_h, diff),
            "Command: `python scripts/bench_swap_tax.py " + " ".join(ns.argv) + "`\n",
        ]
    )


def result(ns: argparse.Namespace, rows: list[dict], judged: list[tuple[dict, Comparison]]) -> dict:
    return {
        "configs": ns.configs,
        "overrides": ns.set,
        "seeds": ns.seeds,
        "steps": ns.steps,
        "num_microbatches": ns.microbatches,
        "fractions": ns.fractions,
        "lr_scales": ns.lr_scales,
        "eval_every": ns.eval_every,
        "target_fracs": ns.target_fracs,
        "target_rule": "first - frac * (first - best) of the plain run's validation curve, same seed",
        "censoring": f"a swapped run that never reaches a target counts at step {ns.steps + 1} (a lower bound)",
        "verdict_rule": "t and BCa intervals both exclude no difference and Holm-adjusted p < 0.05 over the family",
        "goal": GOAL,
        "comparisons": [{**k, **c.as_dict(), "within_goal": goal_met(k, c)} for k, c in judged],
        "rows": rows,
        "runs_dir": str(ns.runs_dir),
        "command": ["python", "scripts/bench_swap_tax.py", *ns.argv],
    }


# ---- the command line -------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["configs/bench.yaml", "configs/deep.yaml"])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--lr-scales", type=float, nargs="+", default=[1.0], help="swapped runs' lr over the config's")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--microbatches", type=int, default=8, help="pipeline.num_microbatches of every run")
    ap.add_argument("--eval-every", type=int, default=2, help="validation every k steps (fixed batches)")
    ap.add_argument("--target-fracs", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run")
    ap.add_argument("--jobs", type=int, default=2, help="trainings side by side, one torch thread each")
    ap.add_argument("--timeout-s", type=float, default=None, help="per run (default: 4x its estimated time)")
    ap.add_argument("--step-s", type=float, nargs="+", default=None, help="seconds per step, one per config")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench/swap-tax-runs"))
    ap.add_argument(
        "--out", type=Path, default=Path("runs/bench/swap_tax.json"), help="the result JSON (the markdown beside it)"
    )
    ap.add_argument("--dry-run", action="store_true", help="train nothing: print the cost of the runs left")
    ap.add_argument("--analyse-only", action="store_true", help="train nothing: analyse the finished runs")
    ns = ap.parse_args(argv)
    stems = [Path(c).stem for c in ns.configs]
    if len(set(stems)) < len(stems):
        ap.error(f"--configs {ns.configs}: each layout is named after its file's stem, and these repeat")
    bad = [f for f in ns.fractions if swapped_count(ns.microbatches, f) == 0]
    if bad:
        ap.error(f"--fractions {bad} swap no microbatch of {ns.microbatches}")
    if ns.out.suffix != ".json":
        ap.error(f"--out {ns.out}: expected a .json file (the markdown table is written beside it, as .md)")
    ns.argv = argv if argv is not None else sys.argv[1:]
    return ns


def print_cost(ns: argparse.Namespace, runs: dict[Arm, RunSpec]) -> float | None:
    rows, hours = cost(ns, runs)
    headers = ["layout", "runs", "left", "steps", "s/step", "s/step from", "run-seconds left"]
    print(tabulate(rows, headers=headers, disable_numparse=True))
    per = f"{hours:.1f} h ({hours * 60:.0f} min)" if hours is not None else "unknown (a layout has no s/step)"
    print(f"estimated wall-clock with --jobs {ns.jobs} (start-up {STARTUP_S:g} s a run included): {per}", flush=True)
    return hours


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ns = parse(argv)
    runs = plan(ns)
    print_cost(ns, runs)
    if ns.dry_run:
        return
    if ns.analyse_only:
        missing = [s.name for s in runs.values() if not is_done(s, ns.runs_dir)]
        if missing:
            raise SystemExit(
                f"--analyse-only: {len(missing)} runs are missing or are not of this sweep's config (steps, "
                f"fraction, seed, checkfree version), e.g. {missing[:3]}"
            )
    else:
        known = [p for p, _ in step_seconds(ns, runs).values() if p is not None]
        if not ns.timeout_s and len(known) < len(ns.configs):
            raise SystemExit("bench_swap_tax: a config has no measured seconds per step: pass --step-s or --timeout-s")
        timeout_s = ns.timeout_s or 4 * (ns.steps * max(known) + STARTUP_S)
        try:
            run_sweep(list(runs.values()), ns.runs_dir, jobs=ns.jobs, timeout_s=timeout_s)
        except SweepError as e:
            raise SystemExit(f"bench_swap_tax: {e}") from e
    rows = per_seed(ns, runs)
    judged = family(rows, ns.target_fracs, ns.steps)
    ratio_h, ratio, diff_h, diff = tables(judged)
    print(tabulate(ratio, headers=ratio_h, disable_numparse=True))
    print(tabulate(diff, headers=diff_h, disable_numparse=True))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result(ns, rows, judged), indent=1) + "\n")
    ns.out.with_suffix(".md").write_text(markdown(ns, judged))
    print(f"wrote {ns.out} and {ns.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
