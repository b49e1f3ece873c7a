"""The one rule both executors follow for the run directory they are given (``checkfree.core.run_dir``)."""

import pytest

from checkfree.core.run_dir import FRESH, REFUSE, RESUME, RunDirState, inside, plan_run_dir


def _state(holds=False, outside=False, steps=(), stray=()):
    where = "s3://b/r" if outside else "runs/r/checkpoints"
    return RunDirState("runs/r", where, holds, outside, tuple(steps), tuple(stray))


@pytest.mark.parametrize(
    "state, resume, overwrite, want",
    [
        (_state(), "auto", False, (FRESH, None, False, False)),
        (_state(holds=True, steps=[5, 10]), "auto", False, (RESUME, 10, False, False)),
        (_state(outside=True, steps=[10]), "auto", False, (RESUME, 10, False, False)),  # a new machine
        (_state(holds=True), "auto", False, (REFUSE, None, False, False)),
        (_state(holds=True, steps=[20]), "auto", False, (REFUSE, None, False, False)),  # reached num_steps
        (_state(holds=True, steps=[10]), "never", False, (REFUSE, None, False, False)),
        (_state(outside=True, steps=[10]), "never", False, (REFUSE, None, False, False)),
        (_state(outside=True), "never", False, (FRESH, None, False, False)),
        (_state(holds=True, steps=[10]), "auto", True, (FRESH, None, True, False)),
        (_state(holds=True, outside=True, steps=[10]), "never", True, (FRESH, None, True, True)),
        (_state(outside=True, steps=[10]), "auto", True, (FRESH, None, False, True)),
        # files without a resume state (a killed or older run) in a checkpoint.dir outside: never mixed in
        (_state(outside=True, stray=[6]), "auto", False, (REFUSE, None, False, False)),
        (_state(outside=True, stray=[6]), "never", False, (REFUSE, None, False, False)),
        (_state(outside=True, stray=[6]), "auto", True, (FRESH, None, False, True)),
        (_state(holds=True, steps=[4], stray=[6]), "auto", False, (RESUME, 4, False, False)),
    ],
)
def test_plan(state, resume, overwrite, want):
    plan = plan_run_dir(state, resume, overwrite, num_steps=20)
    assert (plan.action, plan.step, plan.delete_run_dir, plan.clear_store) == want
    if plan.action == REFUSE:
        assert "overwrite=true" in plan.message or "resume=auto" in plan.message  # always says what to do


def test_overwrite_names_everything_it_deletes():
    plan = plan_run_dir(_state(holds=True, outside=True, steps=[4, 8]), "auto", True, 20)
    assert plan.message == "overwrite=true: deleting the run directory runs/r and the saved steps [4, 8] in s3://b/r"


def test_inside():
    assert inside("runs/r/checkpoints", "runs/r") and not inside("s3://b/r", "runs/r")
    assert not inside("/elsewhere", "runs/r") and inside("file://runs/r/x", "runs/r")
