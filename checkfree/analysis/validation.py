"""
Validation
==========

The cost model against recorded engine runs, for ``scripts/whatif.py``:

- **replay**: recorded runs re-timed under other step, save, restore and downtime costs (``replay_runs``);
- **validate**: each run's measured time to a target loss (relative to the first run) against the model's
  prediction from the runs' own step, save, restore and rebuild times and failures, and the null
  predictor's (``validate_runs``);
- **validate-sweep**: the same for each (rate, seed) pair of a convergence sweep, with the range q's interval
  (or an overlap fit's samples) predicts, and the model judged against the null predictor
  (``checkfree.analysis.null_predictor``) on the pairs (``validate_sweep``).

The sweep layout both this and ``overlap_fit`` read, ``STRATEGY-rRATE-sSEED`` run directories, is read by
``sweep_runs``.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from checkfree.analysis import costmodel as cm
from checkfree.analysis.null_predictor import judge_against_null, null_markdown, null_seconds
from checkfree.analysis.whatif import DebtModel, QSpec

logger = logging.getLogger(__name__)


def replay_runs(
    run_dirs: list[str],
    step_s: float | None = None,
    save_s: float | None = None,
    restore_s: float | None = None,
    downtime_s: float = 0.0,
    rebuild_s: float | None = None,
    storage_mb_s: list[float] | None = None,
) -> dict:
    """Recorded runs re-timed under the given costs (once per ``storage_mb_s`` value when given; None: each
    run's own), beside each run's own costs.

    Args:
        step_s: seconds per step (None: each iteration's own).
        save_s: a blocking save (None: from ``storage_mb_s``, or the run's).
        restore_s: restore time (None: the save's, or the run's).
        downtime_s: per incident: detection and replacement.
        rebuild_s: per rebuilt incident (None: the run's).
        storage_mb_s: save and restore at each throughput (MB/s) of the run's training state.
    """
    out = []
    for d in run_dirs:
        run = cm.load_run(d)
        own = cm.replay(run)
        payload = 3 * run.summary["memory/param_bytes"] if "memory/param_bytes" in run.summary else None
        if storage_mb_s and payload is None:
            raise ValueError(f"replay {d}: summary.json has no memory/param_bytes to size a save at --storage-mb-s")
        retimed = []
        for mb_s in storage_mb_s or [None]:
            r = cm.replay(run, step_s, save_s, restore_s, downtime_s or 0.0, rebuild_s, payload, mb_s)
            retimed.append({"storage_mb_s": mb_s, **r.as_dict()})
            logger.info(
                f"{d}: {run.config['recovery']['strategy']}, {len(run.iterations)} iterations, recorded "
                f"{own.recorded_train_s or math.nan:.2f} s, own costs {own.wall_s:.2f} s, re-timed "
                f"{r.wall_s:.1f} s ({r.wall_s / 3600:.3f} h) at {mb_s or '-'} MB/s: "
                + ", ".join(f"{k} {v:.1f}" for k, v in r.breakdown.items() if v)
            )
        out.append({"run_dir": d, "own": own.as_dict(), "retimed": retimed})
    return {"replay": out}


def _policy_of(run: cm.RecordedRun) -> cm.Policy:
    every = run.config["checkpoint"]["every_steps"] or None
    strategy = run.config["recovery"]["strategy"]
    if strategy == "checkpoint":
        return cm.checkpointing(every)
    return cm.Policy(strategy, every, True, 0.0)  # rebuilds in place; saves (the fallback's) block


def validate_runs(run_dirs: list[str], q: QSpec, debt: DebtModel, target_loss: float | None = None) -> dict:
    """Measured time to the target loss of each run (relative to the first) against the model's prediction
    from the runs' own step, save, restore, rebuild times and failure rate, and the null predictor's.

    Args:
        q: read only when a run rebuilds (checkpointing and failure-free runs need none).
        target_loss: None: the highest final validation loss.
    """
    runs = [cm.load_run(d) for d in run_dirs]
    finals = [r.summary["final_val_loss"] for r in runs if r.summary.get("final_val_loss") is not None]
    target = target_loss if target_loss is not None else max(finals, default=math.nan)
    ref = next((r for r in runs if r.config["recovery"]["strategy"] in ("checkpoint", "none")), None)
    if ref is None:
        raise ValueError("validate needs a run with recovery.strategy checkpoint or none (failure-free steps)")
    reached = cm.steps_to_target(ref, target)
    if reached is None:
        raise ValueError(f"validate: the reference run {ref.run_dir} never reached validation loss {target}")
    rebuilding = any(r.config["recovery"]["strategy"] not in ("checkpoint", "none") for r in runs)
    qs = q.interval() if rebuilding else (0.0, 0.0, 0.0)
    rows = [_validate_row(run, reached[0], target, qs, debt) for run in runs]
    first = rows[0]
    for row in rows:
        row["measured_ratio"] = _ratio(row["measured_s"], first["measured_s"])
        row["predicted_ratio"] = _ratio(row["predicted_s"], first["predicted_s"])
        row["null_ratio"] = _ratio(row["null_s"], first["null_s"])
        row["predicted_ratio_q_range"] = [
            _ratio(row[f"predicted_s_q_{e}"], first["predicted_s"]) for e in ("low", "high")
        ]
        logger.info(
            f"{row['run_dir']}: {row['strategy']}, target {target:.3f} at step {row['measured_steps']} in "
            f"{row['measured_s']:.2f} s (predicted {row['predicted_s']:.2f} s); ratio to the first run: measured "
            f"{row['measured_ratio']:.3f}, predicted {row['predicted_ratio']:.3f}, null {row['null_ratio']:.3f}"
        )
    return {
        "validate": {
            "target_loss": target,
            "reference": ref.run_dir,
            "reference_steps": reached[0],
            "q": qs,
            "runs": rows,
        }
    }


def validate_sweep(runs_dir: str, baseline: str, ours: str, q: QSpec, debt: DebtModel) -> tuple[dict, str]:
    """``validate`` on each (rate, seed) of a convergence sweep: the model's predicted ratio of OURS over
    BASELINE against the measured one, per pair, and how many measured ratios fall inside the range q's
    interval (or the fit's samples) predicts, and the model against the null predictor on the pairs.

    Args:
        runs_dir: a ``bench_convergence.py --runs-dir``.
        baseline: e.g. ``checkpoint:25``; ours: e.g. ``checkfree_plus``.

    Returns:
        The result and its markdown.
    """
    runs_dir = Path(runs_dir)
    pairs = []
    for base, tag, rate, seed in sweep_runs(runs_dir, baseline):
        mine = runs_dir / f"{ours.replace(':', 'K')}-{tag}"
        if (base / "summary.json").is_file() and (mine / "summary.json").is_file():
            row = validate_runs([str(base), str(mine)], q, debt)["validate"]
            b, m = row["runs"]
            pairs.append(
                {
                    "pair": tag,
                    "rate": rate,
                    "seed": seed,
                    "target_loss": row["target_loss"],
                    "measured_ratio": m["measured_ratio"],
                    "predicted_ratio": m["predicted_ratio"],
                    "null_ratio": m["null_ratio"],
                    "predicted_range": _sampled_range(b, m, debt.fit_samples)
                    if debt.fit_samples
                    else m["predicted_ratio_q_range"],
                    "baseline_s": b["measured_s"],
                    "ours_s": m["measured_s"],
                    "failures": [b["failures"], m["failures"]],
                }
            )
    if not pairs:
        raise ValueError(f"validate-sweep: no {baseline} / {ours} pairs with a summary.json in {runs_dir}")
    inside, off, lines = _sweep_table(pairs, baseline, ours, q, debt)
    null = judge_against_null(pairs)
    lines += [
        "",
        *null_markdown(
            null,
            f"Against the null predictor (each run's own seconds per iteration x (1 + swap tax {debt.swap_tax:.3g}))",
        ),
    ]
    logger.info(null["verdict"])
    result = {
        "validate_sweep": {
            "baseline": baseline,
            "ours": ours,
            "pairs": pairs,
            "inside": inside,
            "point_error_factor": off,
            "null": null,
            "q_full_step": debt.q_full_step,
            "q_overlap_iterations": debt.q_overlap_iterations,
            "swap_tax": debt.swap_tax,
        }
    }
    return result, "\n".join(lines) + "\n"


def _sweep_table(
    pairs: list[dict], baseline: str, ours: str, q: QSpec, debt: DebtModel
) -> tuple[int, float, list[str]]:
    """validate-sweep's table: per pair measured against predicted, whether inside the predicted range; then
    how many are inside, how far the point predictions are off and the model they came from. Returns (inside,
    the geometric-mean error factor, the markdown lines)."""
    lines = [
        f"{ours} over {baseline}, time to the pair's common target (the higher final validation loss), measured vs "
        "predicted by the cost model from each run's own step, save, restore and rebuild times and failures; "
        + (
            f"the range is the 2.5-97.5 percentiles of the prediction over the fit's {len(debt.fit_samples)} bootstrap "
            "(q, tau, sigma) samples.\n"
            if debt.fit_samples
            else "the range is the prediction at q's low and high ends.\n"
        ),
        "| pair | measured ratio | predicted ratio | predicted range | inside | failures (baseline, ours) |",
        "|---|---|---|---|---|---|",
    ]
    inside = 0
    for p in pairs:
        lo, hi = (
            sorted(x for x in p["predicted_range"] if x is not None)
            if None not in p["predicted_range"]
            else (None, None)
        )
        ok = p["measured_ratio"] is not None and lo is not None and lo <= p["measured_ratio"] <= hi
        inside += ok
        fmt = lambda x: "-" if x is None else f"{x:.2f}"
        lines.append(
            f"| {p['pair']} | {fmt(p['measured_ratio'])} | {fmt(p['predicted_ratio'])} | "
            f"{fmt(lo)}-{fmt(hi)} | {'yes' if ok else 'no'} | {p['failures'][0]}, {p['failures'][1]} |"
        )
    # how far the point predictions are off, whatever the range: a wide q interval makes "inside" easy
    logs = [
        abs(math.log(p["predicted_ratio"] / p["measured_ratio"]))
        for p in pairs
        if p["predicted_ratio"] and p["measured_ratio"] and math.isfinite(p["predicted_ratio"])
    ]
    off = math.exp(sum(logs) / len(logs)) if logs else math.nan
    lines.append(
        f"\n{inside} of {len(pairs)} measured ratios inside the predicted range; the point predictions are off by "
        f"a factor of {off:.2f} (geometric mean over the pairs)"
        + (
            f"; q = {q.values[0]:.3g} from the fit {debt.fit_path}"
            if debt.fit_samples
            else (f"; q = {qs[0]:g} [{qs[1]:g}, {qs[2]:g}]" if q.given and (qs := q.interval()) else "")
        )
        + (f", growing to its value at step {debt.q_full_step:g}" if debt.q_full_step else ", the same at every step")
        + (
            f"; a loss J iterations after the previous one costs q (1 - exp(-J / {debt.q_overlap_iterations:.3g}))"
            if debt.q_overlap_iterations
            else "; every loss costs its whole q"
        )
        + (f"; the swapped schedule costs {debt.swap_tax:.3g} extra steps per step" if debt.swap_tax else "")
        + "."
    )
    return inside, off, lines


def sweep_runs(runs_dir: Path, strategy: str) -> list[tuple[Path, str, float, int]]:
    """The runs of ``strategy`` in a ``bench_convergence.py --runs-dir``, named ``STRATEGY-rRATE-sSEED`` (":"
    written "K"): (directory, "rRATE-sSEED", rate, seed), by name."""
    prefix = strategy.replace(":", "K")
    out = []
    for d in sorted(runs_dir.glob(f"{prefix}-r*-s*")):
        named = re.fullmatch(re.escape(prefix) + r"-r(.+)-s(\d+)", d.name)
        if named is not None:
            out.append((d, d.name[len(prefix) + 1 :], float(named.group(1)), int(named.group(2))))
    return out


def _row_model(row: dict, q: float, tau: float, sigma: float) -> tuple[cm.Scenario, cm.Policy]:
    """The scenario and policy a ``_validate_row`` predicted with, for another q, tau and swap tax (which
    only a run that paid one pays)."""
    model = {k: v for k, v in row["model"].items() if k != "interval"} | {"q": q, "q_overlap_iterations": tau}
    model["swap_tax"] = sigma if row["model"].get("swap_tax") else 0.0
    interval = row["model"]["interval"]
    strategy = row["strategy"]
    pol = cm.checkpointing(interval) if strategy == "checkpoint" else cm.Policy(strategy, interval, True, 0.0)
    return cm.Scenario(**model), pol


def _sampled_range(base: dict, mine: dict, samples: list) -> list[float | None]:
    """The predicted ratio mine / base over the fit's bootstrap (q, tau) samples: its 2.5 and 97.5 percentiles."""
    ratios = []
    for q, tau, sigma in samples:
        b, m = (cm.expected_time(*_row_model(row, q, tau, sigma)) for row in (base, mine))
        ratios.append(m / b if b and math.isfinite(b) else math.inf)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return [float(lo), float(hi)]


def _ratio(a, b):
    return a / b if a is not None and b else None


def _validate_row(
    run: cm.RecordedRun,
    ref_steps: int,
    target: float,
    qs: tuple[float, float, float],
    debt: DebtModel,
) -> dict:
    """One run's row of ``validate_runs``: measured and predicted seconds to ``target`` (at q's estimate and
    ends), the null predictor's, and the scenario the model used."""
    got = cm.steps_to_target(run, target)
    pol = _policy_of(run)
    tax = debt.swap_tax if run.swap else 0.0  # only a run on the swapped schedule pays it
    model = lambda q: cm.run_scenario(
        run, ref_steps, q, q_full_step=debt.q_full_step, q_overlap_iterations=debt.q_overlap_iterations, swap_tax=tax
    )
    predicted = {name: cm.expected_time(model(q), pol) for name, q in zip(("", "_q_low", "_q_high"), qs)}
    sc = model(qs[0])
    return {
        "run_dir": run.run_dir,
        "null_s": null_seconds(run, ref_steps, debt.swap_tax),
        "strategy": run.config["recovery"]["strategy"],
        "storage_mb_s": run.config["checkpoint"]["storage_mb_s"],
        "failures": sum(it.failures for it in run.iterations),
        "measured_steps": got[0] if got else None,
        "measured_s": got[1] if got else None,
        "predicted_s": predicted[""],
        "predicted_s_q_low": predicted["_q_low"],
        "predicted_s_q_high": predicted["_q_high"],
        "model": sc.__dict__ | {"interval": pol.interval},
    }
