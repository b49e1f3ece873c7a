"""
Run directories
===============

What ``checkfree train`` and ``checkfree swarm`` do with the run directory and checkpoint store they are
given, as one pure rule (``plan_run_dir``) that both executors follow:

- ``overwrite=true`` starts afresh: the run directory is deleted, and so are the saved steps of a
  ``checkpoint.dir`` outside it (they would otherwise pass for the new run's); the plan names what goes.
- ``resume=auto`` (the default) continues from the newest saved step, in the run directory's checkpoints or
  in ``checkpoint.dir`` (a new machine with the old run's bucket), unless that step already reached
  ``num_steps`` (raise it to train on). A run directory that holds a run but no saved step is refused.
- ``resume=never`` refuses a run directory that holds a run, and a ``checkpoint.dir`` that holds saved steps.
"""

from __future__ import annotations

from dataclasses import dataclass

FRESH, RESUME, REFUSE = "fresh", "resume", "refuse"


@dataclass(frozen=True)
class RunDirPlan:
    action: str  # FRESH, RESUME or REFUSE
    step: int | None = None  # RESUME: the saved step to continue from
    delete_run_dir: bool = False  # FRESH: delete the run directory first
    clear_store: bool = False  # FRESH: delete the saved steps of a checkpoint.dir outside the run directory
    message: str = ""  # REFUSE: why, and what to do; otherwise what is deleted or resumed, for the user


@dataclass(frozen=True)
class RunDirState:
    """What is there: read by the caller from the disk and the store."""

    run_dir: str
    store: str  # where the saved steps are (checkpoint.dir, or RUN_DIR/checkpoints)
    holds_run: bool  # the run directory exists and is not empty
    store_outside: bool  # the store is not inside the run directory
    saved_steps: tuple[int, ...] = ()  # steps with everything a resume needs, oldest first
    stray_steps: tuple[int, ...] = ()  # steps with files but not all a resume needs (a killed or older run's)


def plan_run_dir(state: RunDirState, resume: str, overwrite: bool, num_steps: int) -> RunDirPlan:
    """The rule of the module docstring."""
    newest = state.saved_steps[-1] if state.saved_steps else None
    steps = sorted(state.saved_steps + state.stray_steps)
    stray_outside = state.store_outside and bool(state.stray_steps)
    if overwrite:
        clear = state.store_outside and bool(steps)
        gone = [f"the run directory {state.run_dir}"] if state.holds_run else []
        if clear or (steps and state.holds_run):
            gone.append(f"the saved steps {steps} in {state.store}")
        return RunDirPlan(
            FRESH,
            delete_run_dir=state.holds_run,
            clear_store=clear,
            message=f"overwrite=true: deleting {' and '.join(gone)}" if gone else "",
        )
    if resume == "never":
        if state.holds_run:
            return RunDirPlan(
                REFUSE,
                message=f"run directory {state.run_dir} already holds a run and resume=never; pass overwrite=true "
                "to start afresh (deletes it and its checkpoints) or another run_name",
            )
        if state.saved_steps or stray_outside:
            return RunDirPlan(
                REFUSE,
                message=f"{state.store} holds the saved steps {steps} of an earlier run; with "
                "resume=never a new run would take them for its own: resume=auto goes on from them, overwrite=true "
                "deletes them, or choose another checkpoint.dir",
            )
        return RunDirPlan(FRESH)
    if newest is not None and newest >= num_steps:
        return RunDirPlan(
            REFUSE,
            message=f"the run saved in {state.store} already reached step {newest} (num_steps={num_steps}): raise "
            "num_steps to train on, or pass overwrite=true to start afresh or another run_name",
        )
    if newest is not None:
        return RunDirPlan(RESUME, step=newest, message=f"resuming from step {newest} saved in {state.store}")
    if stray_outside:
        return RunDirPlan(
            REFUSE,
            message=f"{state.store} holds files of steps {list(state.stray_steps)} without what a resume needs (a "
            "killed or older run's); a new run would roll back into them: overwrite=true deletes them, or choose "
            "another checkpoint.dir",
        )
    if state.holds_run:
        return RunDirPlan(
            REFUSE,
            message=f"run directory {state.run_dir} already holds a run and no saved state to resume from in "
            f"{state.store} (set checkpoint.every_steps to save it periodically; Ctrl-C and SIGTERM always save "
            "it); pass overwrite=true to start afresh (deletes that directory) or another run_name",
        )
    return RunDirPlan(FRESH)


def inside(store: str, run_dir: str) -> bool:
    """Whether the store ``store`` (a path or a URL) lies inside ``run_dir`` (deleted with it)."""
    from pathlib import Path

    if "://" in store and not store.startswith("file://"):
        return False
    return Path(store.removeprefix("file://")).resolve().is_relative_to(Path(run_dir).resolve())
