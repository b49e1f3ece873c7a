"""What if: when does CheckFree beat checkpointing? A command line over checkfree.analysis: whatif (map),
validation (replay, validate, validate-sweep), overlap_fit, null_predictor (null) and table2 (paper-table2).

Subcommands (``whatif.py SUBCOMMAND --help`` for the options of each):

    map             expected time to a target per strategy at each --hourly-rate x --storage-mb-s point,
                    Monte-Carlo checks, the break-even save time, and the winner's map (table, JSON, PNG)
    replay          recorded engine runs re-timed under other step, save, restore and downtime costs
    validate        runs' measured time to a target loss against the model's and the null predictor's
    validate-sweep  the same for every (rate, seed) pair of a bench_convergence.py --runs-dir
    fit-overlap     q, the overlap tau and the swap tax fitted on a convergence sweep with failure-free runs
    null            the model against the null predictor from recorded validate-sweep results
    paper-table2    the paper-scale prediction with the fitted q, overlap and swap tax beside Table 2

Defaults are the paper's medium model (~500M parameters, 91.3 s steps, 6 stages, ~30 s to replace a stage).

    python scripts/whatif.py map --q 30 --out runs/whatif/whatif.json
    python scripts/whatif.py map --q-json docs/results/q_bench.json --q-key plus/2 --q-at 50 --from-run runs/bench
    python scripts/whatif.py replay runs/a runs/b --step-s 91.3 --storage-mb-s 500 --downtime-s 30
    python scripts/whatif.py validate runs/ckpt runs/cfplus --q 12 --target-loss 2.6
    python scripts/whatif.py fit-overlap runs/bench/overlap-fit-runs checkfree_plus --q 21 --q-full-step 300
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from checkfree.analysis import null_predictor, overlap_fit, table2, validation
from checkfree.analysis import whatif as wi
from checkfree.core.metrics import report


def parse_args(argv=None) -> argparse.Namespace:
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", default="runs/whatif/whatif.json", help="the JSON; a .md (and .png) beside it")

    q = argparse.ArgumentParser(add_help=False)
    q.add_argument("--q", type=float, nargs="+", help="extra steps per rebuilt stage: Q, or Q LOW HIGH")
    q.add_argument("--q-json", help="a JSON written by scripts/measure_q.py")
    q.add_argument("--q-key", default="plus/2", help="METHOD/STAGE in its table")
    q.add_argument("--q-at", type=int, default=50, help="its q@K column")
    q.add_argument(
        "--q-full-step",
        type=float,
        default=0.0,
        help="the step at which q was measured (measure_q.py --fail-at): a loss at step s costs q min(1, s / F), "
        "as losses early in training cost less; 0 (default): q at every step",
    )

    overlap = argparse.ArgumentParser(add_help=False)
    overlap.add_argument(
        "--q-overlap-iterations",
        type=float,
        default=0.0,
        help="tau: an incident J iterations after the previous one costs q (1 - exp(-J / tau)) per lost stage "
        "(fit it with fit-overlap); 0 (default): every loss costs its whole q",
    )
    overlap.add_argument(
        "--swap-tax",
        type=float,
        default=0.0,
        help="sigma: extra steps per step CheckFree+'s swapped schedule costs without failures (its target is "
        "S (1 + sigma); checkpointing does not pay it); fitted by fit-overlap. Default 0",
    )
    overlap.add_argument(
        "--overlap-fit",
        metavar="JSON",
        help="q, --q-overlap-iterations, --q-full-step and --swap-tax from a fit-overlap result, whose bootstrap "
        "samples give validate-sweep's predicted ranges and the map's not-resolved cells",
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    mp = sub.add_parser("map", parents=[out, q, overlap], help="expected times, break-even and the winner's map")
    mp.add_argument("--from-run", help="an engine run: its training state (3x memory/param_bytes), step, stages")
    mp.add_argument("--model-bytes", type=float, help="bytes a checkpoint of every stage moves (weights + Adam)")
    mp.add_argument("--step-s", type=float, help="seconds per step (default: the run's, or 91.3)")
    mp.add_argument("--num-stages", type=int)
    mp.add_argument("--hourly-rate", type=float, nargs="+", default=[0.05, 0.10, 0.16], help="per stage per hour")
    mp.add_argument("--iteration-s", type=float, help="seconds of exposure one step stands for (default: --step-s)")
    mp.add_argument("--acceleration", type=float, default=1.0, help="multiplies each step's exposure")
    mp.add_argument("--storage-mb-s", type=float, nargs="+", default=[100.0, 1000.0])
    mp.add_argument("--restore-s", type=float, help="restore time (default: the save's)")
    mp.add_argument("--downtime-s", type=float, help="per incident: detection and replacement (default 30)")
    mp.add_argument("--target-steps", type=float, default=10_000)
    mp.add_argument("--intervals", type=int, nargs="*", default=[50, 200])
    mp.add_argument("--p-unrecoverable", type=float, help="hybrid: share of incidents rolled back (default: adjacent)")
    mp.add_argument(
        "--async-every", type=int, help="hybrid: steps between async checkpoints (default: as often as fits)"
    )
    mp.add_argument("--interrupt-fraction", type=float, default=0.5)
    mp.add_argument("--map-storage", type=float, nargs=3, default=[10, 10_000, 13], metavar=("LOW", "HIGH", "N"))
    mp.add_argument("--map-rates", type=float, nargs=3, default=[0.01, 0.5, 10], metavar=("LOW", "HIGH", "N"))
    mp.add_argument("--mc-runs", type=int, default=200, help="Monte-Carlo runs per strategy and point (0: none)")
    mp.add_argument("--seed", type=int, default=0)

    rp = sub.add_parser("replay", parents=[out], help="recorded runs re-timed under other costs")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--step-s", type=float, help="seconds per step (default: each iteration's own)")
    rp.add_argument("--save-s", type=float, help="a blocking save (default: from --storage-mb-s or the run's)")
    rp.add_argument("--restore-s", type=float, help="restore time (default: the save's, or the run's)")
    rp.add_argument("--downtime-s", type=float, default=0.0, help="per incident: detection and replacement")
    rp.add_argument("--rebuild-s", type=float, help="per rebuilt incident (default: the run's)")
    rp.add_argument("--storage-mb-s", type=float, nargs="+", help="save and restore at each throughput (MB/s)")

    vd = sub.add_parser("validate", parents=[out, q, overlap], help="runs measured against the model and the null")
    vd.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one with recovery.strategy checkpoint or none")
    vd.add_argument("--target-loss", type=float, help="default: the highest final validation loss")

    vs = sub.add_parser("validate-sweep", parents=[out, q, overlap], help="validate every pair of a sweep")
    vs.add_argument("runs_dir", metavar="RUNS_DIR", help="a bench_convergence.py --runs-dir")
    vs.add_argument("baseline", metavar="BASELINE", help="e.g. checkpoint:25")
    vs.add_argument("ours", metavar="OURS", help="e.g. checkfree_plus")

    fo = sub.add_parser("fit-overlap", parents=[out, q], help="fit q, tau and the swap tax on a sweep")
    fo.add_argument("runs_dir", metavar="RUNS_DIR", help="a bench_convergence.py --runs-dir with a none strategy")
    fo.add_argument("ours", metavar="OURS", help="the rebuilding strategy to fit, e.g. checkfree_plus")

    nl = sub.add_parser("null", parents=[out], help="the model against the null predictor, from recorded results")
    nl.add_argument(
        "--sweep",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "VALIDATION_JSON", "ROWS_JSON"),
        help="a validate-sweep result and its sweep's bench_convergence .rows.json (repeat for more sweeps)",
    )

    pt = sub.add_parser("paper-table2", parents=[out], help="the paper-scale prediction beside Table 2")
    pt.add_argument("--overlap-fit", required=True, metavar="JSON", help="a fit-overlap result: q, tau, ramp, tax")
    pt.add_argument(
        "--swap-tax-json",
        nargs=2,
        action="append",
        default=[],
        metavar=("LABEL", "JSON"),
        help="another swap tax for CheckFree+: a bench_swap_tax.py result (90%% target, half swapped)",
    )
    pt.add_argument("--storage-mb-s", type=float, default=1000.0, help="checkpoint save and restore throughput")
    return ap.parse_args(argv)


def _apply_overlap_fit(ns: argparse.Namespace) -> None:
    """``--overlap-fit PATH``: q, tau, the ramp and the swap tax from a fit-overlap result, written into the
    options (so the JSON's args record the model that ran) with its bootstrap samples (``fit_samples``).
    Given with --q, --q-json, --q-overlap-iterations or --swap-tax as well: refused, they would disagree."""
    ns.fit_samples = None
    if not getattr(ns, "overlap_fit", None):
        return
    if ns.q or ns.q_json or ns.q_overlap_iterations or ns.swap_tax:
        raise ValueError(
            "--overlap-fit sets q, --q-overlap-iterations and --swap-tax from the fit: give none of them with it"
        )
    fit = overlap_fit.load_fit(ns.overlap_fit)
    ns.q = [fit["q"]["estimate"]]
    ns.q_overlap_iterations = fit["tau"]["estimate"]
    ns.q_full_step = fit["q_full_step"]
    ns.swap_tax = fit["swap_tax"]["estimate"]
    ns.fit_samples = fit["samples"]


def _q(ns: argparse.Namespace) -> wi.QSpec:
    return wi.QSpec(ns.q, ns.q_json, ns.q_key, ns.q_at)


def _debt(ns: argparse.Namespace) -> wi.DebtModel:
    return wi.DebtModel(
        ns.q_full_step, ns.q_overlap_iterations, ns.swap_tax, getattr(ns, "overlap_fit", None), ns.fit_samples
    )


def _map(ns: argparse.Namespace) -> tuple[dict, str]:
    settings = wi.MapSettings(
        hourly_rate=ns.hourly_rate,
        storage_mb_s=ns.storage_mb_s,
        map_storage=ns.map_storage,
        map_rates=ns.map_rates,
        target_steps=ns.target_steps,
        iteration_s=ns.iteration_s,
        acceleration=ns.acceleration,
        restore_s=ns.restore_s,
        interrupt_fraction=ns.interrupt_fraction,
        intervals=ns.intervals,
        p_unrecoverable=ns.p_unrecoverable,
        async_every=ns.async_every,
        mc_runs=ns.mc_runs,
        seed=ns.seed,
    )
    base = wi.base_parameters(ns.from_run, ns.model_bytes, ns.step_s, ns.num_stages, ns.downtime_s)
    return wi.run_map(settings, _debt(ns), _q(ns), base, Path(ns.out).with_suffix(".png"))


def run(ns: argparse.Namespace) -> tuple[dict, str | None, bool]:
    """The subcommand's result, the markdown to write beside it (None: none) and whether to print it too."""
    if ns.command in ("map", "validate", "validate-sweep"):
        _apply_overlap_fit(ns)
    if ns.command == "map":
        return *_map(ns), False
    if ns.command == "replay":
        retimed = validation.replay_runs(
            ns.run_dirs, ns.step_s, ns.save_s, ns.restore_s, ns.downtime_s, ns.rebuild_s, ns.storage_mb_s
        )
        return retimed, None, False
    if ns.command == "validate":
        return validation.validate_runs(ns.run_dirs, _q(ns), _debt(ns), ns.target_loss), None, False
    if ns.command == "validate-sweep":
        return *validation.validate_sweep(ns.runs_dir, ns.baseline, ns.ours, _q(ns), _debt(ns)), False
    if ns.command == "fit-overlap":
        given = _q(ns).interval()[0]
        return *overlap_fit.fit_overlap(ns.runs_dir, ns.ours, given, ns.q_full_step), False
    if ns.command == "null":
        return *null_predictor.recorded_null([tuple(s) for s in ns.sweep]), True
    fit = overlap_fit.load_fit(ns.overlap_fit)
    return *table2.compare(fit, ns.swap_tax_json, ns.storage_mb_s), True


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    ns = parse_args(argv)
    try:
        result, markdown, echo = run(ns)
    except (ValueError, OSError) as e:  # a run directory, a result file or a parameter the cost model refused
        raise SystemExit(f"whatif {ns.command}: {e}") from e
    except KeyError as e:  # a JSON given in place of another kind of result
        raise SystemExit(f"whatif {ns.command}: an input file has no {e}: is each the kind of result asked for?") from e
    if markdown is not None:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).with_suffix(".md").write_text(markdown)
        if echo:
            print(markdown)
    report(wi.json_safe({"args": vars(ns), **result}), ns.out)


if __name__ == "__main__":
    main()
