"""
Convergence sweep
=================

The sweep of ``scripts/bench_convergence.py`` (the paper's Table 2): every strategy trained on the same seeded
failures per rate and seed, then read back as the time each run takes to reach targets set by the failure-free
run of its seed. Planned here: each run's overrides and directory (``plan``), ``checkpoint:young``/``:daly``
resolved to ``checkpoint:K`` per rate from a calibration run, the runs not already finished trained ``jobs`` at
a time by the ``train`` function the caller gives (this package imports no executor: the engine's ``Trainer``
or the launcher's swarm is the script's). Analysed here: per-seed rows (steps, seconds and iterations to each
target), the table, the paired ratios to target and final-loss differences with their verdicts, the realised
q; written as the result JSON, its ``.rows.json``, the markdown page of ``checkfree.analysis.sweep_tables`` and
one loss plot per rate.

Lines meant for the operator (progress, one line per run, the cost of a dry run) go to the caller's ``say``;
an option the sweep refuses raises ``UsageError`` with a message that names it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from checkfree import __version__
from checkfree.analysis.calibration import Calibration, interval_rule, read_calibration, resolve_strategy, sweep_cost_s
from checkfree.analysis.convergence_stats import (
    UsageError,
    compare,
    final_loss_differences,
    realised_q,
    sides,
    summarise,
)
from checkfree.analysis.reanalysis import convergence_family, judge_sweep, judged
from checkfree.analysis.runs import read_metrics, run_to_target, val_curve
from checkfree.analysis.sweep_tables import convergence_markdown
from checkfree.config import load_config, split_args, to_yaml
from checkfree.core.metrics import report
from checkfree.plot import plot_runs

Train = Callable[[list[str], list[str], bool], None]  # train(files, overrides, swarm): one run, to its end
Say = Callable[[str], None]  # one line for the operator

CALIBRATION_STEPS = 12  # a failure-free run that saves every 2 steps: the save and step times of the sweep


@dataclass(frozen=True)
class ConvergenceSweep:
    """A sweep as ``scripts/bench_convergence.py`` is given it (its options' names; their help says more)."""

    args: list[str]  # config files and key=value overrides
    rates: list[float]  # hourly stage-failure rates
    seeds: list[int]
    strategies: list[str]
    iteration_s: float  # seconds one iteration stands for
    acceleration: float  # exposure multiplier of each iteration
    target_fracs: list[float]  # targets: these fractions of the failure-free run's progress
    eval_every: int  # validation every k steps
    compare_by: str  # "iterations" or "seconds" to target (engine sweeps; a swarm's compares seconds)
    runs_dir: str
    ours: list[str] | None  # None: checkfree*, hybrid*
    baselines: list[str] | None  # None: checkpoint*, redundant
    jobs: int  # trainings side by side
    swarm: bool
    out: str  # the result JSON; .rows.json, .md and the plots beside it
    analyse_only: bool
    dry_run: bool


@dataclass(frozen=True)
class Setup:
    """What every run of a sweep shares: its config and where its runs live."""

    files: list[str]
    overrides: list[str]  # the command line's, then what the sweep adds (eval_every_steps, the swarm's spares)
    runs_dir: Path
    num_stages: int
    num_steps: int
    threads: int  # torch threads of each run; 0: the config's own


def run_convergence_sweep(sweep: ConvergenceSweep, train: Train, say: Say) -> dict | None:
    """Plan, train what is not finished (none with ``analyse_only``), analyse and write the sweep.

    Returns:
        The result written to ``sweep.out``, or None for a dry run (only the calibration trained).

    Raises:
        UsageError: options the sweep refuses, or runs that ``analyse_only`` finds missing.
    """
    setup = prepare(sweep)
    cal = calibrate_if_needed(sweep, setup, train)
    intervals = _intervals(sweep, cal, setup.num_stages)
    tasks, runs = plan(sweep, setup, intervals)
    if sweep.dry_run:
        say_cost(setup.files, tasks, cal, intervals, setup.num_steps, sweep.jobs, say)
        return None
    if sweep.analyse_only:
        check_finished(tasks)
    else:
        run_all(setup.files, tasks, sweep.jobs, train, say, sweep.swarm)
    rows = read_rows(sweep, runs, say)
    plot_rates(sweep, runs)
    result = analyse(sweep, setup, rows, cal, intervals)
    write(result, rows, sweep.out)
    return result


def prepare(sweep: ConvergenceSweep) -> Setup:
    """The sweep's config (loaded, so that a bad one fails first) and its runs directory (made)."""
    sides(sweep.strategies, sweep.ours, sweep.baselines)  # a typo in --ours/--baselines, before anything trains
    files, overrides = split_args(sweep.args)
    overrides = [*overrides, f"eval_every_steps={sweep.eval_every}"]
    runs_dir = Path(sweep.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = load_config(files, overrides)
    num_stages = base.model.num_stages
    threads = 1 if sweep.jobs > 1 else 0
    if sweep.swarm:  # the peers' share of the cores, set explicitly so that a finished run's config matches
        threads = max(1, (os.cpu_count() or 1) // num_stages)
        overrides = [*overrides, "swarm.num_spares=2"]
    return Setup(files, overrides, runs_dir, num_stages, base.num_steps, threads)


def effective_rate(rate: float, acceleration: float) -> float:
    """The per-stage hourly failure rate a run actually meets when each iteration stands for
    ``acceleration`` times its time (a 33%/h rate accelerated 2.5x is 63%/h)."""
    return 1.0 - (1.0 - rate) ** acceleration


def _draws(rate: float, seed: int, iteration_s: float, accel: float) -> list[str]:
    return [
        "failures.mode=hourly",
        f"failures.hourly_rate={rate}",
        f"failures.iteration_time_s={iteration_s}",
        f"failures.time_acceleration={accel}",
        f"failures.seed={1000 + seed}",
    ]


def _args(overrides, runs_dir: Path, name: str, strategy: str, seed: int, draws: list[str] | None, threads: int):
    args = [
        *overrides,
        f"seed={seed}",
        f"out_dir={runs_dir}",
        f"run_name={name}",
        "progress=false",
        "plot=false",
        "overwrite=true",
    ]
    if threads:
        args.append(f"num_threads={threads}")
    kind, _, k = strategy.partition(":")
    args.append(f"recovery.strategy={kind}")
    if kind in ("checkpoint", "hybrid") and k:
        args.append(f"checkpoint.every_steps={k}")
    args += draws if draws else ["failures.mode=none"]
    return args


def _run_name(strategy: str, rate: float, seed: int) -> str:
    return f"none-s{seed}" if strategy == "none" else f"{strategy.replace(':', 'K')}-r{rate}-s{seed}"


def plan(sweep: ConvergenceSweep, setup: Setup, intervals: dict) -> tuple[list, dict]:
    """Every run of the sweep as (its overrides, its directory), the failure-free ones first, and the
    directories by (strategy, rate, seed); checkpoint:young/daly trains at its interval for the rate."""
    overrides, runs_dir, threads = setup.overrides, setup.runs_dir, setup.threads
    tasks, runs = [], {}
    for seed in sweep.seeds:
        runs["none", 0.0, seed] = runs_dir / _run_name("none", 0.0, seed)
        args = _args(overrides, runs_dir, _run_name("none", 0.0, seed), "none", seed, None, threads)
        tasks.append((args, runs["none", 0.0, seed]))
    for rate in sweep.rates:
        for seed in sweep.seeds:
            draws = _draws(rate, seed, sweep.iteration_s, sweep.acceleration)
            for strategy in sweep.strategies:
                if strategy == "none":
                    continue
                trained_as = intervals.get(strategy, {}).get(rate, strategy)
                runs[strategy, rate, seed] = runs_dir / _run_name(strategy, rate, seed)
                args = _args(overrides, runs_dir, _run_name(strategy, rate, seed), trained_as, seed, draws, threads)
                tasks.append((args, runs[strategy, rate, seed]))
    return tasks, runs


def _done(files, args, run_dir: Path) -> bool:
    """A finished run of exactly this config (its resolved config.yaml matches what it would be now) by
    this version of checkfree (another version may draw other data, weights or failures)."""
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    if json.loads((run_dir / "summary.json").read_text()).get("checkfree_version") != __version__:
        return False
    return (run_dir / "config.yaml").read_text() == to_yaml(load_config(files, args))


def run_all(files, tasks: list[tuple[list[str], Path]], jobs: int, train: Train, say: Say, swarm: bool = False) -> None:
    """Train every (args, run_dir) not already done, ``jobs`` at a time, each in its own process (``train``
    must then be picklable: a module-level function)."""
    todo = [(args, d) for args, d in tasks if not _done(files, args, d)]
    say(f"{len(tasks) - len(todo)} of {len(tasks)} runs already done; {len(todo)} to run with {jobs} job(s)")
    if jobs <= 1 or swarm:
        for args, d in todo:
            train(files, args, swarm)
            say(f"finished {d.name}")
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train, files, args, False): d for args, d in todo}
        for f in as_completed(futures):
            f.result()  # a failed run stops the sweep with its error
            say(f"finished {futures[f].name}")


def check_finished(tasks: list[tuple[list[str], Path]]) -> None:
    """``--analyse-only`` analyses the runs as they are: every one must have finished.

    Raises:
        UsageError: some runs have no summary.json.
    """
    missing = [str(d) for _, d in tasks if not (d / "summary.json").is_file()]
    if missing:
        raise UsageError(f"--analyse-only: {len(missing)} runs have no summary.json, e.g. {missing[:3]}")


def _interval_rule(strategy: str) -> str | None:
    """``interval_rule``, its refusal of hybrid:young/daly said as the option's.

    Raises:
        UsageError: hybrid:young or hybrid:daly.
    """
    try:
        return interval_rule(strategy)
    except ValueError as e:
        raise UsageError(f"--strategies {e}") from e


def calibrate_if_needed(sweep: ConvergenceSweep, setup: Setup, train: Train) -> Calibration | None:
    """The calibration of a sweep with checkpoint:young/daly or a dry run, else None.

    Raises:
        UsageError: hybrid:young/daly, a calibration asked of the swarm, or none found by ``analyse_only``.
    """
    needs_cal = sweep.dry_run or any(_interval_rule(s) for s in sweep.strategies)
    if needs_cal and sweep.swarm:
        raise UsageError("--swarm: checkpoint:young/daly and --dry-run calibrate in the engine; give K by hand")
    return _calibrate(setup, train, may_train=not sweep.analyse_only) if needs_cal else None


def _calibrate(setup: Setup, train: Train, may_train: bool = True) -> Calibration:
    """The save and step times of this machine and storage under the sweep's config (kept in
    RUNS_DIR/calibration and reused while the config matches; ``may_train`` False: it must be there)."""
    files, runs_dir = setup.files, setup.runs_dir
    args = _args(setup.overrides, runs_dir, "calibration", "checkpoint:2", 0, None, setup.threads)
    args.append(f"num_steps={CALIBRATION_STEPS}")
    if not _done(files, args, runs_dir / "calibration"):
        if not may_train:
            raise UsageError(f"--analyse-only: no calibration run of this config in {runs_dir / 'calibration'}")
        train(files, args, False)
    return read_calibration(runs_dir / "calibration")


def _intervals(sweep: ConvergenceSweep, cal: Calibration | None, num_stages: int) -> dict:
    """Each checkpoint:young/daly strategy's interval per rate, as checkpoint:K (a rate with no failures named).

    Raises:
        UsageError: hybrid:young/daly, or a rate with no failures.
    """
    try:
        return {
            s: {r: resolve_strategy(s, cal, r, num_stages, sweep.iteration_s, sweep.acceleration) for r in sweep.rates}
            for s in sweep.strategies
            if _interval_rule(s)
        }
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from e


def say_cost(files, tasks, cal: Calibration, intervals: dict, steps: int, jobs: int, say: Say) -> None:
    """The intervals the calibration gives, and what the runs left would cost (``sweep_cost_s``, a lower
    bound), over ``jobs``."""
    for strategy, by_rate in intervals.items():
        say(f"{strategy}: " + ", ".join(f"{r:g}/h -> {s}" for r, s in by_rate.items()))
    left = [d for args, d in tasks if not _done(files, args, d)]
    seconds = sweep_cost_s(len(left), steps, cal)
    say(
        f"calibration: save {cal.save_s:.3g} s (median of {cal.saves}), step {cal.step_s:.3g} s (median of "
        f"{cal.steps}); {len(left)} of {len(tasks)} runs left x {steps} steps: at least {seconds / 3600:.1f} h of "
        f"training, {seconds / jobs / 3600:.1f} h with --jobs {jobs} (rollbacks, saves and redundant computation's "
        "extra work not included)"
    )


def _targets(ref_dir: Path, fracs: Sequence[float]) -> dict[float, float]:
    """The loss at each fraction of the progress a failure-free run makes, from its first to its best."""
    ref = val_curve(read_metrics(ref_dir))
    first, best = ref[0].loss, min(p.loss for p in ref)
    return {f: first - f * (first - best) for f in fracs}


def _row(sweep: ConvergenceSweep, rate: float, seed: int, strategy: str, run_dir: Path, targets: dict) -> dict:
    """One run's summary and its steps, seconds and iterations to each target (None: not reached)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {
        "rate": rate,
        "effective_rate": effective_rate(rate, sweep.acceleration),
        "seed": seed,
        "strategy": strategy,
        "final_val": summary["final_val_loss"],
        "train_s": summary.get("train_s"),
        "failures": summary["failures"],
        "recoveries": summary["recoveries"],
        "iterations": summary.get("iterations"),
    }
    for f, target in targets.items():
        got = run_to_target(run_dir, target)
        to_step, to_s, to_it = (got.steps, got.seconds, got.iterations) if got else (None, None, None)
        row[f"target@{f}"] = target
        row[f"steps@{f}"], row[f"seconds@{f}"], row[f"iterations@{f}"] = to_step, to_s, to_it
    return row


def read_rows(sweep: ConvergenceSweep, runs: dict, say: Say) -> list[dict]:
    """One row per (seed, rate, strategy), each said as it is read."""
    rows = []
    for seed in sweep.seeds:
        targets = _targets(runs["none", 0.0, seed], sweep.target_fracs)
        for rate in sweep.rates:
            for strategy in sweep.strategies:
                row = _row(
                    sweep, rate, seed, strategy, runs[strategy, 0.0 if strategy == "none" else rate, seed], targets
                )
                rows.append(row)
                say(
                    f"rate {rate:.2f} (effective {row['effective_rate']:.0%}/h) seed {seed} {strategy:14s} "
                    + " ".join(f"{f:.0%}: {row[f'steps@{f}']} steps" for f in sweep.target_fracs)
                    + f", final val {row['final_val']:.3f}, failures {row['failures']}"
                )
    return rows


def plot_rates(sweep: ConvergenceSweep, runs: dict) -> None:
    """One loss plot per rate of the first seed's runs, beside ``sweep.out`` (``STEM_rateRATE.png``)."""
    out = Path(sweep.out)
    for rate in sweep.rates:
        seed0 = [runs[(s, rate if s != "none" else 0.0, sweep.seeds[0])] for s in sweep.strategies]
        plot_runs(seed0, out.with_name(f"{out.stem}_rate{rate}.png"), labels=sweep.strategies)


def analyse(sweep: ConvergenceSweep, setup: Setup, rows: list[dict], cal: Calibration | None, intervals: dict) -> dict:
    """The sweep's result: its design, the table, the judged comparisons and differences, the realised q."""
    table = summarise(rows, sweep.rates, sweep.strategies, sweep.target_fracs)
    # iterations are immune to the load of a shared machine (runs of a sweep do not run side by side); a swarm
    # sweep is run for wall-clock truth (detection, rendezvous, transfer), so its comparison is by seconds (and
    # its runs from before the swarm logged iterations have none)
    by = "seconds" if sweep.swarm else sweep.compare_by
    comparisons = compare(rows, sweep.rates, sweep.strategies, sweep.target_fracs, by, sweep.ours, sweep.baselines)
    differences = final_loss_differences(rows, sweep.rates, sweep.strategies, sweep.ours, sweep.baselines)
    judge_sweep(comparisons, differences, rows)  # verdicts that hold: t and BCa intervals, Holm over the sweep
    qs = realised_q(rows, sweep.rates, sweep.strategies, sweep.target_fracs) if "none" in sweep.strategies else []
    return {
        "num_steps": setup.num_steps,
        "rates": sweep.rates,
        "effective_rates": [effective_rate(r, sweep.acceleration) for r in sweep.rates],
        "seeds": sweep.seeds,
        "iteration_s": sweep.iteration_s,
        "acceleration": sweep.acceleration,
        "target_fracs": sweep.target_fracs,
        "eval_every": sweep.eval_every,
        "jobs": sweep.jobs,
        "swarm": sweep.swarm,
        "table": table,
        "comparisons": comparisons,
        "final_val_differences": differences,
        "realised_q": qs,
        "calibration": cal.as_dict() if cal else None,
        "checkpoint_intervals": intervals,
        "run_dirs": str(setup.runs_dir),
    }


def write(result: dict, rows: list[dict], out: str | Path) -> None:
    """The result as JSON (also printed), the rows beside it (``.rows.json``) and its page (``.md``)."""
    report(result, out)
    Path(out).with_suffix(".rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    # the page regenerated pages have (checkfree.analysis.sweep_tables): t, BCa, Holm p and the verdict that holds
    verdicts = judged(*convergence_family(result, rows))
    Path(out).with_suffix(".md").write_text(convergence_markdown(result, verdicts))
