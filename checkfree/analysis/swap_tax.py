"""
Swap tax
========

How many more steps CheckFree+'s swapped schedule needs than the plain one, without failures, from paired runs
(same seed: same initial weights and batches): ``scripts/bench_swap_tax.py`` trains the runs and writes the
tables; the rules are here.

- Targets, as in the convergence benchmarks: ``frac`` of the progress the plain run makes from its first to
  its best validation loss, ``target = first - frac * (first - best)``; steps to a target: the first evaluation
  at or below it.
- A swapped run that never reaches a target counts at step ``steps + 1`` (censored: its ratio, and the tax,
  are then lower bounds).
- The family (every layout, fraction, lr scale and target, and the final-loss differences) is judged at once
  (``stats.judge``: t and BCa intervals, Holm).
"""

from __future__ import annotations

import json
from pathlib import Path

from checkfree.analysis import costmodel as cm
from checkfree.analysis.runs import read_metrics, steps_to_target, val_curve
from checkfree.analysis.stats import Comparison, fmt_interval, judge
from checkfree.config import ConfigError, load_config, split_args

GOAL = 1.05  # issue 22: a tax of 1.05x or less with the edge stages still recoverable


def paired_row(plain_dir: Path, swap_dir: Path, target_fracs: list[float], steps: int) -> dict:
    """The targets of the plain run in ``plain_dir``, the steps both runs took to each (the swapped run in
    ``swap_dir``: ``steps + 1`` where it never got there, flagged ``swap_reached@F``), and both final
    validation losses."""
    plain, swap = val_curve(read_metrics(plain_dir)), val_curve(read_metrics(swap_dir))
    first, best = plain[0].loss, min(p.loss for p in plain)
    row: dict = {}
    for f in target_fracs:
        target = first - f * (first - best)
        got = steps_to_target(swap, target)
        row[f"target@{f}"] = target
        row[f"plain_steps@{f}"] = steps_to_target(plain, target).steps  # best is on the curve: always reached
        row[f"swap_steps@{f}"] = got.steps if got else steps + 1
        row[f"swap_reached@{f}"] = got is not None
    row["plain_final_val"] = json.loads((plain_dir / "summary.json").read_text())["final_val_loss"]
    row["swap_final_val"] = json.loads((swap_dir / "summary.json").read_text())["final_val_loss"]
    return row


def _cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["layout"], r["fraction"], r["lr_scale"]), []).append(r)
    return out


def family(rows: list[dict], fracs: list[float], steps: int) -> list[tuple[dict, Comparison]]:
    """Every comparison of the sweep (the Holm family), judged: (its keys, the comparison)."""
    out = []
    for (layout, fraction, scale), cell in _cells(rows).items():
        keys = {"layout": layout, "fraction": fraction, "lr_scale": scale, "seeds": [r["seed"] for r in cell]}
        what = f"{layout} swap {fraction:g} lr x{scale:g}"
        for f in fracs:
            censored = sum(not r[f"swap_reached@{f}"] for r in cell)
            note = f"{censored} of {len(cell)} seeds never reached it: counted at step {steps + 1}, a lower bound"
            c = Comparison(
                f"{what} {f:.0%} target: steps swap / plain",
                [r[f"swap_steps@{f}"] for r in cell],
                [r[f"plain_steps@{f}"] for r in cell],
                words=("swap faster", "swap slower"),
                note=note if censored else "",
            )
            out.append(({**keys, "what": "steps ratio", "target_frac": f, "censored": censored}, c))
        c = Comparison(
            f"{what} final val loss: swap - plain",
            [r["swap_final_val"] for r in cell],
            [r["plain_final_val"] for r in cell],
            kind="difference",
            words=("swap lower", "swap higher"),
        )
        out.append(({**keys, "what": "final val difference", "target_frac": None, "censored": 0}, c))
    judge([c for _, c in out])
    return out


def goal_met(keys: dict, c: Comparison) -> str:
    """Whether the tax is within GOAL: 'yes' when the t interval's upper end is at most GOAL and no seed was
    censored, 'no' when its lower end is above GOAL, else 'undecided'."""
    if c.t is None or c.t.n < 2:
        return "undecided"
    if c.t.low > GOAL:
        return "no"
    return "yes" if c.t.high <= GOAL and not keys["censored"] else "undecided"


def tables(judged: list[tuple[dict, Comparison]]) -> tuple[list[str], list[list], list[str], list[list]]:
    ratio_h = ["layout", "fraction", "lr", "target", "tax [95% t]", "BCa", "seeds", "censored", "Holm p", "verdict"]
    ratio_h.append(f"<= {GOAL}x")
    ratio, diff = [], []
    for k, c in judged:
        head = [k["layout"], f"{k['fraction']:g}", f"x{k['lr_scale']:g}"]
        if k["what"] == "steps ratio":
            tail = [f"{k['censored']}/{c.t.n}", f"{c.p_holm:.3g}", c.verdict, goal_met(k, c)]
            ratio.append([*head, f"{k['target_frac']:.0%}", fmt_interval(c.t), fmt_interval(c.bca), c.t.n, *tail])
        else:
            diff.append([*head, fmt_interval(c.t, 3), fmt_interval(c.bca, 3), c.t.n, f"{c.p_holm:.3g}", c.verdict])
    diff_h = ["layout", "fraction", "lr", "swap - plain [95% t]", "BCa", "seeds", "Holm p", "verdict"]
    return ratio_h, ratio, diff_h, diff


# ---- expected time to target per swapped fraction (issue 22 item 3: choosing the default) -------------------
def q_by_seed(q_result: dict, method: str, stage: int, k: int) -> dict[int, tuple[float, bool]]:
    """Per seed, (q, reached) of ``method`` losing ``stage`` in a ``scripts/measure_q.py`` result, at its
    target F+``k``. A seed that never reached the target within the horizon gets the least q it can have had:
    its arm needed more than the horizon, the reference crossed the target at its own step R (read from the
    result's reference curve, at most F + k), so q >= F + horizon + eval_every - R (a lower bound, flagged
    ``reached`` False).

    Raises:
        ValueError: the result has no row of that method, stage and target, or no reference curve for a
            censored seed.
    """
    rows = [r for r in q_result["rows"] if r["method"] == method and r["stage"] == stage]
    if not rows or f"q@{k}" not in rows[0]:
        have = sorted({(r["method"], r["stage"]) for r in q_result["rows"]})
        raise ValueError(f"no q@{k} of method {method!r} at stage {stage} in the q result (it has {have})")
    out = {}
    for r in rows:
        if r[f"reached@{k}"]:
            out[r["seed"]] = (r[f"q@{k}"], True)
            continue
        out[r["seed"]] = (_censored_floor(q_result, r, k), False)
    return out


def _censored_floor(q_result: dict, row: dict, k: int) -> float:
    """The least q of a seed whose arm never reached the target F+k within the horizon (``q_by_seed``)."""
    fail_at, horizon, every = q_result["fail_at"], q_result["horizon"], q_result["eval_every"]
    ref = q_result.get("reference_curves", {}).get(f"{row['seed']}/{row['family']}")
    if not ref:
        raise ValueError(f"seed {row['seed']}: censored q@{k} and no reference curve to bound it in the q result")
    target = min(v for s, v in ref if s <= fail_at + k)
    crossed = steps_to_target(ref, target)[0]  # the reference reached its own best-so-far by F + k
    return float(fail_at + horizon + every - crossed)


def q_setup(q_result: dict) -> tuple[float, int]:
    """(pipeline.swap_fraction, pipeline.num_microbatches) of the runs a ``measure_q.py`` result measured, from
    its recorded config files and overrides (resolved from the repository root).

    Raises:
        ValueError: the result has no ``args`` or they no longer load.
    """
    if "args" not in q_result:
        raise ValueError("the q result has no 'args' (expected a scripts/measure_q.py result)")
    files, overrides = split_args(q_result["args"])
    try:
        cfg = load_config(files, overrides)
    except (ConfigError, OSError) as e:
        raise ValueError(f"the q result's config {q_result['args']} does not load: {e}") from e
    return cfg.pipeline.swap_fraction, cfg.pipeline.num_microbatches


def stage_q(edge: dict, middle: dict | None, num_stages: int, k: int, method: str = "plus") -> dict[int, list]:
    """Per seed, q of every stage: the first and last from ``edge`` (one fraction's measurement), the others
    from ``middle`` (None: from ``edge`` too). Only seeds that every stage has are kept."""
    per_stage = []
    for stage in range(num_stages):
        source = edge if stage in (0, num_stages - 1) or middle is None else middle
        per_stage.append(q_by_seed(source, method, stage, k))
    seeds = set.intersection(*(set(s) for s in per_stage))
    return {seed: [s[seed] for s in per_stage] for seed in sorted(seeds)}


def expected_hours(
    target_steps: float,
    swap_tax: float,
    q: float,
    hourly_rate: float,
    num_stages: int,
    iteration_s: float,
    downtime_s: float,
) -> float:
    """Expected hours to ``target_steps`` failure-free steps under CheckFree(+) (``costmodel.expected_time``):
    every stage fails at ``hourly_rate``, one step stands for ``iteration_s`` seconds, each loss costs
    ``downtime_s`` and ``q`` extra steps, and the schedule needs ``1 + swap_tax`` times the steps."""
    sc = cm.Scenario(
        target_steps=target_steps,
        step_s=iteration_s,
        stage_fail_prob=cm.per_step_probability(hourly_rate, iteration_s),
        num_stages=num_stages,
        downtime_s=downtime_s,
        q=q,
        swap_tax=max(swap_tax, 0.0),
    )
    return cm.expected_time(sc, cm.checkfree()) / 3600.0


def expected_time_rows(
    tax_rows: list[dict],
    q_results: dict[float, dict],
    middle: dict | None,
    *,
    layout: str,
    num_stages: int,
    target_frac: float,
    q_at: int,
    rates: list[float],
    iteration_s: float,
    downtime_s: float,
) -> list[dict]:
    """Per fraction, rate and seed: the swap tax at ``target_frac`` (``paired_row``'s steps, same seed), the
    mean q over the stages (``stage_q``) and the expected hours to the target (``expected_hours``, from the
    plain run's steps). A seed with a censored target or q gives a lower bound, flagged ``censored``."""
    out = []
    for fraction, q_result in sorted(q_results.items(), reverse=True):
        qs = stage_q(q_result, middle, num_stages, q_at)
        cell = [r for r in tax_rows if r["layout"] == layout and r["fraction"] == fraction and r["lr_scale"] == 1.0]
        if not cell:
            raise ValueError(f"no swap-tax runs of layout {layout!r} at fraction {fraction} (lr x1)")
        for r in cell:
            if r["seed"] not in qs:
                continue
            plain, swap = r[f"plain_steps@{target_frac}"], r[f"swap_steps@{target_frac}"]
            q_mean = sum(q for q, _ in qs[r["seed"]]) / num_stages
            censored = not r[f"swap_reached@{target_frac}"] or not all(ok for _, ok in qs[r["seed"]])
            for rate in rates:
                hours = expected_hours(plain, swap / plain - 1.0, q_mean, rate, num_stages, iteration_s, downtime_s)
                out.append(
                    {
                        "fraction": fraction,
                        "rate": rate,
                        "seed": r["seed"],
                        "plain_steps": plain,
                        "swap_steps": swap,
                        "q_stages": [q for q, _ in qs[r["seed"]]],
                        "q_mean": q_mean,
                        "hours": hours,
                        "censored": censored,
                    }
                )
    return out


def fraction_comparisons(rows: list[dict], reference: float) -> list[tuple[dict, Comparison]]:
    """Every fraction's expected hours against ``reference``'s, per rate, paired by seed, judged as one family."""
    out = []
    for rate in sorted({r["rate"] for r in rows}):
        at = {(r["fraction"], r["seed"]): r for r in rows if r["rate"] == rate}
        ref = {s: r for (f, s), r in at.items() if f == reference}
        for fraction in sorted({f for f, _ in at if f != reference}, reverse=True):
            seeds = sorted(s for f, s in at if f == fraction and s in ref)
            c = Comparison(
                f"swap {fraction:g} against {reference:g} at {rate:.0%}/h: expected hours to the target",
                [at[(fraction, s)]["hours"] for s in seeds],
                [ref[s]["hours"] for s in seeds],
                words=("faster", "slower"),
            )
            censored = sum(at[(fraction, s)]["censored"] or ref[s]["censored"] for s in seeds)
            out.append(({"rate": rate, "fraction": fraction, "reference": reference, "censored": censored}, c))
    judge([c for _, c in out])
    return out


def choose_fraction(rows: list[dict], rate: float) -> tuple[float | None, dict[float, float], list[float]]:
    """The fraction with the least mean expected hours at ``rate`` (point estimates) among those whose every
    seed is uncensored (a censored q or tax is a lower bound: a fraction whose edge stages did not recover
    must not win on it), every fraction's mean, and the fractions left out for censoring (None chosen when
    every fraction was)."""
    means: dict[float, list[float]] = {}
    censored: set[float] = set()
    for r in rows:
        if r["rate"] == rate:
            means.setdefault(r["fraction"], []).append(r["hours"])
            if r["censored"]:
                censored.add(r["fraction"])
    if not means:
        raise ValueError(f"no expected hours at rate {rate}")
    mean = {f: sum(v) / len(v) for f, v in means.items()}
    eligible = {f: h for f, h in mean.items() if f not in censored}
    return (min(eligible, key=eligible.get) if eligible else None), mean, sorted(censored, reverse=True)
