"""checkfree.analysis.sweep_tables: a convergence sweep's page shows the re-analysis's verdicts, never the
percentile rule's, and refuses a re-analysis that does not judge every comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checkfree.analysis.sweep_tables import convergence_markdown

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


@pytest.fixture(scope="module")
def sweep():
    result = json.loads((RESULTS / "convergence_slow.json").read_text())
    judged = json.loads((RESULTS / "reanalysis.json").read_text())["convergence_slow"]
    return result, judged


def _verdict_cells(page: str) -> list[str]:
    return [line.rsplit("|", 2)[1].strip() for line in page.splitlines() if line.startswith("| 33%")]


def test_every_comparison_carries_the_reanalysis_verdict(sweep):
    result, judged = sweep
    page = convergence_markdown(result, judged)
    assert "percentile bootstrap] over seeds, descriptive" in page and "Holm p" in page
    # the percentile rule called 33%/h's slow-storage ratios "checkfree_plus faster"; none survives
    assert "faster" not in page
    cells = _verdict_cells(page)
    assert "checkfree_plus higher" in cells
    assert sum(c.startswith("not resolved") for c in cells) >= 6


def test_a_stale_reanalysis_is_refused(sweep):
    result, judged = sweep
    stale = {"family": judged["family"][1:], "duplicates": judged["duplicates"]}
    with pytest.raises(ValueError, match="does not judge"):
        convergence_markdown(result, stale)


def test_a_twin_arm_says_whose_runs_it_repeats():
    result = json.loads((RESULTS / "convergence_ci.json").read_text())
    judged = json.loads((RESULTS / "reanalysis.json").read_text())["convergence_ci"]
    page = convergence_markdown(result, judged)
    assert "(the same runs as checkfree_plus; not counted in Holm)" in page


def test_a_page_says_when_its_seeds_are_too_few_for_a_headline(sweep):
    result, judged = sweep
    assert len(result["seeds"]) < 10
    assert "seeds (fewer than the 10 a headline claim needs);" in convergence_markdown(result, judged)
    ten = {**result, "seeds": list(range(10))}
    page = convergence_markdown(ten, judged)
    assert page.startswith("10 seeds; rates are") and "headline" not in page
