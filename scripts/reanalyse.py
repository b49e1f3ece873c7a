"""Re-analyse the per-seed result files in docs/results with intervals that hold (issue 22): t intervals on
log ratios checked by a BCa bootstrap, Holm's correction per sweep; the old verdict beside the new one.
Writes reanalysis.json and reanalysis.md, and rewrites each convergence sweep's page (``<sweep>.md``) with
the verdicts that hold. Runs nothing: it reads the result files only.

    python scripts/reanalyse.py [--results docs/results] [--out docs/results/reanalysis.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from checkfree.analysis.reanalysis import changed, markdown, reanalyse
from checkfree.analysis.sweep_tables import write_pages


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="docs/results", help="folder of the sweeps' .json and .rows.json files")
    ap.add_argument("--out", default="docs/results/reanalysis.json", help="JSON out; the markdown goes beside it")
    ns = ap.parse_args(argv)
    result = reanalyse(ns.results)
    out = Path(ns.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    command = "python scripts/reanalyse.py" + ("" if ns.results == "docs/results" else f" --results {ns.results}")
    out.with_suffix(".md").write_text(markdown(result, command))
    pages = write_pages(ns.results, result)
    for sweep, c in changed(result):
        print(f"{sweep}: {c['name']}: {c['old_verdict']} -> {c['verdict']}")
    print(f"wrote {out}, {out.with_suffix('.md')} and {', '.join(map(str, pages))}")


if __name__ == "__main__":
    main()
