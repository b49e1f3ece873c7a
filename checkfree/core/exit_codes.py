"""
Exit codes
==========

What ``checkfree`` commands and swarm peers return, as one named enum (``checkfree --help`` lists them).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Meanings in ``_MEANING`` below (shown by ``--help``)."""

    OK = 0
    CRASHED = 1
    BAD_INPUT = 2
    SWARM_STOPPED = 3
    TIMED_OUT = 4
    INCOMPLETE = 5
    LEFT = 6
    DIVERGED = 7
    INTERRUPTED = 130
    TERMINATED = 143


def describe() -> str:
    """The codes as lines for ``--help``."""
    return "\n".join(f"  {int(c):3d}  {c.name.lower().replace('_', ' ')}: {_MEANING[c]}" for c in ExitCode)


_MEANING = {
    ExitCode.OK: "the run reached num_steps",
    ExitCode.CRASHED: "an unexpected error (traceback printed)",
    ExitCode.BAD_INPUT: "a config, data or argument error, before any work started",
    ExitCode.SWARM_STOPPED: "the swarm stopped itself and said why (no spare in time, nothing to rebuild from)",
    ExitCode.TIMED_OUT: "checkfree swarm: swarm.run_timeout_s passed first",
    ExitCode.INCOMPLETE: "checkfree swarm: the peers exited before num_steps steps were committed",
    ExitCode.LEFT: "checkfree peer: it left because it holds no valid weights for the stage it was given",
    ExitCode.DIVERGED: "checkfree train: a step gave non-finite gradients optim.nonfinite_attempts times in a row",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, or SIGTERM on train/swarm) at a step boundary; the summary, weights "
    "and resume state written: the same command continues",
    ExitCode.TERMINATED: "checkfree peer: SIGTERM; it handed its stage to a spare (or saved it) and left the swarm, "
    "which goes on: not finished",
}
