"""
Convergence statistics
======================

What ``checkfree.analysis.convergence`` reports from a sweep's rows (one per rate, seed and strategy): the
table per cell, the paired per-seed ratios of ours over each baseline to each target, the final-loss
differences and the q the sweep realised. Pure functions of the rows; the verdicts that hold (t and BCa
intervals, Holm over the sweep) are added by ``checkfree.analysis.reanalysis.judge_sweep``.
"""

from __future__ import annotations

from checkfree.analysis.stats import bootstrap, paired_ratio, t_interval

# The first-pass rule the sweeps used before issue 22 (a percentile bootstrap for ratios, a t interval for
# final-loss differences, no correction), kept only as each comparison's and difference's
# ``percentile_verdict`` so the re-analysis can show what a page used to claim. It is not the verdict that
# holds: that is ``reanalysis.judge_sweep``'s (t and BCa intervals, Holm; ``stats.MIN_SEEDS`` seeds at least,
# and ``stats.HEADLINE_SEEDS`` for a headline claim).
PERCENTILE_MIN_SEEDS = 5


class UsageError(ValueError):
    """Options or runs the sweep refuses; the message names the option (the script exits with it)."""


def summarise(rows: list[dict], rates, strategies, fracs) -> dict:
    """{"RATE/STRATEGY": cell} with the seeds, final loss and failures (bootstrapped) and, per target, the
    seeds that reached it and the per-seed seconds, steps and iterations to it (None: not reached)."""
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


def _verdict(ours: str, interval, pairs) -> str:
    """The superseded percentile rule: a claim only where the paired interval over >= PERCENTILE_MIN_SEEDS seeds
    excludes 1; misses of the target (a seed where one side never reached it) are always said, never averaged
    away."""
    missed = sum(1 for a, _ in pairs if a is None)
    other_missed = sum(1 for _, b in pairs if b is None)
    note = f"; misses: {ours} {missed}, baseline {other_missed} of {len(pairs)} seeds" if missed or other_missed else ""
    if interval.n < PERCENTILE_MIN_SEEDS:
        return f"not resolved ({interval.n} paired seeds, fewer than {PERCENTILE_MIN_SEEDS}{note})"
    if not interval.excludes(1.0):
        return f"not resolved{note and ' (' + note[2:] + ')'}"
    return f"{ours} {'faster' if interval.high < 1 else 'slower'}{note and ' (' + note[2:] + ')'}"


def sides(strategies, ours=None, baselines=None) -> tuple[list[str], list[str]]:
    """Ours (default: checkfree*, hybrid*) and the baselines (default: checkpoint*, redundant).

    Raises:
        UsageError: ours or baselines not among the strategies.
    """
    if ours is None:
        ours = [s for s in strategies if s.startswith("checkfree") or s.startswith("hybrid")]
    if baselines is None:
        baselines = [s for s in strategies if s.startswith("checkpoint") or s == "redundant"]
    unknown = sorted((set(ours) | set(baselines)) - set(strategies))
    if unknown:
        raise UsageError(f"--ours/--baselines {unknown} are not among --strategies {strategies}")
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
    ours, baselines = sides(strategies, ours, baselines)
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
    ours, baselines = sides(strategies, ours, baselines)
    out = []
    for rate in rates:
        for a in ours:
            for b in baselines:
                by_seed = _by_seed(rows, rate, (a, b), "final_val")
                both = [v for v in by_seed.values() if v.get(a) is not None and v.get(b) is not None]
                interval = t_interval([v[a] - v[b] for v in both])
                if interval.n < PERCENTILE_MIN_SEEDS:
                    verdict = f"not resolved ({interval.n} paired seeds, fewer than {PERCENTILE_MIN_SEEDS})"
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
