"""Which share of microbatches should CheckFree+ swap? Expected time to target per swapped fraction, from runs.

Issue 22 item 3: the swapped schedule pays a tax on every step (``scripts/bench_swap_tax.py``) and buys the
edge stages' recoverability (q of a lost first or last stage, ``scripts/measure_q.py`` at each fraction).
Swapping less lowers the tax and may raise q. This puts the two together, per seed (the tax runs and the q
runs of a seed share its initial weights and batches): expected hours to the target under CheckFree+
(``checkfree.analysis.costmodel.expected_time``: every stage fails at the hourly rate, one step stands for
``--iteration-s`` seconds, each loss costs ``--downtime-s`` and q steps), from the plain run's steps to the
target, the tax at that target and the mean q over the stages. Every fraction is compared with
``--reference`` (the current default) at each rate, paired by seed: t interval on the log ratios, BCa, Holm
over the table. The choice is the fraction with the least mean expected hours at ``--choose-at``; whether
that beats the reference is the table's verdict, not the choice.

q of the first and last stage comes from each fraction's measurement (``--q FRACTION=PATH``); the middle
stages' from ``--q-middle`` (one measurement, used for every fraction: say so where it is read). A censored
value (a target never reached) enters as its lower bound and the row is flagged.

    python scripts/choose_swap_fraction.py --tax docs/results/swap_tax_bench4.json --layout bench \\
        --q 0.5=docs/results/q_swap0.5.json 0.25=docs/results/q_swap0.25.json 0.125=docs/results/q_swap0.125.json \\
        --q-middle docs/results/q_bench.json --out docs/results/swap_fraction_choice.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from checkfree.analysis.stats import fmt_interval, t_interval
from checkfree.analysis.swap_tax import choose_fraction, expected_time_rows, fraction_comparisons, q_setup
from checkfree.analysis.tables import markdown_table


def _q_arg(text: str) -> tuple[float, Path]:
    fraction, sep, path = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return float(fraction), Path(path)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--q {text!r}: expected FRACTION=PATH, e.g. 0.25=runs/bench/q.json") from None


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tax", type=Path, required=True, help="a bench_swap_tax.py result (swap_tax.json)")
    ap.add_argument("--layout", default="bench", help="the tax result's layout (its config's stem)")
    ap.add_argument("--q", type=_q_arg, nargs="+", required=True, metavar="FRACTION=PATH", help="measure_q.py results")
    ap.add_argument("--q-middle", type=Path, default=None, help="measure_q.py result for the middle stages")
    ap.add_argument("--q-at", type=int, default=50, help="q to the target the reference reached F+K steps after")
    ap.add_argument("--target-frac", type=float, default=0.9, help="which of the tax result's targets")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.10, 0.16], help="hourly per-stage rates")
    ap.add_argument("--iteration-s", type=float, default=91.3, help="seconds one step stands for (paper: 91.3)")
    ap.add_argument("--downtime-s", type=float, default=30.0, help="per loss: detection and replacement")
    ap.add_argument("--reference", type=float, default=0.5, help="the fraction the others are compared with")
    ap.add_argument("--choose-at", type=float, default=0.10, help="the rate the choice is made at")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/swap_fraction_choice.json"))
    ns = ap.parse_args(argv)
    ns.argv = argv if argv is not None else sys.argv[1:]
    return ns


def _load(path: Path, what: str, keys: tuple[str, ...]) -> dict:
    """A result file with ``keys``, or a clear exit naming the file and what it lacks."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"choose_swap_fraction: {what} {path}: {e}") from e
    missing = [k for k in keys if k not in data]
    if missing:
        raise SystemExit(f"choose_swap_fraction: {what} {path} has no {missing}: is it the right kind of result?")
    return data


def _inputs(ns: argparse.Namespace) -> tuple[dict, dict[float, dict], dict | None, dict]:
    """The tax result, the q results by fraction and the middle stages' q, each checked against what it is
    said to be: a q file labelled F must have measured swap fraction F with the tax's microbatches."""
    tax = _load(ns.tax, "--tax", ("target_fracs", "num_microbatches", "rows"))
    if ns.target_frac not in tax["target_fracs"]:
        raise SystemExit(f"--target-frac {ns.target_frac}: the tax result has targets {tax['target_fracs']}")
    q_keys = ("args", "rows", "num_stages", "fail_at", "horizon", "eval_every")
    q_results, setups = {}, {}
    for fraction, path in ns.q:
        q_results[fraction] = _load(path, "--q", q_keys)
        try:
            setups[f"{fraction:g}"] = q_setup(q_results[fraction])
        except ValueError as e:
            raise SystemExit(f"choose_swap_fraction: --q {path}: {e}") from e
        if setups[f"{fraction:g}"] != (fraction, tax["num_microbatches"]):
            measured, mbs = setups[f"{fraction:g}"]
            raise SystemExit(
                f"--q {fraction:g}={path}: it measured swap fraction {measured:g} with {mbs} microbatches; "
                f"expected {fraction:g} with the tax's {tax['num_microbatches']}"
            )
    if ns.reference not in q_results:
        raise SystemExit(f"--reference {ns.reference}: no --q for it (have {sorted(q_results)})")
    middle = _load(ns.q_middle, "--q-middle", q_keys) if ns.q_middle else None
    if middle is not None:
        setups["middle"] = q_setup(middle)
    stages = {r["num_stages"] for r in q_results.values()} | ({middle["num_stages"]} if middle else set())
    if len(stages) != 1:
        raise SystemExit(f"the q results are of different stage counts {sorted(stages)}")
    return tax, q_results, middle, setups


def _cell_table(rows: list[dict], rates: list[float]) -> tuple[list[str], list[list]]:
    out = []
    for fraction in sorted({r["fraction"] for r in rows}, reverse=True):
        for rate in rates:
            cell = [r for r in rows if r["fraction"] == fraction and r["rate"] == rate]
            t = lambda values, digits=2: fmt_interval(t_interval(values), digits)
            out.append(
                [
                    f"{fraction:g}",
                    f"{rate:.0%}",
                    t([r["swap_steps"] / r["plain_steps"] for r in cell]),
                    t([r["q_stages"][0] for r in cell], 1),
                    t([r["q_stages"][-1] for r in cell], 1),
                    t([r["q_mean"] for r in cell], 1),
                    t([r["hours"] for r in cell], 1),
                    f"{sum(r['censored'] for r in cell)}/{len(cell)}",
                ]
            )
    headers = ["fraction", "rate", "tax [95% t]", "q first", "q last", "q mean (all stages)", "hours [95% t]"]
    return [*headers, "censored"], out


def _comparison_table(judged: list, reference: float) -> tuple[list[str], list[list]]:
    rows = [
        [f"{k['fraction']:g}", f"{k['rate']:.0%}", fmt_interval(c.t), fmt_interval(c.bca), c.t.n, f"{c.p_holm:.3g}"]
        + [c.verdict, f"{k['censored']}/{c.t.n}"]
        for k, c in judged
    ]
    headers = ["fraction", "rate", f"hours / hours at {reference:g} [95% t]", "BCa", "seeds", "Holm p", "verdict"]
    return [*headers, "censored"], rows


def _choice_line(chosen: float | None, means: dict[float, float], censored: list[float], rate: float) -> str:
    listed = ", ".join(f"{f:g}: {h:.1f} h" for f, h in sorted(means.items(), reverse=True))
    left_out = f"; left out for censored seeds (a lower bound cannot win): {censored}" if censored else ""
    if chosen is None:
        return f"No choice at {rate:.0%}/h: every fraction has censored seeds ({listed}).\n"
    return f"Least mean expected hours at {rate:.0%}/h: **swap {chosen:g}** ({listed}{left_out}).\n"


def main(argv: list[str] | None = None) -> None:
    ns = parse(argv)
    tax, q_results, middle, setups = _inputs(ns)
    num_stages = next(iter(q_results.values()))["num_stages"]
    try:
        rows = expected_time_rows(
            tax["rows"],
            q_results,
            middle,
            layout=ns.layout,
            num_stages=num_stages,
            target_frac=ns.target_frac,
            q_at=ns.q_at,
            rates=ns.rates,
            iteration_s=ns.iteration_s,
            downtime_s=ns.downtime_s,
        )
    except ValueError as e:
        raise SystemExit(f"choose_swap_fraction: {e}") from e
    judged = fraction_comparisons(rows, ns.reference)
    chosen, means, censored = choose_fraction(rows, ns.choose_at)
    cell_h, cells = _cell_table(rows, ns.rates)
    comp_h, comps = _comparison_table(judged, ns.reference)
    middle_note = (
        f"the middle stages' q from {ns.q_middle} (swap fraction {setups['middle'][0]:g}, "
        f"{setups['middle'][1]} microbatches) for every fraction: an assumption, not measured per fraction"
        if middle
        else "every stage's q from each fraction's own measurement"
    )
    intro = (
        f"Expected hours to the {ns.target_frac:.0%} target under CheckFree+, per swapped fraction, layout "
        f"`{ns.layout}` ({num_stages} stages, {tax['num_microbatches']} microbatches), from runs: the plain "
        f"schedule's steps to the target and the tax ({ns.tax}), q of a lost first and last stage at each "
        f"fraction (target F+{ns.q_at}), {middle_note}; one step stands for {ns.iteration_s:g} s, "
        f"{ns.downtime_s:g} s downtime per loss (`costmodel.expected_time`). Per seed, then a 95% t interval over "
        "seeds. Censored: seeds whose tax or q is a lower bound (a target never reached).\n"
    )
    verdicts = (
        f"Each fraction against {ns.reference:g}, paired by seed: ratio of expected hours, t interval on the "
        "log ratios, BCa, Holm over this table.\n"
    )
    choice = _choice_line(chosen, means, censored, ns.choose_at)
    command = "Command: `python scripts/choose_swap_fraction.py " + " ".join(ns.argv) + "`\n"
    md = "\n".join([intro, markdown_table(cell_h, cells), verdicts, markdown_table(comp_h, comps), choice, command])
    print(md)
    result = {
        "tax": str(ns.tax),
        "layout": ns.layout,
        "num_stages": num_stages,
        "q": {f"{f:g}": str(p) for f, p in ns.q},
        "q_middle": str(ns.q_middle) if ns.q_middle else None,
        "setups": {k: {"swap_fraction": f, "num_microbatches": m} for k, (f, m) in setups.items()},
        "q_at": ns.q_at,
        "target_frac": ns.target_frac,
        "iteration_s": ns.iteration_s,
        "downtime_s": ns.downtime_s,
        "reference": ns.reference,
        "choose_at": ns.choose_at,
        "chosen": chosen,
        "left_out_censored": censored,
        "mean_hours": {f"{f:g}": h for f, h in means.items()},
        "comparisons": [{**k, **c.as_dict()} for k, c in judged],
        "rows": rows,
        "command": ["python", "scripts/choose_swap_fraction.py", *ns.argv],
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1) + "\n")
    ns.out.with_suffix(".md").write_text(md)
    print(f"wrote {ns.out} and {ns.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
