"""
Convergence sweep tables
========================

The markdown page of one ``scripts/bench_convergence.py`` sweep, written from its result file and the
re-analysis of its comparisons (``reanalysis.reanalyse``), so a table never shows a verdict that does not
hold: ratios and differences carry the t interval, the BCa interval and Holm's adjusted p, and the verdict is
the re-analysis's ("resolved" only when both intervals exclude no difference and it survives Holm). The
descriptive columns (targets reached, final loss, failures, realised q) are the result file's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from checkfree.analysis.reanalysis import CONVERGENCE_SWEEPS, comparison_names
from checkfree.analysis.stats import HEADLINE_SEEDS, fmt_interval
from checkfree.analysis.tables import markdown_table

# sweeps whose page is written here: the re-analysed ones and the overlap fit (it reports no comparison)
SWEEPS = (*CONVERGENCE_SWEEPS, "overlap_fit")
VERDICT_RULE = (
    "a verdict only where the 95% t interval and the BCa bootstrap both exclude no difference and it survives "
    "Holm's correction over the sweep's comparisons; otherwise \"not resolved\", with the reason"
)


def _rate_label(result: dict) -> dict[float, str]:
    """{nominal rate: the effective per-stage hourly rate it is labelled with}."""
    return {r: f"{e:.0%}" for r, e in zip(result["rates"], result["effective_rates"])}


def _verdict(judged: dict) -> str:
    """The verdict; a twin arm's repeat says whose row it repeats (its verdict is that row's, written "= ...")."""
    if not judged["note"].startswith("duplicate"):
        return judged["verdict"]
    twin = judged["note"].split(" ran the same trajectory as ", 1)[1].split(";", 1)[0]
    return f"{judged['verdict']} (the same runs as {twin}; not counted in Holm)"


def _judged_cells(judged: dict, digits: int) -> list[str]:
    """t interval, BCa interval, Holm p and verdict of one judged comparison."""
    p = judged["p_holm"]
    return [
        fmt_interval(judged["t"], digits),
        fmt_interval(judged["bca"], digits),
        "-" if p is None else f"{p:.3f}",
        _verdict(judged),
    ]


def _summary(result: dict, eff: dict[float, str]) -> str:
    fracs = result["target_fracs"]
    rows = []
    for key, t in result["table"].items():
        rate, strategy = key.split("/", 1)
        rows.append(
            [eff.get(float(rate), f"{float(rate):.0%}"), strategy]
            + [f"{t[f'reached@{f}']}/{t['seeds']}" for f in fracs]
            + [fmt_interval(t["final_val"], 3), fmt_interval(t["failures"], 1)]
        )
    headers = ["rate", "strategy", *(f"reached {f:.0%}" for f in fracs), "final val loss", "failures"]
    return markdown_table(headers, rows)


def _ratios(result: dict, judged: dict[str, dict], names: list[str], eff: dict[float, str]) -> str:
    rows = [
        [eff[c["rate"]], f"{c['target_frac']:.0%}", c["ours"], c["baseline"], judged[name]["t"]["n"] or 0,
         f"{c['ours_not_reached']} / {c['baseline_not_reached']}", *_judged_cells(judged[name], 2)]
        for c, name in zip(result["comparisons"], names)
    ]  # fmt: skip
    headers = ["rate", "target", "ours", "baseline", "paired seeds", "not reached (ours / baseline)",
               "ratio [95% t]", "[95% BCa]", "Holm p", "verdict"]  # fmt: skip
    return markdown_table(headers, rows)


def _differences(result: dict, judged: dict[str, dict], names: list[str], eff: dict[float, str]) -> str:
    rows = [
        [eff[c["rate"]], c["ours"], c["baseline"], judged[name]["t"]["n"] or 0, *_judged_cells(judged[name], 3)]
        for c, name in zip(result["final_val_differences"], names)
    ]
    headers = ["rate", "ours", "baseline", "paired seeds", "difference [95% t]", "[95% BCa]", "Holm p", "verdict"]
    return markdown_table(headers, rows)


def _realised_q(result: dict, eff: dict[float, str]) -> str:
    rows = []
    for rate in result["rates"]:
        strategies = dict.fromkeys(c["strategy"] for c in result["realised_q"] if c["rate"] == rate)
        for strategy in strategies:
            cells = [c for c in result["realised_q"] if c["rate"] == rate and c["strategy"] == strategy]
            rows.append([eff[rate], strategy, *(fmt_interval(c["q"], 1) for c in cells)])
    return markdown_table(["rate", "strategy", *(f"q to {f:.0%}" for f in result["target_fracs"])], rows)


def convergence_markdown(result: dict, judged: dict) -> str:
    """A bench_convergence sweep's page.

    Args:
        result: the sweep's JSON (``table``, ``comparisons``, ``final_val_differences``, ``realised_q``).
        judged: the sweep's entry in the re-analysis, ``{"family": [...], "duplicates": [...]}``.

    Raises:
        ValueError: the re-analysis does not judge a comparison the sweep reports (it is stale).
    """
    by_name = {c["name"]: c for c in judged["family"] + judged["duplicates"]}
    names = comparison_names(result)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"the re-analysis does not judge {missing}: run scripts/reanalyse.py on this sweep")
    n_ratio = len(result["comparisons"])
    eff = _rate_label(result)
    n_seeds = len(result["seeds"])
    headline = "" if n_seeds >= HEADLINE_SEEDS else f" (fewer than the {HEADLINE_SEEDS} a headline claim needs)"
    lines = [
        f"{n_seeds} seeds{headline}; rates are effective per-stage hourly rates (nominal x acceleration "
        f"{result['acceleration']:g}, iteration {result['iteration_s']:g} s); validation every "
        f"{result['eval_every']} steps. Targets: {', '.join(f'{f:.0%}' for f in result['target_fracs'])} of each "
        "seed's failure-free progress. Final loss and failures: mean [95% percentile bootstrap] over seeds, "
        "descriptive.\n",
        _summary(result, eff),
    ]
    if result["comparisons"]:
        by = result["comparisons"][0]["by"]
        lines += [
            f"{by.capitalize()} to target, ours over the baseline: geometric mean of the per-seed ratios over the "
            f"seeds where both reached it; {VERDICT_RULE}. Judged by `python scripts/reanalyse.py` "
            "(`docs/results/reanalysis.md`).\n",
            _ratios(result, by_name, names[:n_ratio], eff),
        ]
    if result["final_val_differences"]:
        lines += [
            f"Final validation loss, ours minus the baseline: mean of the per-seed differences; {VERDICT_RULE}.\n",
            _differences(result, by_name, names[n_ratio:], eff),
        ]
    if result.get("realised_q"):
        lines += [
            "Realised q: extra committed steps to the target per failure, against the failure-free run of the "
            "same seed (mean over seeds with failures, 95% percentile bootstrap, descriptive).\n",
            _realised_q(result, eff),
        ]
    return "\n".join(lines)


def write_pages(results_dir: str | Path, reanalysis: dict) -> list[Path]:
    """Rewrite ``<sweep>.md`` beside each sweep's JSON in ``results_dir`` from it and ``reanalysis``; returns
    the pages written."""
    d = Path(results_dir)
    written = []
    for name in SWEEPS:
        if not (d / f"{name}.json").is_file():
            continue
        result = json.loads((d / f"{name}.json").read_text())
        page = d / f"{name}.md"
        page.write_text(convergence_markdown(result, reanalysis.get(name, {"family": [], "duplicates": []})))
        written.append(page)
    return written
