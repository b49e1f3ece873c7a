"""scripts/measure_q.py's reading of the curves: q to a target and the lag at the end of the horizon."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "measure_q", Path(__file__).resolve().parents[2] / "scripts" / "measure_q.py"
)
mq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mq)

REF = [(102, 2.0), (104, 1.9), (106, 1.8), (108, 1.7), (110, 1.6)]


def test_steps_to_reads_the_best_so_far_curve():
    assert mq.steps_to([(2, 1.5), (4, 1.7), (6, 1.4)], 1.5) == 2
    assert mq.steps_to([(2, 1.6), (4, 1.7), (6, 1.55)], 1.5) is None


@pytest.mark.parametrize(
    "curve, lag",
    [
        ([(102, 2.3), (104, 2.1), (106, 1.95), (108, 1.9), (110, 1.85)], 4),  # the reference was below 1.85 at 106
        ([(102, 2.0), (104, 1.9), (106, 1.8), (108, 1.7), (110, 1.6)], 0),  # the reference itself
        ([(102, 1.9), (104, 1.6), (106, 1.55), (108, 1.5), (110, 1.45)], -6),  # reached the end's 1.6 at 104
        ([(102, 2.6), (104, 2.5), (106, 2.4), (108, 2.3), (110, 2.2)], None),  # worse than the reference at 102
        ([(102, 2.6), (104, 2.3), (106, 2.1), (108, 2.05), (110, 2.0)], 8),  # where the reference was at 102
    ],
)
def test_the_lag_at_the_end_is_how_long_before_the_end_the_reference_was_where_the_arm_ends(curve, lag):
    assert mq.lag_at_end(REF, curve) == lag


def test_the_analysis_counts_arms_behind_by_more_than_the_horizon_apart():
    ns = type("NS", (), {"target_after": [4], "fail_at": 100})()
    behind = [(102, 2.6), (104, 2.5), (106, 2.4), (108, 2.3), (110, 2.2)]
    close = [(102, 2.3), (104, 2.1), (106, 1.95), (108, 1.9), (110, 1.85)]
    arm = lambda seed, curve: {"method": "weighted", "stage": 1, "family": "plain", "curve": curve, "rebuilt": []}
    results = [{"seed": s, "refs": {"plain": REF}, "arms": [arm(s, c)]} for s, c in enumerate([behind, close, close])]
    cell = mq.analyse(results, {"weighted": (False, [])}, [1], 4, ns)["table"]["weighted/1"]
    assert cell["lag_beyond_horizon"] == 1 and cell["lag_end"]["n"] == 2 and cell["lag_end"]["estimate"] == 4
    assert cell["reached@4"] == 2 and cell["q@4"]["estimate"] == 4  # 1.9 at 108 against the reference's 104
