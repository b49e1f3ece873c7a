"""Convergence under failures (the paper's Table 2), every strategy really run on the same failures.

For each hourly stage-failure rate and seed, one failure trace is drawn (the paper's medium-model
iteration of ``--iteration-s`` seconds, accelerated ``--acceleration`` times, keyed by iteration) and
replayed for every strategy; ``none`` is the failure-free reference. Reports per rate and strategy,
mean and spread over seeds: steps and training wall-clock seconds to reach the target validation loss,
final validation loss and perplexity, failures and recoveries. Saves JSON, a markdown table and one
loss-vs-time plot per rate (seed 0, failures marked).

Every run keeps its directory under ``--runs-dir`` (one per rate, seed and strategy, named after them):
a run whose ``summary.json`` exists and whose resolved config matches is reused, so an interrupted sweep
resumes where it stopped and a sweep can be widened (another seed, another rate) without redoing the rest.
``--jobs N`` runs N trainings side by side, one torch thread each (wall-clock seconds are then measured
under that shared load, equally for every strategy).

``--swarm`` runs every strategy in the real multi-process swarm instead (``checkfree swarm``: one process
per stage, two spares, the launcher replaying the same traces by SIGKILL), one run at a time, for
wall-clock truth: detection, rendezvous and weight transfer are then part of the time to target. Seconds
count from the start of the first step (the DHT start-up before it is left out).

    python scripts/bench_convergence.py configs/bench.yaml num_steps=200 --swarm --rates 0.10 0.33 --seeds 0 \
        --out runs/bench/convergence_swarm.json --runs-dir runs/bench/convergence-swarm-runs

    python scripts/bench_convergence.py [configs/bench.yaml] [key=value ...] --rates 0.05 0.10 0.16 0.33 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from checkfree import __version__
from checkfree.config import load_config, split_args, to_yaml
from checkfree.core.failures import FailureConfig, FailureInjector, write_trace
from checkfree.core.metrics import read_jsonl, report
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


def _trace(path: Path, rate: float, seed: int, num_stages: int, iterations: int, iteration_s: float, accel: float):
    inj = FailureInjector(
        FailureConfig(
            mode="hourly", hourly_rate=rate, iteration_time_s=iteration_s, time_acceleration=accel, seed=seed
        ),
        num_stages,
    )
    for it in range(iterations):
        inj.failures_at(it)
    write_trace(path, inj.fired, num_stages)
    return len(inj.fired)


def _args(overrides, runs_dir: Path, name: str, strategy: str, seed: int, trace: Path | None, threads: int):
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
    if kind == "checkpoint":
        args.append(f"checkpoint.every_steps={k}")
    args += ["failures.mode=trace", f"failures.trace_path={trace}"] if trace else ["failures.mode=none"]
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


def _to_target(run_dir: Path, target: float) -> tuple[int | None, float | None]:
    """Steps and seconds until the validation loss first reaches ``target``. Swarm runs (their rows carry
    an epoch) count seconds from the start of their first step."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    t0 = rows[0]["time/wall"] - rows[0]["time/step_s"] if rows and "epoch" in rows[0] else None
    for m in rows:
        if "loss/val" in m and m["loss/val"] <= target:
            return m["step"] + 1, (m["time/wall"] - t0) if t0 is not None else m["time/train_s"]
    return None, None


def _agg(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.10, 0.16, 0.33])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--iteration-s", type=float, default=91.3, help="seconds one iteration stands for (paper: 91.3)")
    ap.add_argument("--acceleration", type=float, default=2.5)
    ap.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="default: the failure-free run's validation loss at --target-frac of its steps (mean over seeds)",
    )
    ap.add_argument("--target-frac", type=float, default=0.5)
    ap.add_argument(
        "--runs-dir",
        default="runs/bench/convergence-runs",
        help="where every run keeps its directory; finished runs found there are reused",
    )
    ap.add_argument("--jobs", type=int, default=1, help="trainings side by side (one torch thread each when > 1)")
    ap.add_argument("--swarm", action="store_true", help="run every strategy in the multi-process swarm")
    ap.add_argument("--out", default="runs/bench/convergence.json")
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    runs_dir = Path(ns.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = load_config(files, overrides)
    L, steps = base.model.num_stages, base.num_steps
    threads = 1 if ns.jobs > 1 else 0
    if ns.swarm:  # the peers' share of the cores, set explicitly so that a finished run's config matches
        threads = max(1, (os.cpu_count() or 1) // L)
        overrides = [*overrides, "swarm.num_spares=2"]

    def name(strategy: str, rate: float, seed: int) -> str:
        return f"none-s{seed}" if strategy == "none" else f"{strategy.replace(':', 'K')}-r{rate}-s{seed}"

    tasks, runs = [], {}
    for seed in ns.seeds:
        runs["none", 0.0, seed] = runs_dir / name("none", 0.0, seed)
        tasks.append(
            (_args(overrides, runs_dir, name("none", 0.0, seed), "none", seed, None, threads), runs["none", 0.0, seed])
        )
    for rate in ns.rates:
        for seed in ns.seeds:
            trace = runs_dir / f"trace-r{rate}-s{seed}.jsonl"
            _trace(trace, rate, 1000 + seed, L, 4 * steps, ns.iteration_s, ns.acceleration)
            for strategy in ns.strategies:
                if strategy != "none":
                    runs[strategy, rate, seed] = runs_dir / name(strategy, rate, seed)
                    tasks.append(
                        (
                            _args(overrides, runs_dir, name(strategy, rate, seed), strategy, seed, trace, threads),
                            runs[strategy, rate, seed],
                        )
                    )
    _run_all(files, tasks, ns.jobs, ns.swarm)

    target = ns.target_loss
    if target is None:
        cut = int(ns.target_frac * steps)
        target = statistics.mean(
            next(
                m["loss/val"]
                for m in read_jsonl(runs["none", 0.0, s] / "metrics.jsonl")
                if "loss/val" in m and m["step"] + 1 >= cut
            )
            for s in ns.seeds
        )
    rows = []
    for rate in ns.rates:
        for seed in ns.seeds:
            for strategy in ns.strategies:
                run_dir = runs[strategy, 0.0 if strategy == "none" else rate, seed]
                summary = json.loads((run_dir / "summary.json").read_text())
                to_step, to_s = _to_target(run_dir, target)
                rows.append(
                    {
                        "rate": rate,
                        "seed": seed,
                        "strategy": strategy,
                        "steps_to_target": to_step,
                        "seconds_to_target": to_s,
                        "final_val": summary["final_val_loss"],
                        "train_s": summary.get("train_s"),
                        "failures": summary["failures"],
                        "recoveries": summary["recoveries"],
                        "iterations": summary.get("iterations"),
                    }
                )
                print(
                    f"rate {rate:.2f} seed {seed} {strategy:14s} to-target {to_step} steps / "
                    f"{to_s if to_s is None else round(to_s, 1)} s, final val {summary['final_val_loss']:.3f}, "
                    f"failures {summary['failures']}",
                    flush=True,
                )
        if ns.seeds:
            seed0 = [runs[(s, rate if s != "none" else 0.0, ns.seeds[0])] for s in ns.strategies]
            plot_runs(seed0, Path(ns.out).with_name(f"{Path(ns.out).stem}_rate{rate}.png"), labels=ns.strategies)
    table = {}
    for rate in ns.rates:
        for strategy in ns.strategies:
            r = [x for x in rows if x["rate"] == rate and x["strategy"] == strategy]
            table[f"{rate}/{strategy}"] = {
                "seconds_to_target": _agg([x["seconds_to_target"] for x in r]),
                "steps_to_target": _agg([x["steps_to_target"] for x in r]),
                "reached": sum(x["steps_to_target"] is not None for x in r),
                "seeds": len(r),
                "final_val": _agg([x["final_val"] for x in r]),
                "final_ppl": _agg([math.exp(x["final_val"]) for x in r]),
                "failures": _agg([x["failures"] for x in r]),
                "recoveries": _agg([x["recoveries"] for x in r]),
            }
    report(
        {
            "target_val_loss": target,
            "num_steps": steps,
            "rates": ns.rates,
            "seeds": ns.seeds,
            "iteration_s": ns.iteration_s,
            "acceleration": ns.acceleration,
            "target_frac": ns.target_frac,
            "jobs": ns.jobs,
            "swarm": ns.swarm,
            "table": table,
            "run_dirs": str(runs_dir),
        },
        ns.out,
    )
    Path(ns.out).with_suffix(".rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    Path(ns.out).with_suffix(".md").write_text(markdown(table, ns.rates, ns.strategies, target))


def markdown(table: dict, rates, strategies, target: float) -> str:
    def fmt(a, digits=1):
        return "-" if a is None else f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}"

    lines = [
        f"Target validation loss: {target:.3f}\n",
        "| rate | strategy | reached | seconds to target | steps to target | final val loss | final ppl | failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        for s in strategies:
            t = table[f"{rate}/{s}"]
            lines.append(
                f"| {rate:.0%} | {s} | {t['reached']}/{t['seeds']} | {fmt(t['seconds_to_target'])} | "
                f"{fmt(t['steps_to_target'], 0)} | {fmt(t['final_val'], 3)} | {fmt(t['final_ppl'], 2)} | "
                f"{fmt(t['failures'])} |"
            )
    lines += ["", relative(table, rates, strategies)]
    return "\n".join(lines) + "\n"


def relative(table: dict, rates, strategies) -> str:
    """Time to target of checkfree and checkfree+ over each baseline's (mean seconds over the seeds that
    reached it; 'not reached' where no seed did), and whether final losses order weighted < copy < random."""
    baselines = [s for s in strategies if s.startswith("checkpoint") or s == "redundant"]
    ours = [s for s in ("checkfree", "checkfree_plus") if s in strategies]
    if not baselines or not ours:
        return ""
    lines = [
        "| rate | strategy | "
        + " | ".join(f"time to target / {b}" for b in baselines)
        + " | final val: checkfree < copy < random |",
        "|---|---|" + "---|" * (len(baselines) + 1),
    ]
    for rate in rates:
        order = ""
        if all(f"{rate}/{s}" in table for s in ("checkfree", "copy", "random")):
            v = [table[f"{rate}/{s}"]["final_val"]["mean"] for s in ("checkfree", "copy", "random")]
            order = f"{v[0] < v[1] < v[2]} ({v[0]:.3f} / {v[1]:.3f} / {v[2]:.3f})"
        for s in ours:
            mine = table[f"{rate}/{s}"]
            cells = []
            for b in baselines:
                other = table[f"{rate}/{b}"]
                if mine["seconds_to_target"] is None:
                    cells.append(f"not reached ({mine['reached']}/{mine['seeds']})")
                elif other["seconds_to_target"] is None:
                    cells.append(f"{b} never reached it")
                else:
                    cells.append(
                        f"{mine['seconds_to_target']['mean'] / other['seconds_to_target']['mean']:.2f} "
                        f"({mine['reached']}/{mine['seeds']} vs {other['reached']}/{other['seeds']} seeds)"
                    )
            lines.append(f"| {rate:.0%} | {s} | " + " | ".join(cells) + f" | {order if s == 'checkfree' else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
