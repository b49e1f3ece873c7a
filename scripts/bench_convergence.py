"""Convergence under failures (the paper's Table 2), every strategy really run on the same failures.

For each hourly stage-failure rate and seed, every strategy meets the same failures: the seeded draws
of ``failures.mode=hourly`` (the paper's medium-model iteration of ``--iteration-s`` seconds, exposure
multiplied by ``--acceleration``), one draw per iteration and stage, made lazily for as many iterations as
each run takes (a strategy that redoes work stays exposed while it does); ``none`` is the failure-free
reference. Rates are labelled with the *effective* per-stage hourly rate, ``1 - (1 - rate) ** acceleration``.

Validation every ``--eval-every`` steps on the config's fixed validation batches. Targets: 50/75/90%
(``--target-fracs``) of the progress the failure-free run of the same seed makes (from its first to its
best validation loss), read from best-so-far curves. Per seed: steps and training seconds to each target,
or "not reached" (counted, never averaged away). Ratios to target, CheckFree(+) or the hybrid over each
baseline, are paired per seed (same data, same failures) with 95% intervals over seeds (t on log ratios); a
verdict is given only where >= 5 seeds give an interval that excludes 1, else "not resolved". The ratios
compare *iterations* to target by default (``--compare-by``): every step attempt, redone and interrupted
ones included, immune to the load of a shared machine but blind to save, restore and recovery times,
which ``scripts/whatif.py`` adds; ``--compare-by seconds`` compares the measured training seconds. Saves
JSON (every per-seed value), markdown (``checkfree.analysis.sweep_tables``' page, as scripts/reanalyse.py
regenerates it: t and BCa intervals, Holm's p, the verdict that holds) and one loss-vs-time plot per rate (first
seed, failures marked).

Every run keeps its directory under ``--runs-dir`` (one per rate, seed and strategy, named after them):
a run whose ``summary.json`` exists and whose resolved config matches is reused, so an interrupted sweep
resumes where it stopped and a sweep can be widened (another seed, another rate) without redoing the rest.
``--jobs N`` runs N trainings side by side, one torch thread each (wall-clock seconds are then measured
under that shared load, equally for every strategy).

``checkpoint:young`` (or ``:daly``, and ``hybrid:young``) checkpoints at the interval of Young (1974) or Daly
(2006) for each rate, from the save and step times of a short failure-free calibration run under the sweep's
config (RUNS_DIR/calibration, reused while the config matches; ``checkfree.analysis.calibration``), so
checkpointing is compared at its own best interval on this machine and storage, not at one picked by hand.
``--dry-run`` trains only that calibration and prints the intervals and the sweep's cost (runs left x steps
x seconds per step, over ``--jobs``; a lower bound).

``--swarm`` runs every strategy in the real multi-process swarm instead (``checkfree swarm``: one process
per stage, two spares, every peer dying at its own drawn failures as the engine's would), one run at a time, for
wall-clock truth: detection, rendezvous and weight transfer are then part of the time to target. Seconds
count from the start of the first step (the DHT start-up before it is left out).

    python scripts/bench_convergence.py configs/bench.yaml num_steps=200 --swarm --rates 0.10 0.33 --seeds 0 \
        --out runs/bench/convergence_swarm.json --runs-dir runs/bench/convergence-swarm-runs

    python scripts/bench_convergence.py configs/bench.yaml --rates 0.10 0.33 --seeds 0 1 2 3 4 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from checkfree import __version__
from checkfree.analysis.calibration import RULES, Calibration, checkpoint_interval, read_calibration
from checkfree.analysis.reanalysis import convergence_family, judge_sweep, judged
from checkfree.analysis.runs import read_metrics, run_to_target, val_curve
from checkfree.analysis.stats import bootstrap, paired_ratio, t_interval
from checkfree.analysis.sweep_tables import convergence_markdown
from checkfree.config import load_config, split_args, to_yaml
from checkfree.core.metrics import report
from checkfree.engine.trainer import Trainer
from checkfree.plot import plot_runs
from launcher.local import run_local_swarm

STRATEGIES = [
    "none",
    "checkfree",
    "checkfree_plus",
    "copy",
    "uniform",
    "random",
    "checkpoint:10",
    "checkpoint:50",
    "redundant",
]


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


def _done(files, args, run_dir: Path) -> bool:
    """A finished run of exactly this config (its resolved config.yaml matches what it would be now) by
    this version of checkfree (another version may draw other data, weights or failures)."""
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    if json.loads((run_dir / "summary.json").read_text()).get("checkfree_version") != __version__:
        return False
    return (run_dir / "config.yaml").read_text() == to_yaml(load_config(files, args))


def _train(files, args, swarm: bool = False) -> None:
    cfg = load_config(files, args)
    if not swarm:
        Trainer(cfg).run()
        return
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # an interrupted run's peers must not mix into this one's report
    code, _ = run_local_swarm(cfg, cfg.run_dir, status=False)
    if code != 0:
        raise RuntimeError(f"swarm run {cfg.run_dir} exited with {code}")


def _run_all(files, tasks: list[tuple[list[str], Path]], jobs: int, swarm: bool = False) -> None:
    """Train every (args, run_dir) not already done, ``jobs`` at a time, each in its own process."""
    todo = [(args, d) for args, d in tasks if not _done(files, args, d)]
    print(
        f"{len(tasks) - len(todo)} of {len(tasks)} runs already done; {len(todo)} to run with {jobs} job(s)", flush=True
    )
    if jobs <= 1 or swarm:
        for args, d in todo:
            _train(files, args, swarm)
            print(f"finished {d.name}", flush=True)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train, files, args): d for args, d in todo}
        for f in as_completed(futures):
            f.result()  # a failed run stops the sweep with its error
            print(f"finished {futures[f].name}", flush=True)


CALIBRATION_STEPS = 12  # a failure-free run that saves every 2 steps: the save and step times of the sweep
STARTUP_S = 9.0  # per run, imports, data and the final save (bench_swap_tax.py's measurement)


def _interval_rule(strategy: str) -> str | None:
    """'young' or 'daly' for checkpoint:young / checkpoint:daly, else None.

    Raises:
        SystemExit: hybrid:young or hybrid:daly (the rules assume blocking saves and a rollback at every
            failure; the hybrid saves in the background and rolls back only when a rebuild is impossible).
    """
    kind, _, k = strategy.partition(":")
    if kind == "hybrid" and k in RULES:
        raise SystemExit(
            f"--strategies {strategy}: Young's and Daly's rules assume blocking saves and a rollback at every "
            "failure; the hybrid saves in the background and rolls back only when a rebuild is impossible: give "
            "its interval in steps (hybrid:K)"
        )
    return k if kind == "checkpoint" and k in RULES else None


def _calibrate(files, overrides, runs_dir: Path, threads: int, train: bool = True) -> Calibration:
    """The save and step times of this machine and storage under the sweep's config (kept in
    RUNS_DIR/calibration and reused while the config matches; ``train`` False: it must be there)."""
    args = _args(overrides, runs_dir, "calibration", "checkpoint:2", 0, None, threads)
    args.append(f"num_steps={CALIBRATION_STEPS}")
    if not _done(files, args, runs_dir / "calibration"):
        if not train:
            raise SystemExit(f"--analyse-only: no calibration run of this config in {runs_dir / 'calibration'}")
        _train(files, args)
    return read_calibration(runs_dir / "calibration")


def _intervals(strategies, rates, cal: Calibration | None, num_stages: int, ns) -> dict:
    """Each checkpoint:young/daly strategy's interval per rate, as checkpoint:K (a rate with no failures named)."""
    try:
        return {s: {r: _resolved(s, r, cal, num_stages, ns) for r in rates} for s in strategies if _interval_rule(s)}
    except ValueError as e:
        raise SystemExit(f"bench_convergence: {e}") from e


def _resolved(strategy: str, rate: float, cal: Calibration | None, num_stages: int, ns) -> str:
    """checkpoint:young at ``rate`` as checkpoint:K with K from the measured save and step times."""
    rule = _interval_rule(strategy)
    if rule is None:
        return strategy
    k = checkpoint_interval(rule, cal, rate, num_stages, ns.iteration_s, ns.acceleration)
    return f"{strategy.partition(':')[0]}:{k}"


def _run_name(strategy: str, rate: float, seed: int) -> str:
    return f"none-s{seed}" if strategy == "none" else f"{strategy.replace(':', 'K')}-r{rate}-s{seed}"


def _plan(ns, overrides, runs_dir: Path, intervals: dict, threads: int) -> tuple[list, dict]:
    """Every run of the sweep as (its overrides, its directory), the failure-free ones first, and the
    directories by (strategy, rate, seed); checkpoint:young/daly trains at its interval for the rate."""
    tasks, runs = [], {}
    for seed in ns.seeds:
        runs["none", 0.0, seed] = runs_dir / _run_name("none", 0.0, seed)
        args = _args(overrides, runs_dir, _run_name("none", 0.0, seed), "none", seed, None, threads)
        tasks.append((args, runs["none", 0.0, seed]))
    for rate in ns.rates:
        for seed in ns.seeds:
            draws = _draws(rate, seed, ns.iteration_s, ns.acceleration)
            for strategy in ns.strategies:
                if strategy == "none":
                    continue
                trained_as = intervals.get(strategy, {}).get(rate, strategy)
                runs[strategy, rate, seed] = runs_dir / _run_name(strategy, rate, seed)
                args = _args(overrides, runs_dir, _run_name(strategy, rate, seed), trained_as, seed, draws, threads)
                tasks.append((args, runs[strategy, rate, seed]))
    return tasks, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.10, 0.16, 0.33])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--iteration-s", type=float, default=91.3, help="seconds one iteration stands for (paper: 91.3)")
    ap.add_argument(
        "--acceleration", type=float, default=1.0, help="exposure multiplier of each iteration (labels show the effect)"
    )
    ap.add_argument(
        "--target-fracs",
        type=float,
        nargs="+",
        default=[0.5, 0.75, 0.9],
        help="targets: these fractions of the failure-free run's progress (first to best validation loss)",
    )
    ap.add_argument("--eval-every", type=int, default=2, help="validation every k steps (fixed batches)")
    ap.add_argument(
        "--compare-by",
        choices=("iterations", "seconds"),
        default="iterations",
        help="what the ratios compare (engine): iterations to target, immune to the machine's load, or seconds "
        "(with save and restore times, but runs of a sweep do not run side by side)",
    )
    ap.add_argument(
        "--runs-dir",
        default="runs/bench/convergence-runs",
        help="where every run keeps its directory; finished runs found there are reused",
    )
    ap.add_argument(
        "--ours",
        nargs="+",
        default=None,
        help="strategies compared against the baselines (default: checkfree*, hybrid*)",
    )
    ap.add_argument(
        "--baselines",
        nargs="+",
        default=None,
        help="strategies they are compared against (default: checkpoint*, redundant); e.g. copy uniform random "
        "for the rebuild rules of the paper's Fig. 2",
    )
    ap.add_argument("--jobs", type=int, default=1, help="trainings side by side (one torch thread each when > 1)")
    ap.add_argument("--swarm", action="store_true", help="run every strategy in the multi-process swarm")
    ap.add_argument("--out", default="runs/bench/convergence.json")
    ap.add_argument(
        "--analyse-only",
        action="store_true",
        help="train nothing: analyse the finished runs in --runs-dir as they are (a missing one is an error)",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="train only the calibration run: print the checkpoint intervals and the sweep's cost, then stop",
    )
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    overrides = [*overrides, f"eval_every_steps={ns.eval_every}"]
    runs_dir = Path(ns.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = load_config(files, overrides)
    L, steps = base.model.num_stages, base.num_steps
    threads = 1 if ns.jobs > 1 else 0
    if ns.swarm:  # the peers' share of the cores, set explicitly so that a finished run's config matches
        threads = max(1, (os.cpu_count() or 1) // L)
        overrides = [*overrides, "swarm.num_spares=2"]

    needs_cal = ns.dry_run or any(_interval_rule(s) for s in ns.strategies)
    if needs_cal and ns.swarm:
        raise SystemExit("--swarm: checkpoint:young/daly and --dry-run calibrate in the engine; give K by hand")
    cal = _calibrate(files, overrides, runs_dir, threads, train=not ns.analyse_only) if needs_cal else None
    intervals = _intervals(ns.strategies, ns.rates, cal, L, ns)
    tasks, runs = _plan(ns, overrides, runs_dir, intervals, threads)
    if ns.dry_run:
        _print_cost(files, tasks, cal, intervals, steps, ns.jobs)
        return
    if ns.analyse_only:
        missing = [str(d) for _, d in tasks if not (d / "summary.json").is_file()]
        if missing:
            raise SystemExit(f"--analyse-only: {len(missing)} runs have no summary.json, e.g. {missing[:3]}")
    else:
        _run_all(files, tasks, ns.jobs, ns.swarm)

    rows = []
    for seed in ns.seeds:
        ref = val_curve(read_metrics(runs["none", 0.0, seed]))
        first, best = ref[0].loss, min(p.loss for p in ref)
        targets = {f: first - f * (first - best) for f in ns.target_fracs}
        for rate in ns.rates:
            for strategy in ns.strategies:
                run_dir = runs[strategy, 0.0 if strategy == "none" else rate, seed]
                summary = json.loads((run_dir / "summary.json").read_text())
                row = {
                    "rate": rate,
                    "effective_rate": effective_rate(rate, ns.acceleration),
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
                rows.append(row)
                print(
                    f"rate {rate:.2f} (effective {row['effective_rate']:.0%}/h) seed {seed} {strategy:14s} "
                    + " ".join(f"{f:.0%}: {row[f'steps@{f}']} steps" for f in ns.target_fracs)
                    + f", final val {summary['final_val_loss']:.3f}, failures {summary['failures']}",
                    flush=True,
                )
    for rate in ns.rates:
        seed0 = [runs[(s, rate if s != "none" else 0.0, ns.seeds[0])] for s in ns.strategies]
        plot_runs(seed0, Path(ns.out).with_name(f"{Path(ns.out).stem}_rate{rate}.png"), labels=ns.strategies)
    table = summarise(rows, ns.rates, ns.strategies, ns.target_fracs)
    # iterations are immune to the load of a shared machine (runs of a sweep do not run side by side); a swarm
    # sweep is run for wall-clock truth (detection, rendezvous, transfer), so its comparison is by seconds (and
    # its runs from before the swarm logged iterations have none)
    by = "seconds" if ns.swarm else ns.compare_by
    comparisons = compare(rows, ns.rates, ns.strategies, ns.target_fracs, by, ns.ours, ns.baselines)
    differences = final_loss_differences(rows, ns.rates, ns.strategies, ns.ours, ns.baselines)
    judge_sweep(comparisons, differences, rows)  # verdicts that hold: t and BCa intervals, Holm over the sweep
    qs = realised_q(rows, ns.rates, ns.strategies, ns.target_fracs) if "none" in ns.strategies else []
    result = {
        "num_steps": steps,
        "rates": ns.rates,
        "effective_rates": [effective_rate(r, ns.acceleration) for r in ns.rates],
        "seeds": ns.seeds,
        "iteration_s": ns.iteration_s,
        "acceleration": ns.acceleration,
        "target_fracs": ns.target_fracs,
        "eval_every": ns.eval_every,
        "jobs": ns.jobs,
        "swarm": ns.swarm,
        "table": table,
        "comparisons": comparisons,
        "final_val_differences": differences,
        "realised_q": qs,
        "calibration": cal.as_dict() if cal else None,
        "checkpoint_intervals": intervals,
        "run_dirs": str(runs_dir),
    }
    report(result, ns.out)
    Path(ns.out).with_suffix(".rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    # the page regenerated pages have (checkfree.analysis.sweep_tables): t, BCa, Holm p and the verdict that holds
    verdicts = judged(*convergence_family(result, rows))
    Path(ns.out).with_suffix(".md").write_text(convergence_markdown(result, verdicts))


def _print_cost(files, tasks, cal: Calibration, intervals: dict, steps: int, jobs: int) -> None:
    """What the sweep would cost: runs left x (steps x the calibration's seconds per step + start-up), over
    ``jobs``. A lower bound: rollbacks redo steps, saves and redundant computation's second copy add time."""
    for strategy, by_rate in intervals.items():
        print(f"{strategy}: " + ", ".join(f"{r:g}/h -> {s}" for r, s in by_rate.items()), flush=True)
    left = [d for args, d in tasks if not _done(files, args, d)]
    seconds = len(left) * (steps * cal.step_s + STARTUP_S)
    print(
        f"calibration: save {cal.save_s:.3g} s (median of {cal.saves}), step {cal.step_s:.3g} s (median of "
        f"{cal.steps}); {len(left)} of {len(tasks)} runs left x {steps} steps: at least {seconds / 3600:.1f} h of "
        f"training, {seconds / jobs / 3600:.1f} h with --jobs {jobs} (rollbacks, saves and redundant computation's "
        "extra work not included)",
        flush=True,
    )


def summarise(rows: list[dict], rates, strategies, fracs) -> dict:
    table = {}
    for rate in rates:
        for strategy in strategies:
            r = [x for x in rows if x["rate"] == rate and x["strategy"] == strategy]
            cell = {
                "seeds": len(r),
                "final_val": bootstrap([x["final_val"] for x in r]).as_dict(),
                "failures": bootstrap([x["failures"] for x in r]).as_dict(),
            }
            for f in fracs:
                reached = [x for x in r if x[f"seconds@{f}"] is not None]
                cell[f"reached@{f}"] = len(reached)
                cell[f"seconds@{f}"] = [x[f"seconds@{f}"] for x in r]  # per seed, None: not reached
                cell[f"steps@{f}"] = [x[f"steps@{f}"] for x in r]
                cell[f"iterations@{f}"] = [x[f"iterations@{f}"] for x in r]
            table[f"{rate}/{strategy}"] = cell
    return table


MIN_SEEDS = 5  # no verdict from fewer paired seeds (the percentile rule, kept as percentile_verdict)


def _verdict(ours: str, interval, pairs) -> str:
    """A claim only where the paired interval over >= MIN_SEEDS seeds excludes 1; misses of the target (a
    seed where one side never reached it) are always said, never averaged away."""
    missed = sum(1 for a, _ in pairs if a is None)
    other_missed = sum(1 for _, b in pairs if b is None)
    note = f"; misses: {ours} {missed}, baseline {other_missed} of {len(pairs)} seeds" if missed or other_missed else ""
    if interval.n < MIN_SEEDS:
        return f"not resolved ({interval.n} paired seeds, fewer than {MIN_SEEDS}{note})"
    if not interval.excludes(1.0):
        return f"not resolved{note and ' (' + note[2:] + ')'}"
    return f"{ours} {'faster' if interval.high < 1 else 'slower'}{note and ' (' + note[2:] + ')'}"


def _sides(strategies, ours=None, baselines=None) -> tuple[list[str], list[str]]:
    """Ours (default: checkfree*, hybrid*) and the baselines (default: checkpoint*, redundant)."""
    if ours is None:
        ours = [s for s in strategies if s.startswith("checkfree") or s.startswith("hybrid")]
    if baselines is None:
        baselines = [s for s in strategies if s.startswith("checkpoint") or s == "redundant"]
    unknown = sorted((set(ours) | set(baselines)) - set(strategies))
    if unknown:
        raise SystemExit(f"--ours/--baselines {unknown} are not among --strategies {strategies}")
    return ours, baselines


def _by_seed(rows: list[dict], rate: float, strategies: tuple[str, ...], key: str) -> dict[int, dict[str, object]]:
    """{seed: {strategy: row[key]}} of the given strategies at one rate (the pairing every comparison uses)."""
    out: dict[int, dict[str, object]] = {}
    for x in rows:
        if x["rate"] == rate and x["strategy"] in strategies:
            out.setdefault(x["seed"], {})[x["strategy"]] = x[key]
    return out


def compare(rows: list[dict], rates, strategies, fracs, by: str = "seconds", ours=None, baselines=None) -> list[dict]:
    """Paired per-seed ratios of ``by`` (seconds or iterations) to target, each of ours over each baseline,
    with intervals."""
    ours, baselines = _sides(strategies, ours, baselines)
    out = []
    for rate in rates:
        for f in fracs:
            for a in ours:
                for b in baselines:
                    pairs = [(v.get(a), v.get(b)) for v in _by_seed(rows, rate, (a, b), f"{by}@{f}").values()]
                    interval = paired_ratio([p[0] for p in pairs], [p[1] for p in pairs])
                    out.append(
                        {
                            "rate": rate,
                            "target_frac": f,
                            "ours": a,
                            "baseline": b,
                            "ratio": interval.as_dict(),
                            "by": by,
                            "seeds": len(pairs),
                            "ours_not_reached": sum(1 for p in pairs if p[0] is None),
                            "baseline_not_reached": sum(1 for p in pairs if p[1] is None),
                            "verdict": _verdict(a, interval, pairs),
                        }
                    )
    return out


def realised_q(rows: list[dict], rates, strategies, fracs) -> list[dict]:
    """Per strategy and target: the extra committed steps to the target per failure, against the failure-free
    run of the same seed (seeds with failures that reached the target), with intervals: the q a sweep
    realised, every failure of a run counted whenever it landed."""
    out = []
    none = {x["seed"]: x for x in rows if x["strategy"] == "none"}
    for rate in rates:
        for strategy in strategies:
            if strategy == "none":
                continue
            for f in fracs:
                per_seed = [
                    (x[f"steps@{f}"] - none[x["seed"]][f"steps@{f}"]) / x["failures"]
                    for x in rows
                    if x["rate"] == rate and x["strategy"] == strategy and x["failures"] and x["seed"] in none
                    and x[f"steps@{f}"] is not None and none[x["seed"]][f"steps@{f}"] is not None
                ]  # fmt: skip
                out.append({"rate": rate, "strategy": strategy, "target_frac": f, "q": bootstrap(per_seed).as_dict()})
    return out


def final_loss_differences(rows: list[dict], rates, strategies, ours=None, baselines=None) -> list[dict]:
    """Paired per-seed differences of the final validation loss, ours minus each baseline, with intervals
    (seeds where either run has no final loss are left out, and counted)."""
    ours, baselines = _sides(strategies, ours, baselines)
    out = []
    for rate in rates:
        for a in ours:
            for b in baselines:
                by_seed = _by_seed(rows, rate, (a, b), "final_val")
                both = [v for v in by_seed.values() if v.get(a) is not None and v.get(b) is not None]
                interval = t_interval([v[a] - v[b] for v in both])
                if interval.n < MIN_SEEDS:
                    verdict = f"not resolved ({interval.n} paired seeds, fewer than {MIN_SEEDS})"
                elif not interval.excludes(0.0):
                    verdict = "not resolved"
                else:
                    verdict = f"{a} {'lower' if interval.high < 0 else 'higher'}"
                out.append(
                    {
                        "rate": rate,
                        "ours": a,
                        "baseline": b,
                        "difference": interval.as_dict(),
                        "seeds": len(both),
                        "seeds_without_final_loss": len(by_seed) - len(both),
                        "verdict": verdict,
                    }
                )
    return out


if __name__ == "__main__":
    main()
