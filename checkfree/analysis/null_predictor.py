"""
The null predictor
==================

What the cost model must beat to earn its place as a predictor: the **null predictor** times a run to its
target as the failure-free steps to it times the run's own measured seconds per iteration, times (1 + swap
tax) for a run on CheckFree+'s swapped schedule, with no failure model at all (``null_seconds``).

``judge_against_null`` puts both predictions of the same pairs side by side: the winners each picks, their
error factors, a paired interval on the difference of their log errors, a range around each prediction wide
enough for run-to-run noise, and a verdict. ``validate-sweep`` (``checkfree.analysis.validation``) judges its
pairs with it; ``recorded_null`` (``scripts/whatif.py null``) does the same from recorded result files, for
when the run directories are gone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import scipy.stats as sps
from tabulate import tabulate

from checkfree.analysis import costmodel as cm
from checkfree.analysis.stats import LEVEL, Interval, t_interval
from checkfree.core.strategies import SWAPPED


def null_seconds(run: cm.RecordedRun, ref_steps: float, swap_tax: float) -> float:
    """The null predictor's time to the target: the failure-free steps to it times the run's own measured
    seconds per iteration (its whole recorded time over its iterations: failures, saves and rollbacks are in
    the average, the failure model is not) times (1 + swap tax) for a run on the swapped schedule."""
    per_iteration = cm.replay(run).wall_s / len(run.iterations) if run.iterations else math.nan
    return ref_steps * per_iteration * (1.0 + (swap_tax if run.swap else 0.0))


def recorded_null_pairs(validation: dict, rows: list[dict]) -> list[dict]:
    """The pairs of a recorded ``validate-sweep`` result, each with the null predictor's ratio from the sweep's
    ``.rows.json`` (bench_convergence: each run's ``train_s`` over its ``iterations``), for when the run
    directories themselves are gone. The swap tax is the one the validation used."""
    sweep = validation["validate_sweep"]
    sigma = sweep.get("swap_tax") or 0.0
    per_iteration = {(r["strategy"], r["rate"], r["seed"]): r["train_s"] / r["iterations"] for r in rows}
    out = []
    for p in sweep["pairs"]:
        named = re.fullmatch(r"r(.+)-s(\d+)", p["pair"])
        if named is None:
            raise ValueError(f"pair {p['pair']!r} is not named rRATE-sSEED")
        rate, seed = float(named.group(1)), int(named.group(2))
        cost = {}
        for strategy in (sweep["baseline"], sweep["ours"]):
            if (strategy, rate, seed) not in per_iteration:
                raise ValueError(f"no row for {strategy} at rate {rate:g}, seed {seed} in the sweep's rows")
            swapped = strategy.split(":")[0] in SWAPPED
            cost[strategy] = per_iteration[strategy, rate, seed] * (1.0 + (sigma if swapped else 0.0))
        out.append(p | {"rate": rate, "seed": seed, "null_ratio": cost[sweep["ours"]] / cost[sweep["baseline"]]})
    return out


def _log_error(predicted: float | None, measured: float | None) -> float:
    ok = predicted and measured and math.isfinite(predicted) and math.isfinite(measured)
    return abs(math.log(predicted / measured)) if ok else math.nan


def _noise_half_widths(errors: np.ndarray, level: float) -> np.ndarray:
    """Per pair, the half-width (in log) of a prediction range that carries run-to-run noise: Student's t
    times the root-mean-square log error of the *other* pairs (leave one out, so a pair does not widen its
    own range)."""
    n = errors.size
    out = np.full(n, math.nan)
    for i in range(n):
        rest = np.delete(errors, i)
        rest = rest[np.isfinite(rest)]
        if rest.size >= 2:
            out[i] = float(sps.t.ppf((1 + level) / 2, rest.size)) * math.sqrt(float((rest**2).mean()))
    return out


def judge_against_null(pairs: list[dict], level: float = LEVEL) -> dict:
    """The model against the null predictor on the same pairs (``measured_ratio``, ``predicted_ratio``,
    ``null_ratio``; ``rate`` for the noise by rate): the winners each picks (ratio below or above 1, as
    measured), the geometric-mean error factor, a paired t interval on the difference of their absolute log
    errors (model minus null: below 0, the model is closer), and, per pair, a range around each prediction
    wide enough for run-to-run noise (``_noise_half_widths``) and whether the measured ratio is inside it."""
    meas = np.array([p["measured_ratio"] or math.nan for p in pairs], dtype=float)
    err = {
        k: np.array([_log_error(p[f"{k}_ratio"], p["measured_ratio"]) for p in pairs]) for k in ("predicted", "null")
    }
    half = {k: _noise_half_widths(e, level) for k, e in err.items()}
    out: dict = {"pairs": [], "level": level}
    for name, key in (("model", "predicted"), ("null", "null")):
        picked = [(p[f"{key}_ratio"] < 1) == (p["measured_ratio"] < 1) for p in pairs if p["measured_ratio"]]
        e = err[key][np.isfinite(err[key])]
        out[name] = {
            "winners_agree": int(sum(picked)),
            "pairs": len(picked),
            "error_factor": float(math.exp(e.mean())) if e.size else math.nan,
            "noise_range_factor": float(math.exp(np.nanmean(half[key]))),
        }
    for i, p in enumerate(pairs):
        row = {"pair": p["pair"], "measured_ratio": p["measured_ratio"]}
        for name, key in (("model", "predicted"), ("null", "null")):
            pred, h = p[f"{key}_ratio"], half[key][i]
            lo, hi = (pred * math.exp(-h), pred * math.exp(h)) if math.isfinite(h) and pred else (None, None)
            inside = lo is not None and p["measured_ratio"] is not None and lo <= p["measured_ratio"] <= hi
            row[name] = {"ratio": pred, "error_factor": math.exp(err[key][i]), "range": [lo, hi], "inside": inside}
        out["pairs"].append(row)
    for name in ("model", "null"):
        out[name]["inside"] = sum(r[name]["inside"] for r in out["pairs"])
    diff = t_interval((err["predicted"] - err["null"]).tolist(), level)
    out["log_error_difference"] = diff.as_dict()
    out["noise_by_rate"] = _noise_by_rate(pairs, meas, level)
    out["verdict"] = _null_verdict(out, diff)
    return out


def _noise_by_rate(pairs: list[dict], meas: np.ndarray, level: float) -> list[dict]:
    """Run-to-run noise: per failure rate, the measured ratios' geometric mean, its t interval and their
    geometric standard deviation over the seeds."""
    out = []
    for rate in sorted({p.get("rate") for p in pairs if p.get("rate") is not None}):
        logs = np.log([m for p, m in zip(pairs, meas) if p.get("rate") == rate and math.isfinite(m)])
        iv = t_interval(logs.tolist(), level)
        gsd = math.exp(float(logs.std(ddof=1))) if logs.size > 1 else math.nan
        out.append(
            {
                "rate": rate,
                "n": int(logs.size),
                "geometric_mean": math.exp(iv.estimate),
                "low": math.exp(iv.low),
                "high": math.exp(iv.high),
                "geometric_sd": gsd,
            }
        )
    return out


def _null_verdict(out: dict, diff: Interval) -> str:
    m, n = out["model"], out["null"]
    closer = (
        "closer than the null predictor (the paired interval is below 0)"
        if diff.n > 1 and diff.high < 0
        else "further off than the null predictor (the paired interval is above 0)"
        if diff.n > 1 and diff.low > 0
        else "no closer than the null predictor, within noise (the paired interval includes 0)"
    )
    beats = diff.n > 1 and diff.high < 0 and m["winners_agree"] >= n["winners_agree"]
    return (
        f"{'The model beats' if beats else 'The model does not beat'} the null predictor: it picks "
        f"{m['winners_agree']}/{m['pairs']} winners against the null's {n['winners_agree']}/{n['pairs']}, its "
        f"error factor is {m['error_factor']:.2f}x against {n['error_factor']:.2f}x, and it is {closer}: mean "
        f"|log error| difference {diff.estimate:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]."
    )


def null_markdown(summary: dict, title: str) -> list[str]:
    """The comparison as markdown: the verdict, per pair both predictions with their noise ranges, and the
    noise by rate."""
    fmt = lambda x: "-" if x is None or not math.isfinite(x) else f"{x:.2f}"
    lines = [
        f"### {title}\n",
        summary["verdict"] + "\n",
        f"Ranges: each prediction times exp(+-t x the root-mean-square log error of the other pairs) at "
        f"{summary['level']:.0%}, so they carry run-to-run noise (the measured ratio's spread over seeds at one "
        f"rate is below); model {summary['model']['inside']}/{summary['model']['pairs']} inside (mean width "
        f"x/{summary['model']['noise_range_factor']:.2f}), null {summary['null']['inside']}/"
        f"{summary['null']['pairs']} (x/{summary['null']['noise_range_factor']:.2f}).\n",
    ]
    rows = [
        {
            "pair": r["pair"],
            "measured": fmt(r["measured_ratio"]),
            "model": fmt(r["model"]["ratio"]),
            "model range": f"{fmt(r['model']['range'][0])}-{fmt(r['model']['range'][1])}",
            "model off": fmt(r["model"]["error_factor"]),
            "null": fmt(r["null"]["ratio"]),
            "null range": f"{fmt(r['null']['range'][0])}-{fmt(r['null']['range'][1])}",
            "null off": fmt(r["null"]["error_factor"]),
        }
        for r in summary["pairs"]
    ]
    lines.append(tabulate(rows, headers="keys", tablefmt="github"))
    noise = [
        {
            "rate (/h)": f"{x['rate']:g}",
            "seeds": x["n"],
            "measured ratio [95% t]": f"{x['geometric_mean']:.2f} [{x['low']:.2f}, {x['high']:.2f}]",
            "geometric SD over seeds": fmt(x["geometric_sd"]),
        }
        for x in summary["noise_by_rate"]
    ]
    if noise:
        lines += ["\nRun-to-run noise of the measured ratio:\n", tabulate(noise, headers="keys", tablefmt="github")]
    return lines


def recorded_null(sweeps: list[tuple[str, str, str]]) -> tuple[dict, str]:
    """``judge_against_null`` for recorded sweeps: (name, a ``validate-sweep`` JSON, the sweep's
    ``.rows.json``) each. Returns the JSON result and its markdown."""
    result, lines = {}, []
    for name, validation_path, rows_path in sweeps:
        validation = json.loads(Path(validation_path).read_text())
        if "validate_sweep" not in validation:
            raise ValueError(f"{validation_path}: no validate_sweep result in it (written by validate-sweep?)")
        pairs = recorded_null_pairs(validation, json.loads(Path(rows_path).read_text()))
        summary = judge_against_null(pairs)
        sweep = validation["validate_sweep"]
        summary |= {
            "validation": validation_path,
            "rows": rows_path,
            "baseline": sweep["baseline"],
            "ours": sweep["ours"],
            "swap_tax": sweep.get("swap_tax") or 0.0,
        }
        result[name] = summary
        title = (
            f"{name}: {sweep['ours']} over {sweep['baseline']} ({validation_path}; null: seconds per "
            f"iteration from {rows_path}, swap tax {summary['swap_tax']:.3g})"
        )
        lines += [*null_markdown(summary, title), ""]
    return {"null": result}, "\n".join(lines)
