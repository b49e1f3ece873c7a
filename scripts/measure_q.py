"""q: the extra steps a run needs to reach a target loss because one stage was lost and rebuilt.

The number that decides when CheckFree beats checkpointing (docs/benchmarks/results.md, "cost model"). Measured as a
controlled, paired experiment in the engine:

1. per seed, a failure-free reference trains to ``--fail-at`` F, and its whole state (weights, Adam, norms,
   edge replicas) is kept;
2. every arm starts from that state, loses one stage at step F, rebuilds it with its method and trains to
   F + ``--horizon`` on exactly the reference's batches; the reference continues without the loss;
3. validation loss on fixed validation batches after every step (``--eval-every``); for targets that the
   reference reaches ``k`` steps after F (``--target-after``), q = the arm's steps to the target minus the
   reference's, both read from the best-so-far validation loss (so one noisy evaluation cannot decide a
   crossing). An arm that never reaches a target within the horizon is counted as not reached, never dropped.

Methods (``--methods``): ``weighted`` (CheckFree's norm-weighted average), ``uniform``, ``copy`` (the previous
stage), ``random`` (re-initialisation) train without the swap; ``plus`` (CheckFree+: swapped microbatches,
stages 1 / L-2 averaged) and ``partner_copy`` (CheckFree+ with stages 1 / L-2 copied from their swap
partner, the reference code's rule) train with it, against a swapped reference. Extra ``name=key=value,...``
methods add ablations (e.g. ``warmup=recovery.warmup_steps=20``). Stage positions: ``--stages`` (default:
first, second, middle, last).

Every seed's arms run in one process; ``--jobs`` seeds side by side. Prints a table and saves JSON (every
per-seed value, so the statistics can be redone) and markdown with bootstrap intervals over seeds. This script
trains; the reading of the curves, the statistics and the tables are ``checkfree.analysis.q``'s.

    python scripts/measure_q.py configs/bench.yaml --seeds 0 1 2 3 4 --fail-at 300 --horizon 200 \\
        --out docs/results/q_bench.json
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from checkfree.analysis.q import METHODS, analyse, from_disk, markdown, parse_methods, rebuilt_events, scan_markdown
from checkfree.config import load_config, split_args
from checkfree.core.events import EventLog
from checkfree.core.metrics import MetricLogger, report
from checkfree.core.rebuild import RebuildSpec
from checkfree.core.recovery import edge_replicas_on
from checkfree.engine.trainer import Trainer


def _config(files, overrides, seed: int, swap: bool, extra: list[str], out_dir: Path, name: str, ns):
    strategy = "checkfree_plus" if swap else "checkfree"
    return load_config(
        files,
        [
            *overrides,
            f"recovery.strategy={strategy}",
            f"pipeline.swap={'true' if swap else 'false'}",
            *extra,
            "failures.mode=none",
            f"seed={seed}",
            f"num_steps={ns.fail_at + ns.horizon}",
            f"eval_every_steps={ns.eval_every}",
            f"data.num_val_batches={ns.val_batches}",
            "progress=false",
            "plot=false",
            "overwrite=true",
            "num_threads=1",
            f"out_dir={out_dir}",
            f"run_name={name}",
        ],
    )


def _fork(engine):
    """An independent copy of the engine's training state (data and schedule shared: they are read-only)."""
    return copy.deepcopy(engine, {id(engine.batches): engine.batches, id(engine.schedule): engine.schedule})


def _curve(trainer: Trainer, after: int) -> list[tuple[int, float]]:
    """Validation losses after ``after`` committed steps, from the first step trained after it."""
    return [(s, v) for s, v in trainer.state.val_history if s > after]


def run_seed(files, overrides, seed: int, methods: dict, stages: list[int], ns) -> dict:
    """Every arm of one seed; returns {family: reference curve, (method, stage): arm curve and events}."""
    out_dir = Path(ns.runs_dir) / f"s{seed}"
    result = {"seed": seed, "refs": {}, "arms": []}
    for swap in sorted({m[0] for m in methods.values()}):
        family = "swap" if swap else "plain"
        cfg = _config(files, overrides, seed, swap, [], out_dir, f"ref-{family}", ns)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        trainer.start()
        trainer.continue_for(ns.fail_at)
        engine0, state0 = _fork(trainer.engine), copy.deepcopy(trainer.state)
        trainer.continue_for(ns.horizon)
        result["refs"][family] = _curve(trainer, ns.fail_at)
        trainer.metrics.close()
        trainer.events.close()
        print(f"seed {seed} reference {family}: {time.perf_counter() - t0:.0f} s", flush=True)
        for name, (m_swap, extra) in methods.items():
            if m_swap != swap:
                continue
            arm_cfg = _config(files, overrides, seed, swap, extra, out_dir, f"{name}", ns)
            for stage in stages:
                arm_dir = out_dir / f"{name}-stage{stage}"
                arm_dir.mkdir(parents=True, exist_ok=True)
                trainer.cfg = arm_cfg
                trainer.spec = RebuildSpec.of(arm_cfg)
                trainer.replicas_on = edge_replicas_on(arm_cfg.recovery)
                trainer.engine = _fork(engine0)
                trainer.state = copy.deepcopy(state0)
                trainer.metrics = MetricLogger(arm_dir / "metrics.jsonl")
                trainer.events = EventLog(arm_dir / "events.jsonl")
                trainer.recover([stage])
                trainer.continue_for(ns.horizon)
                trainer.metrics.close()
                trainer.events.close()
                rebuilt = rebuilt_events(arm_dir / "events.jsonl")
                result["arms"].append(
                    {
                        "method": name,
                        "stage": stage,
                        "family": family,
                        "curve": _curve(trainer, ns.fail_at),
                        "rebuilt": rebuilt,
                    }
                )
            print(f"seed {seed} {name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


def scan_seed(files, overrides, seed: int, methods: dict, stages: list[int], ns) -> list[dict]:
    """The regime question: how much does losing a stage cost as training progresses? One failure-free run
    per family to the last scan point; at each point F every method rebuilds every stage of a fork, and
    the fork's validation loss is read right after the rebuild and ``--scan-train`` steps later, against the
    reference at the same steps."""
    rows = []
    out_dir = Path(ns.runs_dir) / f"scan-s{seed}"
    points = sorted(ns.scan)
    for swap in sorted({m[0] for m in methods.values()}):
        family = "swap" if swap else "plain"
        ns_ref = argparse.Namespace(**{**vars(ns), "fail_at": points[-1], "horizon": ns.scan_train, "eval_every": 0})
        cfg = _config(files, overrides, seed, swap, [], out_dir, f"ref-{family}", ns_ref)
        trainer = Trainer(cfg)
        trainer.start()
        for point in points:
            trainer.continue_for(point - trainer.state.step)
            engine0, state0 = _fork(trainer.engine), copy.deepcopy(trainer.state)
            ref_now = trainer.engine.evaluate(ns.val_batches)
            trainer.continue_for(ns.scan_train)
            ref_later = trainer.engine.evaluate(ns.val_batches)
            for name, (m_swap, extra) in methods.items():
                if m_swap != swap:
                    continue
                arm_cfg = _config(files, overrides, seed, swap, extra, out_dir, name, ns_ref)
                for stage in stages:
                    arm = Trainer.__new__(Trainer)
                    arm.__dict__.update(trainer.__dict__)
                    arm.cfg, arm.spec = arm_cfg, RebuildSpec.of(arm_cfg)
                    arm.replicas_on = edge_replicas_on(arm_cfg.recovery)
                    arm.engine, arm.state = _fork(engine0), copy.deepcopy(state0)
                    arm_dir = out_dir / f"F{point}-{name}-stage{stage}"
                    arm_dir.mkdir(parents=True, exist_ok=True)
                    arm.metrics, arm.events = (
                        MetricLogger(arm_dir / "metrics.jsonl"),
                        EventLog(arm_dir / "events.jsonl"),
                    )
                    arm.recover([stage])
                    now = arm.engine.evaluate(ns.val_batches)
                    arm.continue_for(ns.scan_train)
                    later = arm.engine.evaluate(ns.val_batches)
                    arm.metrics.close()
                    arm.events.close()
                    rows.append(
                        {
                            "seed": seed,
                            "family": family,
                            "fail_at": point,
                            "method": name,
                            "stage": stage,
                            "ref_val": ref_now,
                            "jump": now - ref_now,
                            "gap_later": later - ref_later,
                        }
                    )
            trainer.engine, trainer.state = engine0, state0  # the reference goes on from the fork point
            print(f"seed {seed} {family}: scan point {point} done (val {ref_now:.3f})", flush=True)
        trainer.metrics.close()
        trainer.events.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides (default: the tiny default)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--stages", type=int, nargs="+", default=None, help="default: 0, 1, L//2, L-1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--fail-at", type=int, default=300, help="step F at which the stage is lost")
    ap.add_argument("--horizon", type=int, default=200, help="steps trained after the loss")
    ap.add_argument("--target-after", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs-dir", default="runs/q")
    ap.add_argument(
        "--scan", type=int, nargs="+", default=None, help="regime scan: lose a stage at each of these steps instead"
    )
    ap.add_argument("--scan-train", type=int, default=20, help="regime scan: steps trained after each loss")
    ap.add_argument(
        "--analyse-only", action="store_true", help="train nothing: analyse the finished runs found in --runs-dir"
    )
    ap.add_argument("--out", default="runs/q/q.json")
    ns = ap.parse_args()
    bad = [k for k in ns.target_after if not 0 < k <= ns.horizon]
    if bad:
        raise SystemExit(f"--target-after {bad}: every target must lie within the horizon (1..{ns.horizon})")
    files, overrides = split_args(ns.args)
    base = load_config(files, overrides)
    L = base.model.num_stages
    stages = sorted(set(ns.stages if ns.stages is not None else [0, 1, L // 2, L - 1]))
    bad = [s for s in stages if not 0 <= s < L]
    if bad:
        raise SystemExit(f"--stages {bad} out of range 0..{L - 1}")
    try:
        methods = parse_methods(ns.methods)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    t0 = time.perf_counter()
    if ns.scan:
        with ProcessPoolExecutor(ns.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(scan_seed, files, overrides, s, methods, stages, ns) for s in ns.seeds]
            rows = [row for f in futures for row in f.result()]
        header = (
            f"Regime scan on {' '.join(ns.args) or 'the tiny default'}: {L} stages; one stage lost at step F of a "
            f"failure-free run; validation loss over {ns.val_batches} fixed batches right after the rebuild and "
            f"{ns.scan_train} steps later, minus the reference's at the same steps; seeds {ns.seeds}; 95% "
            "bootstrap intervals over seeds."
        )
        report({"args": ns.args, "num_stages": L, "scan": ns.scan, "seeds": ns.seeds, "rows": rows}, ns.out)
        md = scan_markdown(rows, methods, stages, L, ns.scan, ns.scan_train, header)
        Path(ns.out).with_suffix(".md").write_text(md)
        print(md)
        return
    if ns.analyse_only:
        results = from_disk(ns.runs_dir, ns.seeds, methods, stages, ns.fail_at, ns.horizon)
    else:
        with ProcessPoolExecutor(ns.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_seed, files, overrides, s, methods, stages, ns) for s in ns.seeds]
            results = [f.result() for f in futures]
    analysis = analyse(results, methods, stages, L, ns.fail_at, ns.target_after)
    header = (
        f"q on {' '.join(ns.args) or 'the tiny default'}: {L} stages, one stage lost at step {ns.fail_at}, "
        f"{ns.horizon} steps after, seeds {ns.seeds}, validation every {ns.eval_every} step(s) on "
        f"{ns.val_batches} fixed batches. q = extra steps to the best validation loss the reference had "
        "reached k steps after the loss (best-so-far curves); 95% bootstrap intervals over seeds; "
        "'reached' counts the seeds that got there within the horizon (q is over those only). Steps behind at "
        "the end: how long before the end the reference had reached the arm's final best-so-far loss (negative: "
        "ahead), over the seeds not behind by more than the horizon, which are counted apart."
    )
    out = {
        "args": ns.args,
        "num_stages": L,
        "fail_at": ns.fail_at,
        "horizon": ns.horizon,
        "seeds": [r["seed"] for r in results],
        "methods": {k: v[1] for k, v in methods.items()},
        "target_after": ns.target_after,
        "eval_every": ns.eval_every,
        "val_batches": ns.val_batches,
        "elapsed_s": time.perf_counter() - t0,
        "reference_curves": {f"{r['seed']}/{fam}": c for r in results for fam, c in r["refs"].items()},
        **analysis,
    }
    report(out, ns.out)
    md = markdown(analysis, methods, stages, ns.target_after, header)
    Path(ns.out).with_suffix(".md").write_text(md)
    print(md)
    # reference curve: how far training had got at F (the "regime" question)
    for r in results:
        for fam, c in r["refs"].items():
            print(f"seed {r['seed']} {fam}: val {c[0][1]:.3f} at step {c[0][0]} -> {c[-1][1]:.3f} at step {c[-1][0]}")


if __name__ == "__main__":
    main()
