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
import shutil

from checkfree.analysis.convergence import ConvergenceSweep, UsageError, run_convergence_sweep
from checkfree.config import ConfigError, load_config
from checkfree.engine.trainer import Trainer
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


def _parser() -> argparse.ArgumentParser:
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
    return ap


def _train(files: list[str], args: list[str], swarm: bool = False) -> None:
    """One run to its end, in the engine or the swarm (here, not in checkfree.analysis, which imports no
    executor; module-level, so that --jobs can send it to its worker processes)."""
    cfg = load_config(files, args)
    if not swarm:
        Trainer(cfg).run()
        return
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # an interrupted run's peers must not mix into this one's report
    code, _ = run_local_swarm(cfg, cfg.run_dir, status=False)
    if code != 0:
        raise RuntimeError(f"swarm run {cfg.run_dir} exited with {code}")


def _say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    sweep = ConvergenceSweep(**vars(_parser().parse_args()))
    try:
        run_convergence_sweep(sweep, _train, _say)
    except (UsageError, ConfigError) as e:  # a refused option, a missing config file or a typo in a key
        raise SystemExit(f"bench_convergence: {e}") from e


if __name__ == "__main__":
    main()
