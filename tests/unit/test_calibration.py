"""Checkpointing at Young's or Daly's interval from measured costs (checkfree.analysis.calibration): the
medians read from a calibration run, the interval from the cost model's formulas, bad input named."""

from __future__ import annotations

import json
import math

import pytest

from checkfree.analysis import costmodel as cm
from checkfree.analysis.calibration import (
    STARTUP_S,
    Calibration,
    checkpoint_interval,
    interval_rule,
    read_calibration,
    resolve_strategy,
    sweep_cost_s,
)


def _run(tmp_path, step_s, saves):
    rows = [{"step": i, "time/step_s": s} for i, s in enumerate(step_s)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = [{"event": "checkpoint_save", "time": 0.0, "step": 2 * i, "save_s": s} for i, s in enumerate(saves)]
    events.append({"event": "checkpoint_save", "time": 0.0, "step": 99, "save_s": 50.0, "background": True})
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return tmp_path


def test_medians_leave_out_the_first_steps_and_background_saves(tmp_path):
    cal = read_calibration(_run(tmp_path, [9.0, 9.0, 0.2, 0.4, 0.3], [0.05, 0.07, 0.06]))
    assert cal == Calibration(save_s=0.06, step_s=0.3, saves=3, steps=3)


def test_a_run_without_blocking_saves_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="0 blocking saves"):
        read_calibration(_run(tmp_path, [0.1, 0.1, 0.1], []))


def test_the_interval_is_youngs_or_dalys_formula_rounded():
    cal = Calibration(save_s=0.05, step_s=0.4, saves=5, steps=10)
    lam = 4 * cm.per_step_probability(0.10, 91.3)
    assert checkpoint_interval("young", cal, 0.10, 4, 91.3) == round(math.sqrt(2 * 0.05 / (lam * 0.4)))
    assert checkpoint_interval("daly", cal, 0.10, 4, 91.3) == round(cm.daly_interval_steps(0.05, 0.4, lam))
    slow = Calibration(save_s=1.34, step_s=0.4, saves=5, steps=10)  # 6.7 MB at 5 MB/s
    assert checkpoint_interval("young", slow, 0.10, 4, 91.3) > checkpoint_interval("young", cal, 0.10, 4, 91.3)
    assert checkpoint_interval("young", Calibration(1e-9, 10.0, 1, 1), 0.33, 4, 91.3) == 1  # at least one step


def test_an_unknown_rule_or_a_rate_without_failures_is_named():
    cal = Calibration(0.05, 0.4, 5, 10)
    with pytest.raises(ValueError, match="'yung'"):
        checkpoint_interval("yung", cal, 0.1, 4, 91.3)
    with pytest.raises(ValueError, match="hourly_rate=0"):
        checkpoint_interval("young", cal, 0.0, 4, 91.3)


@pytest.mark.parametrize(
    ("strategy", "rule"),
    [("checkpoint:young", "young"), ("checkpoint:daly", "daly"), ("checkpoint:5", None), ("checkfree_plus", None)],
)
def test_the_interval_rule_is_read_from_the_strategy(strategy, rule):
    assert interval_rule(strategy) == rule


@pytest.mark.parametrize("strategy", ["hybrid:young", "hybrid:daly"])
def test_a_hybrid_at_youngs_or_dalys_interval_is_refused_with_the_reason(strategy):
    with pytest.raises(ValueError, match=r"background.*give its interval in steps \(hybrid:K\)"):
        interval_rule(strategy)


def test_checkpoint_young_resolves_to_the_interval_at_each_rate_and_the_rest_stay_as_they_are():
    cal = Calibration(save_s=0.2, step_s=0.9, saves=7, steps=10)
    low, high = (resolve_strategy("checkpoint:young", cal, rate, 4, 91.3) for rate in (0.05, 0.16))
    assert low == f"checkpoint:{checkpoint_interval('young', cal, 0.05, 4, 91.3)}"
    assert int(low.split(":")[1]) > int(high.split(":")[1]) >= 1  # more failures, shorter interval
    assert resolve_strategy("checkfree_plus", None, 0.1, 4, 91.3) == "checkfree_plus"
    assert resolve_strategy("checkpoint:7", None, 0.1, 4, 91.3) == "checkpoint:7"


def test_the_sweep_cost_is_runs_times_steps_at_the_calibrated_step_plus_start_up():
    cal = Calibration(save_s=0.2, step_s=0.5, saves=7, steps=10)
    assert sweep_cost_s(3, 100, cal) == pytest.approx(3 * (100 * 0.5 + STARTUP_S))
    assert sweep_cost_s(0, 100, cal) == 0
