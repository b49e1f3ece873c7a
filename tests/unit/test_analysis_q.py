"""checkfree.analysis.q: q to a target, the lag at the end of the horizon, the per-seed rows and their table."""

import json

import pytest

from checkfree.analysis import q

REF = [(102, 2.0), (104, 1.9), (106, 1.8), (108, 1.7), (110, 1.6)]
BEHIND = [(102, 2.6), (104, 2.5), (106, 2.4), (108, 2.3), (110, 2.2)]
CLOSE = [(102, 2.3), (104, 2.1), (106, 1.95), (108, 1.9), (110, 1.85)]


@pytest.mark.parametrize(
    "curve, lag",
    [
        (CLOSE, 4),  # the reference was below 1.85 at 106
        (REF, 0),  # the reference itself
        ([(102, 1.9), (104, 1.6), (106, 1.55), (108, 1.5), (110, 1.45)], -6),  # reached the end's 1.6 at 104
        (BEHIND, None),  # worse than the reference at 102
        ([(102, 2.6), (104, 2.3), (106, 2.1), (108, 2.05), (110, 2.0)], 8),  # where the reference was at 102
    ],
)
def test_the_lag_at_the_end_is_how_long_before_the_end_the_reference_was_where_the_arm_ends(curve, lag):
    assert q.lag_at_end(REF, curve) == lag


def _results(curves):
    arm = lambda curve: {"method": "weighted", "stage": 1, "family": "plain", "curve": curve, "rebuilt": []}
    return [{"seed": s, "refs": {"plain": REF}, "arms": [arm(c)]} for s, c in enumerate(curves)]


def test_the_analysis_counts_arms_behind_by_more_than_the_horizon_apart():
    analysis = q.analyse(_results([BEHIND, CLOSE, CLOSE]), ["weighted"], [1], 4, fail_at=100, target_after=[4])
    cell = analysis["table"]["weighted/1"]
    assert cell["lag_beyond_horizon"] == 1 and cell["lag_end"]["n"] == 2 and cell["lag_end"]["estimate"] == 4
    assert cell["reached@4"] == 2 and cell["q@4"]["estimate"] == 4  # 1.9 at 108 against the reference's 104
    assert [r["q@4"] for r in analysis["rows"]] == [None, 4, 4]  # not reached is kept, as None


def test_the_table_is_recomputed_from_the_saved_rows():
    analysis = q.analyse(_results([BEHIND, CLOSE, CLOSE]), ["weighted"], [1], 4, fail_at=100, target_after=[4])
    rows = json.loads(json.dumps(analysis["rows"]))  # as the result file keeps them
    table = q.summarise(rows, ["weighted"], [1], 4, [4])
    assert json.dumps(table) == json.dumps(analysis["table"])  # as text: an interval over no seeds is NaN
    again = q.markdown({"table": table}, ["weighted"], [1], [4], "h")
    assert again == q.markdown(analysis, ["weighted"], [1], [4], "h")
    assert "| weighted | partner(1) |" in again.replace("  ", " ")


@pytest.mark.parametrize("stage, label", [(0, "first"), (1, "partner(1)"), (3, "middle(3)"), (5, "partner(5)")])
def test_stage_labels(stage, label):
    assert q.stage_label(stage, 7) == label


def test_methods_are_built_ins_or_ablations_of_one():
    got = q.parse_methods(["weighted", "warmup=weighted+recovery.warmup_steps=20"])
    assert got["warmup"] == (False, ["recovery.strategy=checkfree", "recovery.warmup_steps=20"])
    with pytest.raises(ValueError, match="neither one of"):
        q.parse_methods(["bogus"])
    with pytest.raises(ValueError, match="fixed by the reference run"):
        q.parse_methods(["x=weighted+recovery.norm_scope=stage"])


def test_finished_runs_are_read_back_from_disk(tmp_path):
    def run(d, curve, rebuilt=()):
        d.mkdir(parents=True)
        rows = [{"step": s - 1, "iteration": s - 1, "loss/val": v, "time/train_s": 0.1 * s} for s, v in curve]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        events = [{"event": "rebuilt", "method": "weighted", "sources": [0, 2], "extra": 1}, *rebuilt]
        (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    run(tmp_path / "s0" / "ref-plain", [(100, 2.1), *REF])
    run(tmp_path / "s0" / "weighted-stage1", CLOSE)
    run(tmp_path / "s0" / "weighted-stage2", CLOSE[:3])  # interrupted: not to the end of the horizon
    got = q.from_disk(tmp_path, [0, 1], {"weighted": (False, [])}, [1, 2], fail_at=100, horizon=10)
    assert [r["seed"] for r in got] == [0] and got[0]["refs"]["plain"] == REF  # steps after F only
    (arm,) = got[0]["arms"]
    assert arm["stage"] == 1 and arm["curve"] == CLOSE
    assert arm["rebuilt"] == [{"method": "weighted", "sources": [0, 2], "weights": None, "path": None, "edge": None}]
