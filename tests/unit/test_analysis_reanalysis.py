"""checkfree.analysis.reanalysis on a small made-up sweep: per-seed values read back from the rows, the twin
arm's comparisons kept out of the Holm family, old and new verdicts side by side."""

import json

from checkfree.analysis import reanalysis as ra

SEEDS = range(5)


def _rows() -> list[dict]:
    rows = []
    for seed in SEEDS:
        for strategy, it, val in (("checkfree_plus", 130 + seed, 2.2), ("hybrid", 130 + seed, 2.2), ("ckpt", 100, 2.0)):
            seconds = it * (1.1 if strategy == "hybrid" else 1.0)  # the hybrid's background writes cost time
            rows.append(
                {"rate": 0.1, "seed": seed, "strategy": strategy, "iterations@0.9": it, "seconds@0.9": seconds}
                | {"final_val": val + 0.01 * seed}
            )
    return rows


def _result() -> dict:
    old = {"estimate": 1.3, "low": 1.2, "high": 1.4, "n": 5, "level": 0.95}
    comps = [
        {"rate": 0.1, "target_frac": 0.9, "ours": o, "baseline": "ckpt", "ratio": old, "by": by}
        | {"verdict": f"{o} slower"}
        for by in ("iterations", "seconds")
        for o in ("checkfree_plus", "hybrid")
    ]
    return {"comparisons": comps, "final_val_differences": []}


def test_twins_are_arms_equal_but_for_wall_clock():
    assert ra.twins(_rows()) == {(0.1, "hybrid"): "checkfree_plus"}


def test_a_twin_arms_comparison_is_a_duplicate_except_by_seconds():
    family, duplicates = ra.convergence_family(_result(), _rows())
    assert [c.name for c in duplicates] == ["10%/h 90% target: hybrid / ckpt (iterations)"]
    assert len(family) == 3  # both by iterations/seconds for CheckFree+, the hybrid by seconds
    assert family[0].ours == [130, 131, 132, 133, 134] and family[0].theirs == [100] * 5


def test_reanalyse_writes_old_and_new_verdicts(tmp_path):
    (tmp_path / "convergence_ci.json").write_text(json.dumps(_result()))
    (tmp_path / "convergence_ci.rows.json").write_text(json.dumps(_rows()))
    out = ra.reanalyse(tmp_path)["convergence_ci"]
    first = out["family"][0]
    assert first["old_verdict"] == "checkfree_plus slower" and first["verdict"] == "checkfree_plus slower"
    assert out["duplicates"][0]["verdict"] == "= checkfree_plus slower"
    text = ra.markdown({"convergence_ci": out}, "python scripts/reanalyse.py")
    assert "0 of 3 comparisons change" in text and "## convergence_ci" in text


def test_judge_sweep_sets_verdicts_in_place_and_keeps_the_percentile_one():
    result = _result()
    comps = result["comparisons"]
    ra.judge_sweep(comps, [], _rows())
    assert comps[0]["percentile_verdict"] == "checkfree_plus slower" and comps[0]["verdict"] == "checkfree_plus slower"
    assert comps[1]["verdict"].startswith("= checkfree_plus slower (duplicate of")
    assert comps[0]["t"]["low"] > 1 and 0 <= comps[0]["p_holm"] < 0.05
