"""
Overlap fit
===========

q, the overlap tau and the swap tax sigma fitted on a convergence sweep with failure-free runs, for
``scripts/whatif.py fit-overlap`` (``fit_overlap``); and the fit read back (``load_fit``)
for ``--overlap-fit``, where its estimates set the model of ``map``, ``validate`` and ``validate-sweep`` and its
bootstrap samples their not-resolved cells and predicted ranges, and for ``paper-table2``.

Why fit at all: the cost model charges each lost stage q extra steps, but losses close together overlap
(the second costs less) and CheckFree+'s swapped schedule is slower even without failures; a single q
measured on one failure cannot say either.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from checkfree.analysis import costmodel as cm
from checkfree.analysis.stats import bootstrap
from checkfree.analysis.validation import sweep_runs

logger = logging.getLogger(__name__)

OVERLAP_GRID = np.concatenate([[0.0], np.geomspace(1.0, 3000.0, 160)])


def _fit_with_intervals(pairs: list[dict], unit: list, given: float) -> dict:
    """The fit of (q, tau, sigma) on ``pairs`` with bootstrap intervals over the seeds (a seed's pairs resampled
    together), 200 resampled fits for ``--overlap-fit``'s ranges, and the RMSE of the fit beside the fit
    without the tax, the given q alone and the best single q."""
    d = np.array(unit)  # pairs x grid
    m = np.array([p["measured_extra_steps"] for p in pairs], dtype=float)
    taxed = np.array([p["base_steps"] if p["swap"] else 0.0 for p in pairs], dtype=float)
    seeds = sorted({p["seed"] for p in pairs})
    of_seed = [[i for i, p in enumerate(pairs) if p["seed"] == s] for s in seeds]

    def fit(seed_idx, tax: bool = True) -> tuple[float, int, float]:
        rows = [i for s in np.asarray(seed_idx, dtype=int) for i in of_seed[s]]
        return cm.fit_q_overlap(d[rows], m[rows], taxed[rows] if tax and taxed.any() else None)

    q_fit, k, sigma = fit(range(len(seeds)))
    q_iv = bootstrap(range(len(seeds)), lambda i: fit(i)[0], resamples=2000)
    tau_iv = bootstrap(range(len(seeds)), lambda i: float(OVERLAP_GRID[fit(i)[1]]), resamples=2000)
    sigma_iv = bootstrap(range(len(seeds)), lambda i: fit(i)[2], resamples=2000)
    draw = np.random.default_rng(0).integers(0, len(seeds), size=(200, len(seeds)))
    samples = [[q, float(OVERLAP_GRID[j]), sg] for q, j, sg in (fit(i) for i in draw)]
    q_nt, k_nt, _ = fit(range(len(seeds)), tax=False)
    q_add, _, _ = cm.fit_q_overlap(d[:, :1], m)
    rmse = lambda pred: float(np.sqrt(((pred - m) ** 2).mean()))
    fits = {
        "fitted": rmse(q_fit * d[:, k] + sigma * taxed),
        "fitted_without_tax": rmse(q_nt * d[:, k_nt]),
        "given_q_no_overlap": rmse(given * d[:, 0]),
        "best_q_no_overlap": rmse(q_add * d[:, 0]),
    }
    return {
        "d": d, "taxed": taxed, "seeds": seeds, "q_fit": q_fit, "k": k, "sigma": sigma, "q_add": q_add,
        "fits": fits, "q_iv": q_iv, "tau_iv": tau_iv, "sigma_iv": sigma_iv, "samples": samples,
    }  # fmt: skip


def fit_overlap(runs_dir: str, ours: str, given_q: float, q_full_step: float = 0.0) -> tuple[dict, str]:
    """Fit q, tau (``q_overlap_iterations``) and the swap tax sigma on a convergence sweep of OURS against the
    failure-free runs: per (rate, seed), the measured extra committed steps to the pair's common target (the
    higher final validation loss, as ``validate-sweep`` compares) against sigma times the failure-free
    run's steps to it (paid only by a run on the swapped schedule) plus the debt the model charges the run's
    own losses (``recorded_debt``, with ``--q-full-step``'s ramp; losses after OURS reached the target left
    out). Both are linear, so for each tau on a grid (q, sigma) is non-negative least squares, and the tau with
    the least squared error wins (``cm.fit_q_overlap``); bootstrap intervals over the seeds (a seed's pairs
    share its failure-free run, so they are resampled together). Compared with the same fit without the tax,
    with the given ``--q`` alone, and with the best single q. The fit is only as good as the runs: fit on one
    sweep and validate on another.

    Args:
        runs_dir: a ``bench_convergence.py --runs-dir`` with a ``none`` strategy (``none-sSEED``).
        ours: the rebuilding strategy to fit, e.g. ``checkfree_plus``.
        given_q: the q to compare with (``--q``'s estimate).
        q_full_step: the step at which q was measured (0: q at every step).

    Returns:
        The result and its markdown.
    """
    runs_dir, given = Path(runs_dir), given_q
    pairs, unit = _pairs(runs_dir, ours, q_full_step)
    f = _fit_with_intervals(pairs, unit, given)
    d, taxed, seeds = f["d"], f["taxed"], f["seeds"]
    q_fit, k, sigma, q_add, fits = f["q_fit"], f["k"], f["sigma"], f["q_add"], f["fits"]
    q_iv, tau_iv, sigma_iv, samples = f["q_iv"], f["tau_iv"], f["sigma_iv"], f["samples"]
    for p, row, tx in zip(pairs, d, taxed):
        p["predicted_fitted"] = float(q_fit * row[k] + sigma * tx)
        p["predicted_tax_part"] = float(sigma * tx)
        p["predicted_given_q"] = float(given * row[0])
    tau = float(OVERLAP_GRID[k])
    lines = [
        f"Overlap fit: {ours} against the failure-free run of each seed in {runs_dir} ({len(pairs)} pairs). "
        "Measured extra committed steps to the pair's common target (the higher final validation loss) against "
        "the swap tax (sigma times the failure-free run's steps to the target) plus the model's debt for the "
        "run's own losses"
        + (f", q growing to its value at step {q_full_step:g}" if q_full_step else "")
        + f". Fitted: sigma = {sigma:.3g} [{sigma_iv.low:.3g}, {sigma_iv.high:.3g}], q = {q_fit:.3g} "
        f"[{q_iv.low:.3g}, {q_iv.high:.3g}], tau = {tau:.3g} [{tau_iv.low:.3g}, {tau_iv.high:.3g}] iterations "
        f"(bootstrap over the {len(seeds)} seeds). RMSE {fits['fitted']:.1f} steps fitted, "
        f"{fits['fitted_without_tax']:.1f} fitted without the tax, "
        f"{fits['given_q_no_overlap']:.1f} with q = {given:g} alone, {fits['best_q_no_overlap']:.1f} with "
        f"the best single q ({q_add:.3g}).\n",
        *_rate_table(pairs, given),
    ]
    logger.info("\n".join(lines))
    result = {
        "fit_overlap": {
            "ours": ours,
            "q_full_step": q_full_step,
            "q": q_iv.as_dict() | {"estimate": q_fit},
            "tau": tau_iv.as_dict() | {"estimate": tau},
            "swap_tax": sigma_iv.as_dict() | {"estimate": sigma},
            "given_q": given,
            "best_q_no_overlap": q_add,
            "rmse": fits,
            "pairs": pairs,
            "samples": samples,  # (q, tau, sigma) on 200 bootstrap resamples of the seeds: --overlap-fit's ranges
        }
    }
    return result, "\n".join(lines) + "\n"


def _pairs(runs_dir: Path, ours: str, q_full_step: float) -> tuple[list[dict], list[list[float]]]:
    """Per (rate, seed) of the sweep that reached the pair's common target: the pair's record (measured extra
    steps, the failure-free run's steps, whether it ran swapped) and the model's debt per unit q at each tau of
    the grid.

    Raises:
        ValueError: fewer than 3 such pairs.
    """
    pairs, unit = [], []
    for mine, tag, rate, seed in sweep_runs(runs_dir, ours):
        ref_dir = runs_dir / f"none-s{seed}"
        if not (mine / "summary.json").is_file() or not (ref_dir / "summary.json").is_file():
            continue
        run, ref = cm.load_run(mine), cm.load_run(ref_dir)
        target = max(run.summary["final_val_loss"], ref.summary["final_val_loss"])
        got, base = cm.steps_to_target(run, target), cm.steps_to_target(ref, target)
        if got is None or base is None:
            continue
        model = lambda t: cm.Scenario(1, 1, 0, 1, q=1.0, q_full_step=q_full_step, q_overlap_iterations=t)
        unit.append([cm.recorded_debt(run, model(t), got[0]) for t in OVERLAP_GRID])  # debt per unit q
        pairs.append(
            {
                "pair": tag,
                "seed": seed,
                "rate": rate,
                "failures": sum(it.failures for it in run.iterations if it.step < got[0]),
                "target_loss": target,
                "base_steps": base[0],
                "swap": run.swap,
                "measured_extra_steps": got[0] - base[0],
            }
        )
    if len(pairs) < 3:
        raise ValueError(f"fit-overlap: {len(pairs)} none / {ours} pairs that reached their target in {runs_dir}")
    return pairs, unit


def _rate_table(pairs: list[dict], given: float) -> list[str]:
    """The fit per failure rate, as markdown lines: failures, measured and predicted extra steps (bootstrap
    intervals over the pairs at that rate)."""
    lines = [
        "| rate (/h) | pairs | failures before the target | measured extra steps | fitted model | of which the "
        f"swap tax | q = {given:g} alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate in sorted({p["rate"] for p in pairs}):
        at = [p for p in pairs if p["rate"] == rate]
        mean = lambda key, at=at: bootstrap([p[key] for p in at]).fmt(1)
        lines.append(
            f"| {rate:g} | {len(at)} | {mean('failures')} | {mean('measured_extra_steps')} | "
            f"{mean('predicted_fitted')} | {mean('predicted_tax_part')} | {mean('predicted_given_q')} |"
        )
    return lines


def load_fit(path: str) -> dict:
    """The ``fit_overlap`` result of a ``fit-overlap`` JSON (q, tau, the ramp, the swap tax and their bootstrap
    samples), for ``--overlap-fit``.

    Raises:
        ValueError: no such file, or no fit in it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--overlap-fit {path}: no such file (write it with fit-overlap)")
    fit = json.loads(path.read_text()).get("fit_overlap")
    if fit is None:
        raise ValueError(f"--overlap-fit {path}: no fit_overlap result in it (written by fit-overlap?)")
    return fit
