"""Choosing CheckFree+'s swapped fraction from runs (issue 22 item 3): q read per seed with censored seeds as
lower bounds, the edge and middle stages' q put together, expected hours from the cost model, the fractions
compared with the reference paired by seed, and ``scripts/choose_swap_fraction.py`` run as a command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from checkfree.analysis import costmodel as cm
from checkfree.analysis.swap_tax import (
    choose_fraction,
    expected_hours,
    expected_time_rows,
    fraction_comparisons,
    q_by_seed,
    stage_q,
)

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [0, 1, 2, 3, 4]


def _q_result(q_of, stages=(0, 1, 2, 3), horizon=100, eval_every=2, method="plus", fraction=0.5, ref=None) -> dict:
    """A measure_q.py result: q_of(seed, stage) -> q, or None where the arm never reached the target; ``ref``:
    every seed's reference curve (steps after F = 300, loss)."""
    rows = []
    for seed in SEEDS:
        for stage in stages:
            q = q_of(seed, stage)
            row = {
                "seed": seed,
                "method": method,
                "stage": stage,
                "family": "swap",
                "q@50": q,
                "reached@50": q is not None,
            }
            rows.append(row)
    args = [str(ROOT / "configs/bench.yaml"), "pipeline.num_microbatches=8", f"pipeline.swap_fraction={fraction}"]
    curves = {f"{seed}/swap": ref or [(302, 2.0), (350, 1.7), (400, 1.6)] for seed in SEEDS}
    return {
        "args": args,
        "num_stages": 4,
        "fail_at": 300,
        "horizon": horizon,
        "eval_every": eval_every,
        "rows": rows,
        "reference_curves": curves,
    }


def _tax_rows(steps_of) -> list[dict]:
    """bench_swap_tax.py rows: steps_of(fraction, seed) -> swapped steps to the 90% target (plain: 200)."""
    return [
        {
            "layout": "bench",
            "fraction": f,
            "lr_scale": 1.0,
            "seed": s,
            "plain_steps@0.9": 200,
            "swap_steps@0.9": steps_of(f, s),
            "swap_reached@0.9": True,
        }
        for f in (0.5, 0.25)
        for s in SEEDS
    ]


def test_a_seed_that_never_reached_the_target_counts_at_its_least_possible_q():
    late = _q_result(lambda seed, stage: None if seed == 2 else 10.0 + seed)  # reference crossed at step 350
    q = q_by_seed(late, "plus", 0, 50)
    assert q[0] == (10.0, True)
    assert q[2] == (300 + 100 + 2 - 350, False)  # the arm needed more than F + horizon, the reference 350
    early = _q_result(lambda seed, stage: None, ref=[(302, 2.0), (320, 1.7), (350, 1.75), (400, 1.6)])
    assert q_by_seed(early, "plus", 0, 50)[2] == (300 + 100 + 2 - 320, False)  # crossed its F+50 best at 320


def test_a_missing_method_or_stage_is_named():
    with pytest.raises(ValueError, match="stage 1"):
        q_by_seed(_q_result(lambda seed, stage: 5.0, stages=(0, 3)), "plus", 1, 50)


def test_edge_stages_come_from_the_fraction_and_the_middle_from_the_shared_measurement():
    edge = _q_result(lambda seed, stage: 30.0 if stage == 0 else 40.0, stages=(0, 3))
    middle = _q_result(lambda seed, stage: 10.0 + stage)
    q = stage_q(edge, middle, 4, 50)
    assert [v for v, _ in q[0]] == [30.0, 11.0, 12.0, 40.0]


def test_expected_hours_is_the_cost_model_and_grows_with_q_and_the_tax():
    plain = expected_hours(200, 0.0, 0.0, 0.0, 4, 91.3, 30.0)
    assert plain == pytest.approx(200 * 91.3 / 3600)
    base = expected_hours(200, 0.1, 20.0, 0.10, 4, 91.3, 30.0)
    sc = cm.Scenario(200, 91.3, cm.per_step_probability(0.10, 91.3), 4, downtime_s=30.0, q=20.0, swap_tax=0.1)
    assert base == pytest.approx(cm.expected_time(sc, cm.checkfree()) / 3600)
    assert expected_hours(200, 0.1, 40.0, 0.10, 4, 91.3, 30.0) > base
    assert expected_hours(200, 0.2, 20.0, 0.10, 4, 91.3, 30.0) > base


def test_a_lower_tax_at_the_same_q_is_chosen_and_judged_faster():
    tax = _tax_rows(lambda f, s: 240 + s if f == 0.5 else 210 + s)  # 1.2x against 1.05x
    q = {f: _q_result(lambda seed, stage: 20.0 + seed, fraction=f) for f in (0.5, 0.25)}
    rows = expected_time_rows(
        tax,
        q,
        None,
        layout="bench",
        num_stages=4,
        target_frac=0.9,
        q_at=50,
        rates=[0.05, 0.10],
        iteration_s=91.3,
        downtime_s=30.0,
    )
    assert len(rows) == 2 * 2 * len(SEEDS) and not any(r["censored"] for r in rows)
    chosen, means, censored = choose_fraction(rows, 0.10)
    assert chosen == 0.25 and means[0.25] < means[0.5] and censored == []
    judged = fraction_comparisons(rows, 0.5)
    assert [(k["fraction"], k["rate"]) for k, _ in judged] == [(0.25, 0.05), (0.25, 0.10)]
    assert all(c.verdict == "faster" for _, c in judged)


def test_a_fraction_with_censored_seeds_is_flagged_and_never_chosen():
    tax = _tax_rows(lambda f, s: 240 if f == 0.5 else 200)  # 0.25 would be cheaper on its lower bounds
    q = {
        0.5: _q_result(lambda seed, stage: 20.0),
        0.25: _q_result(lambda seed, stage: None if stage == 0 else 20.0, fraction=0.25),
    }
    rows = expected_time_rows(
        tax,
        q,
        None,
        layout="bench",
        num_stages=4,
        target_frac=0.9,
        q_at=50,
        rates=[0.10],
        iteration_s=91.3,
        downtime_s=30.0,
    )
    assert all(r["censored"] == (r["fraction"] == 0.25) for r in rows)
    chosen, means, censored = choose_fraction(rows, 0.10)
    assert means[0.25] < means[0.5] and (chosen, censored) == (0.5, [0.25])


def test_the_command_writes_the_table_and_the_choice(tmp_path):
    tax = {
        "target_fracs": [0.5, 0.75, 0.9],
        "num_microbatches": 8,
        "rows": _tax_rows(lambda f, s: 240 + s if f == 0.5 else 210 + s),
    }
    (tmp_path / "tax.json").write_text(json.dumps(tax))
    for f in (0.5, 0.25):
        (tmp_path / f"q{f}.json").write_text(json.dumps(_q_result(lambda seed, stage: 20.0 + seed, fraction=f)))
    out = tmp_path / "choice.json"
    args = [
        "--tax",
        str(tmp_path / "tax.json"),
        "--q",
        f"0.5={tmp_path / 'q0.5.json'}",
        f"0.25={tmp_path / 'q0.25.json'}",
    ]
    proc = subprocess.run(
        [sys.executable, "scripts/choose_swap_fraction.py", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["chosen"] == 0.25 and len(result["comparisons"]) == 3
    assert "**swap 0.25**" in out.with_suffix(".md").read_text()


def test_a_q_argument_without_a_fraction_is_refused_by_name(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/choose_swap_fraction.py", "--tax", "x.json", "--q", "q.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "expected FRACTION=PATH" in proc.stderr


def test_a_q_file_of_another_fraction_is_refused_by_name(tmp_path):
    tax = {"target_fracs": [0.9], "num_microbatches": 8, "rows": _tax_rows(lambda f, s: 220)}
    (tmp_path / "tax.json").write_text(json.dumps(tax))
    (tmp_path / "q.json").write_text(json.dumps(_q_result(lambda seed, stage: 20.0, fraction=0.5)))
    args = ["--tax", str(tmp_path / "tax.json"), "--q", f"0.5={tmp_path / 'q.json'}", f"0.25={tmp_path / 'q.json'}"]
    proc = subprocess.run(
        [sys.executable, "scripts/choose_swap_fraction.py", *args, "--out", str(tmp_path / "c.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "measured swap fraction 0.5 with 8 microbatches; expected 0.25" in proc.stderr


def test_a_result_of_the_wrong_kind_is_named(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps(_q_result(lambda seed, stage: 20.0)))
    args = ["--tax", str(tmp_path / "q.json"), "--q", f"0.5={tmp_path / 'q.json'}"]
    proc = subprocess.run(
        [sys.executable, "scripts/choose_swap_fraction.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "has no ['target_fracs', 'num_microbatches']" in proc.stderr
