"""The swarm meets exactly the engine's failures for the same draws: each peer draws the run's failures
itself (swarm.inject=peer), keyed by the swarm's step attempts, and dies at the op where the engine's
timeline stops. Nothing is dropped or delayed by recoveries, and the rebuilt stages being the same (one
rebuild path), the swarm trains the engine's losses."""

import json
import subprocess
import sys

import pytest

from checkfree.core.failures import Failure, read_trace, write_trace
from checkfree.core.metrics import read_jsonl
from tests.helpers import TINY, check_every_step_once, run_swarm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 50
DRAWS = ["failures.mode=per_step", "failures.per_step_prob=0.025", "failures.seed=4"]


def _engine(tmp_path, *overrides):
    args = [*TINY, "num_threads=1", f"num_steps={STEPS}", *DRAWS, f"out_dir={tmp_path}", "run_name=engine", *overrides]
    out = subprocess.run(
        [sys.executable, "-m", "checkfree", "train", *args], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return tmp_path / "engine"


# the checkpoint variant (~65 s, rollbacks redone step for step) is in the long group: the default run stays
# under 15 minutes on 2 cores
@pytest.mark.parametrize("strategy", ["checkfree", pytest.param("checkpoint", marks=pytest.mark.long)])
def test_the_swarm_meets_the_engine_failures_and_trains_its_losses(tmp_path, strategy):
    extra = [f"recovery.strategy={strategy}"]
    if strategy == "checkpoint":
        extra += ["checkpoint.every_steps=5"]
    engine = _engine(tmp_path, *extra)
    want = read_trace(engine / "trace.jsonl", 4)
    assert 3 <= len(want) <= 15, want  # the draws give a handful of failures in the run
    code, out, run_dir = run_swarm(tmp_path, "swarm", f"num_steps={STEPS}", "swarm.num_spares=2", *DRAWS, *extra)
    assert code == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    engine_metrics = read_jsonl(engine / "metrics.jsonl")
    # the same steps, in the same order: a rollback redoes the engine's steps, and only those
    assert [m["step"] for m in metrics] == [m["step"] for m in engine_metrics]
    if strategy != "checkpoint":
        check_every_step_once(run_dir, STEPS)
    assert read_trace(run_dir / "trace.jsonl", 4) == want  # iteration, stage, phase and position, in order
    assert summary["failures_met"] == len(want) and summary["failures_not_injected"] == 0
    assert summary["failure_injection"] == "peer" and summary["failures_delayed"] == 0
    kills = [e for e in read_jsonl(run_dir / "launcher-events.jsonl") if e["event"] == "failure"]
    assert [(e["iteration"], e["stage"]) for e in kills] == [(f.iteration, f.stage) for f in want]
    # the same failures, the same rebuilds or rollbacks: the engine's losses, step for step
    engine_losses = [m["loss/train"] for m in engine_metrics]
    assert [m["loss/train"] for m in metrics] == pytest.approx(engine_losses, abs=5e-4)
    assert json.loads((engine / "summary.json").read_text())["failures"] == len(want)


@pytest.mark.long  # ~40 s: the hybrid's soak and unit tests cover it; keeps the default run under 15 minutes
def test_the_hybrid_swarm_rebuilds_and_rolls_back_where_the_engine_does(tmp_path):
    """recovery.strategy=hybrid across processes: an isolated loss is rebuilt (CheckFree+), stages 0 and 1 lost
    in one iteration roll every stage back to the newest checkpoint the peers wrote in the background; the
    swarm trains the engine's losses step for step, the redone steps included. Step 16's checkpoint cannot be
    written (a file sits where its directory goes): every writer says so and trains on."""
    trace = tmp_path / "trace.jsonl"
    failures = [
        Failure(5, 2, "mid_forward", 0.5),
        Failure(12, 0, "mid_backward", 0.3),
        Failure(12, 1, "before_forward", 0.0),
    ]
    write_trace(trace, failures, 4)
    extra = [
        "recovery.strategy=hybrid",
        "checkpoint.every_steps=4",
        "failures.mode=trace",
        f"failures.trace_path={trace}",
    ]
    for name in ("ck-engine", "ck-swarm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "step_00000016").write_text("not a directory")
    engine = _engine(tmp_path, "num_steps=24", *extra, f"checkpoint.dir={tmp_path / 'ck-engine'}")
    code, out, run_dir = run_swarm(
        tmp_path, "swarm", "num_steps=24", "swarm.num_spares=2", *extra, f"checkpoint.dir={tmp_path / 'ck-swarm'}"
    )
    assert code == 0, out
    events = read_jsonl(run_dir / "events.jsonl")
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert sorted(e["stage_held"] for e in failed) == [0, 1, 2, 3] and {e["step"] for e in failed} == {16}
    engine_failed = [e for e in read_jsonl(engine / "events.jsonl") if e["event"] == "checkpoint_failed"]
    assert [e["step"] for e in engine_failed] == [16]
    assert [(e["stage"], e["method"]) for e in events if e["event"] == "rebuilt"] == [(2, "weighted_average")]
    rolled = {e["to_step"] for e in events if e["event"] == "rolled_back"}
    assert rolled == {8}, rolled  # every stage back to step 8, the newest step all four wrote
    saves = [e for e in events if e["event"] == "checkpoint_save"]
    assert saves and all(e["background"] for e in saves)
    metrics, engine_metrics = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(engine / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [m["step"] for m in engine_metrics]  # steps 8..10 redone in both
    engine_losses = [m["loss/train"] for m in engine_metrics]
    assert [m["loss/train"] for m in metrics] == pytest.approx(engine_losses, abs=5e-4)


@pytest.mark.long  # ~55 s
def test_the_launcher_records_what_it_delays(tmp_path):
    """swarm.inject=launcher kills from outside when it polls: the delay of each failure and those it never
    injected are in the summary, not hidden."""
    code, out, run_dir = run_swarm(
        tmp_path,
        "outside",
        "num_steps=60",
        "swarm.num_spares=2",
        "swarm.inject=launcher",
        "swarm.min_gap_s=3",
        "failures.mode=per_step",
        "failures.per_step_prob=0.05",
        "failures.seed=2",
    )
    assert code == 0, out
    summary, _ = check_every_step_once(run_dir, 60)
    kills = [e for e in read_jsonl(run_dir / "launcher-events.jsonl") if e["event"] == "failure"]
    assert summary["failure_injection"] == "launcher" and summary["failures_met"] == len(kills) >= 1
    assert summary["failures_delayed"] == sum(1 for e in kills if e["delay_iterations"] > 0)
    # toy steps take milliseconds: with a 3 s gap after each resume most draws wait or are never injected
    assert summary["failures_delayed"] + summary["failures_not_injected"] >= 1
    assert summary["failure_delay_iterations_max"] == max(e["delay_iterations"] for e in kills)
