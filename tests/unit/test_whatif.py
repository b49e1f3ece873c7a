"""checkfree.analysis.null_predictor and .table2: the null predictor beside the cost model, its verdict and
noise ranges; the redundant-computation policy; the paper-scale prediction beside the paper's Table 2; and
the script's ``null`` and ``paper-table2`` subcommands on the recorded results."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from checkfree.analysis import costmodel as cm
from checkfree.analysis import null_predictor as nullp
from checkfree.analysis import table2

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"


def _pairs(measured, model, null):
    return [
        {"pair": f"r0.1-s{i}", "rate": 0.1, "measured_ratio": m, "predicted_ratio": p, "null_ratio": n}
        for i, (m, p, n) in enumerate(zip(measured, model, null))
    ]


def test_a_model_that_is_closer_beats_the_null_predictor():
    measured = [0.6, 0.8, 1.2, 1.5, 0.7, 1.3]
    model = [m * f for m, f in zip(measured, (1.01, 0.99, 1.02, 0.98, 1.01, 0.99))]
    null = [m * f for m, f in zip(measured, (1.5, 0.6, 1.4, 0.7, 1.6, 0.65))]
    out = nullp.judge_against_null(_pairs(measured, model, null))
    assert out["model"]["winners_agree"] == 6 and out["null"]["winners_agree"] < 6
    assert out["model"]["error_factor"] < out["null"]["error_factor"]
    assert out["log_error_difference"]["high"] < 0 and out["verdict"].startswith("The model beats")


def test_a_model_no_closer_than_the_null_does_not_beat_it_and_ranges_carry_the_noise():
    measured = [0.6, 0.8, 1.2, 1.5, 0.7, 1.3]
    same = [m * f for m, f in zip(measured, (1.2, 0.85, 1.1, 0.9, 1.15, 0.8))]
    out = nullp.judge_against_null(_pairs(measured, same, same))
    assert out["verdict"].startswith("The model does not beat") and "includes 0" in out["verdict"]
    # leave-one-out ranges from the other pairs' errors: wide enough for these errors, the same for both
    assert out["model"]["inside"] == out["null"]["inside"] == 6
    row = out["pairs"][0]["model"]
    assert row["range"][0] < row["ratio"] < row["range"][1]
    (noise,) = out["noise_by_rate"]
    assert noise["n"] == 6 and noise["low"] < noise["geometric_mean"] < noise["high"]


def test_recorded_null_pairs_use_each_runs_seconds_per_iteration_and_the_tax():
    validation = {
        "validate_sweep": {
            "baseline": "checkpoint:5",
            "ours": "checkfree_plus",
            "swap_tax": 0.25,
            "pairs": [{"pair": "r0.1-s3", "measured_ratio": 1.1, "predicted_ratio": 1.2}],
        }
    }
    rows = [
        {"strategy": "checkpoint:5", "rate": 0.1, "seed": 3, "train_s": 200.0, "iterations": 100},
        {"strategy": "checkfree_plus", "rate": 0.1, "seed": 3, "train_s": 90.0, "iterations": 100},
    ]
    (pair,) = nullp.recorded_null_pairs(validation, rows)
    assert pair["null_ratio"] == pytest.approx(0.9 * 1.25 / 2.0) and pair["seed"] == 3
    with pytest.raises(ValueError, match="no row for checkfree_plus"):
        nullp.recorded_null_pairs(validation, rows[:1])


def test_redundant_computation_pays_no_q_and_no_tax():
    sc = cm.Scenario(300, 1.5, 0.01, 4, save_s=3.0, restore_s=2.0, downtime_s=5.0, q=4.0, swap_tax=0.2)
    plain = cm.Scenario(**{**sc.__dict__, "q": 0.0, "swap_tax": 0.0})
    assert cm.expected_time(sc, cm.redundant()) == pytest.approx(cm.expected_time(plain, cm.checkfree()))
    assert cm.expected_time(sc, cm.redundant()) < cm.expected_time(sc, cm.checkfree())
    times = cm.simulate(sc, cm.redundant(), runs=1000, seed=2)
    sem = times.std(ddof=1) / math.sqrt(times.size)
    assert abs(times.mean() - cm.expected_time(sc, cm.redundant())) <= 4 * sem


def test_the_paper_table_reproduces_the_earlier_map_and_what_the_paper_implies():
    fit = {"q": {"estimate": 5.0}, "tau": {"estimate": 8.0}, "q_full_step": 300.0}
    result = table2.paper_table2(fit, {"fit": 0.2, "small": 0.05})["paper_table2"]
    assert result["steps"] == pytest.approx(10_004, abs=1)
    rows = {(x["rate"], x["strategy"]): x for x in result["rows"]}
    # the earlier map's constant q = 40: 736 h at 10%/h, never at 16%/h (the numbers)
    assert rows[0.1, "checkfree"]["variants"]["q = 40, no tax, no overlap"] == pytest.approx(736.0, abs=1)
    assert math.isinf(rows[0.16, "checkfree"]["variants"]["q = 40, no tax, no overlap"])
    assert rows[0.05, "redundant"]["ratio"] == pytest.approx(1.0, abs=0.03)
    for rate in table2.PAPER_TABLE2_H:
        x = rows[rate, "checkfree"]
        base = cm.Scenario(
            result["steps"], 91.3, cm.per_step_probability(rate, 91.3), 6, 6.0, 6.0, 30.0, q=x["implied_q"]
        )
        assert cm.expected_time(base, cm.checkfree()) / 3600 == pytest.approx(x["paper_h"], rel=1e-3)
        plus = rows[rate, "checkfree_plus"]
        assert plus["variants"]["fitted, tax fit"] > plus["variants"]["fitted, tax small"]  # the tax costs
    assert [w["rate"] for w in result["winners"]] == [0.05, 0.1, 0.16]
    text = table2.paper_markdown({"paper_table2": result})
    assert "Discrepancies" in text and "the paper's fastest is redundant" in text


def _script(tmp_path, *args) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "whatif.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_null_and_paper_subcommands_on_the_recorded_results(tmp_path):
    sweep = ["local", str(RESULTS / "whatif_validation_local_overlap.json"), str(RESULTS / "convergence_ci.rows.json")]
    null = _script(tmp_path, "null", "--sweep", *sweep)["null"]["local"]
    recorded = json.loads((RESULTS / "convergence_ci.json").read_text())  # a pair per seed and rate
    assert null["model"]["pairs"] == len(recorded["seeds"]) * len(recorded["rates"])
    assert "null predictor" in null["verdict"]
    assert (tmp_path / "out.md").read_text().startswith("### local")
    paper = _script(tmp_path, "paper-table2", "--overlap-fit", str(RESULTS / "whatif_overlap_fit.json"))
    assert len(paper["paper_table2"]["rows"]) == 12 and "Table 2" not in paper["args"]
    assert "model / paper" in (tmp_path / "out.md").read_text()


@pytest.mark.parametrize(
    "argv, said",
    [
        (["null", "--sweep", "x", "/nonexistent/v.json", "/nonexistent/r.json"], "No such file"),
        (
            [
                "paper-table2",
                "--overlap-fit",
                "docs/results/whatif_overlap_fit.json",
                "--swap-tax-json",
                "a",
                "docs/results/q_bench.json",
            ],
            "has no 'comparisons'",
        ),
    ],
)
def test_a_missing_or_wrong_input_file_is_named_not_a_traceback(tmp_path, argv, said):
    proc = subprocess.run(
        [sys.executable, "scripts/whatif.py", *argv, "--out", str(tmp_path / "o.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and said in proc.stderr and "Traceback" not in proc.stderr
