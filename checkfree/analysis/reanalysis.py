"""
Re-analysis of finished sweeps
==============================

Reads the result files the benchmarks wrote (``docs/results``: a sweep's JSON with its reported
comparisons and verdicts, and its ``.rows.json`` with one row per run and seed) and judges every reported
comparison again with ``stats.judge``: t interval on the per-seed log ratios (or differences), BCa bootstrap,
Holm's correction over the sweep's comparisons. The old verdict is kept beside the new one.

A comparison whose per-seed values are exactly another comparison's in the same sweep (the hybrid that
never rolled back is CheckFree+ run for run) is listed as a duplicate and kept out of the Holm family, so
one measurement is not counted twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from checkfree.analysis.stats import Comparison, fmt_interval, judge
from checkfree.analysis.tables import markdown_table

# sweeps written by scripts/bench_convergence.py whose JSON carries "comparisons"
CONVERGENCE_SWEEPS = (
    "convergence_ci",
    "convergence_slow",
    "convergence_neighbours",
    "convergence_neighbours_hybrid",
    "fig2_deep",
    "bpe5m",
    "bpe5m_redundant",
)
Q_SWEEPS = ("q_bench", "q_deep")  # scripts/measure_q.py results with per-seed rows


def _per_seed(rows: list[dict], rate: float, strategy: str, key: str, seeds: list[int]) -> list[float | None]:
    by_seed = {r["seed"]: r.get(key) for r in rows if r["rate"] == rate and r["strategy"] == strategy}
    return [by_seed.get(s) for s in seeds]


def _misses(ours: list, theirs: list, a: str, b: str) -> str:
    m_a, m_b = sum(v is None for v in ours), sum(v is None for v in theirs)
    return f"missed the target: {a} {m_a}, {b} {m_b} of {len(ours)} seeds" if m_a or m_b else ""


def judge_sweep(comparisons: list[dict], differences: list[dict], rows: list[dict]) -> None:
    """Set the verdict of each comparison a bench_convergence sweep reports, in place, by the rule that holds
    (t and BCa intervals, Holm over the sweep; a twin arm's repeat says whose verdict it is), keeping the
    percentile rule's verdict as ``percentile_verdict`` and adding the intervals and Holm's p."""
    result = {"comparisons": comparisons, "final_val_differences": differences}
    family, duplicates = convergence_family(result, rows)
    judged(family, duplicates)
    by_name = {c.name: c for c in family + duplicates}
    for d, name in zip(comparisons + differences, comparison_names(result)):
        c = by_name[name]
        d["percentile_verdict"] = d["verdict"]
        d["verdict"] = c.verdict + (f" ({c.note})" if c.note else "")
        d["t"] = _json(c.t.as_dict())
        d["bca"] = _json(c.bca.as_dict())
        d["p_holm"] = c.p_holm


def comparison_names(result: dict) -> list[str]:
    """The names ``convergence_family`` gives the comparisons, in the order they were reported."""
    names = [
        f"{c['rate']:.0%}/h {c['target_frac']:.0%} target: {c['ours']} / {c['baseline']} ({c['by']})"
        for c in result.get("comparisons", [])
    ]
    return names + [
        f"{c['rate']:.0%}/h final val loss: {c['ours']} - {c['baseline']}"
        for c in result.get("final_val_differences", [])
    ]


def convergence_family(result: dict, rows: list[dict]) -> tuple[list[Comparison], list[Comparison]]:
    """The comparisons a bench_convergence sweep reported (ratios to target, final-loss differences), with
    their per-seed values; returns (the Holm family, the duplicates left out of it)."""
    seeds = sorted({r["seed"] for r in rows})
    names = comparison_names(result)
    out: list[Comparison] = []
    arms: list[tuple] = []  # (rate, compared key, ours, baseline) of each comparison
    for c in result.get("comparisons", []):
        key = f"{c['by']}@{c['target_frac']}"
        arms.append((c["rate"], key, c["ours"], c["baseline"]))
        ours = _per_seed(rows, c["rate"], c["ours"], key, seeds)
        theirs = _per_seed(rows, c["rate"], c["baseline"], key, seeds)
        name = names[len(out)]
        out.append(
            Comparison(
                name, ours, theirs, "ratio", True, (f"{c['ours']} faster", f"{c['ours']} slower"),
                c.get("percentile_verdict", c["verdict"]), c["ratio"], _misses(ours, theirs, c["ours"], c["baseline"]),
            )
        )  # fmt: skip
    for c in result.get("final_val_differences", []):
        arms.append((c["rate"], "final_val", c["ours"], c["baseline"]))
        ours = _per_seed(rows, c["rate"], c["ours"], "final_val", seeds)
        theirs = _per_seed(rows, c["rate"], c["baseline"], "final_val", seeds)
        name = names[len(out)]
        out.append(
            Comparison(
                name, ours, theirs, "difference", True, (f"{c['ours']} lower", f"{c['ours']} higher"),
                c.get("percentile_verdict", c["verdict"]), c["difference"],
            )
        )  # fmt: skip
    return _split_duplicates(out, arms, twins(rows))


TIME_KEYS = ("seconds@", "train_s")  # wall-clock: differs between two runs of the same trajectory


def twins(rows: list[dict]) -> dict[tuple[float, str], str]:
    """{(rate, strategy): an earlier strategy}: arms whose rows are the same as another's at that rate in
    every field but wall-clock, for every seed (the hybrid that never rolled back is CheckFree+)."""
    by_arm: dict[tuple[float, str], tuple] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        fields = tuple((k, v) for k, v in sorted(r.items()) if k != "strategy" and not k.startswith(TIME_KEYS))
        by_arm[r["rate"], r["strategy"]] = by_arm.get((r["rate"], r["strategy"]), ()) + (fields,)
    out, seen = {}, {}
    for (rate, strategy), fields in by_arm.items():
        if (rate, fields) in seen:
            out[rate, strategy] = seen[rate, fields]
        else:
            seen[rate, fields] = strategy
    return out


def _split_duplicates(
    comparisons: list[Comparison], arms: list[tuple], twin: dict
) -> tuple[list[Comparison], list[Comparison]]:
    """Comparisons of a twin arm on a field that is not wall-clock repeat their twin's: kept apart."""
    names = {arm: c.name for arm, c in zip(arms, comparisons)}
    family, duplicates = [], []
    for (rate, key, ours, baseline), c in zip(arms, comparisons):
        other = names.get((rate, key, twin.get((rate, ours)), baseline))
        if other is not None and not key.startswith(TIME_KEYS):
            c.note = (
                f"duplicate of '{other}': {ours} ran the same trajectory as {twin[rate, ours]}; not counted in Holm"
            )
            duplicates.append(c)
        else:
            family.append(c)
    return family, duplicates


def q_family(result: dict, reference: str = "weighted") -> list[Comparison]:
    """measure_q's rule comparisons at the middle stages without the swap: ``reference`` against every other
    rule, on q at each target and on the lag at the end, paired by seed (differences in steps)."""
    rows, seeds = result["rows"], result["seeds"]
    num_stages = result["num_stages"]
    keys = [f"q@{k}" for k in result["target_after"]] + ["lag_end"]
    methods = sorted({r["method"] for r in rows if r["family"] == "plain"} - {reference})
    stages = sorted({r["stage"] for r in rows if 0 < r["stage"] < num_stages - 1 and r["family"] == "plain"})
    out = []
    for stage in stages:
        for other in methods:
            for key in keys:

                def per_seed(method: str, key: str = key, stage: int = stage) -> list[float | None]:
                    got = {r["seed"]: r.get(key) for r in rows if r["method"] == method and r["stage"] == stage}
                    return [got.get(s) for s in seeds]

                ours, theirs = per_seed(reference), per_seed(other)
                if not any(v is not None for v in ours) or not any(v is not None for v in theirs):
                    continue
                name = f"stage {stage} {key}: {reference} - {other} (steps)"
                out.append(
                    Comparison(
                        name, ours, theirs, "difference", True, (f"{reference} fewer", f"{reference} more"),
                        "not resolved (docs: the rule does not matter measurably)", None,
                        _misses(ours, theirs, reference, other),
                    )
                )  # fmt: skip
    return out


def ablation_family(rows: list[dict]) -> list[Comparison]:
    """bench_recovery_ablation: the weighted average against copy, uniform and random, paired by (seed,
    lost stages), on the final validation loss and the jump right after the rebuild."""
    out = []
    for kind in sorted({r["kind"] for r in rows}):
        cases = sorted({(r["seed"], tuple(r["lost"])) for r in rows if r["kind"] == kind})
        for other in ("copy", "uniform", "random"):
            for key in ("final_val", "spike"):

                def per_case(method: str, kind: str = kind, cases: list = cases, key: str = key) -> list[float]:
                    got = {
                        (r["seed"], tuple(r["lost"])): r[key]
                        for r in rows
                        if r["kind"] == kind and r["method"] == method
                    }
                    return [got.get(c) for c in cases]

                out.append(
                    Comparison(
                        f"{kind}: {key} weighted - {other}", per_case("weighted"), per_case(other), "difference",
                        True, ("weighted lower", "weighted higher"),
                        "order by mean final val: random < weighted < copy < uniform (no interval)",
                    )
                )  # fmt: skip
    return out


def reanalyse(results_dir: str | Path) -> dict:
    """Every sweep of ``results_dir`` that carries per-seed rows, judged again; {sweep: {"family": [...],
    "duplicates": [...]}} as dicts."""
    d = Path(results_dir)
    out: dict = {}
    for name in CONVERGENCE_SWEEPS:
        if not (d / f"{name}.json").is_file():
            continue
        result = json.loads((d / f"{name}.json").read_text())
        rows = json.loads((d / f"{name}.rows.json").read_text())
        family, duplicates = convergence_family(result, rows)
        out[name] = judged(family, duplicates)
    for name in Q_SWEEPS:
        if (d / f"{name}.json").is_file():
            out[name] = judged(q_family(json.loads((d / f"{name}.json").read_text())), [])
    if (d / "recovery_ablation.rows.json").is_file():
        out["recovery_ablation"] = judged(
            ablation_family(json.loads((d / "recovery_ablation.rows.json").read_text())), []
        )
    return out


def judged(family: list[Comparison], duplicates: list[Comparison]) -> dict:
    """Judge ``family`` (t, BCa, Holm); each duplicate (an arm that repeats another's runs, named in its note)
    takes its twin's intervals and verdict. Both as JSON-ready dicts."""
    judge(family)
    by_name = {c.name: c for c in family}
    for c in duplicates:
        twin = by_name[c.note.split("'")[1]]
        c.t, c.bca, c.p, c.p_holm, c.verdict = twin.t, twin.bca, twin.p, twin.p_holm, f"= {twin.verdict}"
    return {"family": [_json(c.as_dict()) for c in family], "duplicates": [_json(c.as_dict()) for c in duplicates]}


def _json(x):
    """NaN (an interval over no seeds) as None: JSON has no NaN."""
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def _resolved(verdict: str) -> bool:
    return bool(verdict) and not verdict.startswith("not resolved") and not verdict.startswith("order")


def changed(result: dict) -> list[tuple[str, dict]]:
    """(sweep, comparison) of every comparison whose verdict went from resolved to not, or back."""
    return [
        (sweep, c)
        for sweep, r in result.items()
        for c in r["family"]
        if _resolved(c["old_verdict"]) != _resolved(c["verdict"])
    ]


def markdown(result: dict, command: str) -> str:
    """The re-analysis as markdown: per sweep, old interval and verdict against the t and BCa intervals, the
    Holm-adjusted p and the new verdict."""
    n_all = sum(len(r["family"]) for r in result.values())
    flips = changed(result)
    lines = [
        "# Re-analysis of the per-seed results (issue 22)",
        "",
        f"Command: `{command}` (no runs: it reads `docs/results`).",
        "",
        "Each comparison a result file reported, judged again: a 95% t interval on the per-seed log ratios "
        "(ratios) or differences, paired by seed; a 95% BCa bootstrap of the same statistic "
        "(`scipy.stats.bootstrap`, 9,999 resamples); Holm's correction over the sweep's comparisons. "
        "**Resolved** only when both intervals exclude no difference and the Holm-adjusted p is below 0.05. "
        "Ratios are ours / the baseline (below 1: ours needs less). Old intervals are the files' percentile "
        "bootstraps.",
        "",
        f"{len(flips)} of {n_all} comparisons change between resolved and not resolved:",
        "",
    ]
    lines.append(
        markdown_table(
            ["sweep", "comparison", "old", "old verdict", "t interval", "new verdict"],
            [
                [
                    s,
                    c["name"],
                    fmt_interval(c["old_interval"], 3),
                    c["old_verdict"],
                    fmt_interval(c["t"], 3),
                    c["verdict"],
                ]
                for s, c in flips
            ],
        )
    )
    for sweep, r in result.items():
        lines += ["", f"## {sweep}", ""]
        rows = [
            [
                c["name"], fmt_interval(c["old_interval"], 3), c["old_verdict"], fmt_interval(c["t"], 3),
                fmt_interval(c["bca"], 3), f"{c['p_holm']:.3f}", c["verdict"], c["note"],
            ]
            for c in r["family"] + r["duplicates"]
        ]  # fmt: skip
        headers = ["comparison", "old", "old verdict", "t", "BCa", "Holm p", "new verdict", "note"]
        lines.append(markdown_table(headers, rows))
    return "\n".join(lines).rstrip() + "\n"
