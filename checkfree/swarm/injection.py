"""
Failures a peer injects into itself
===================================

With ``swarm.inject=peer`` (the default) every stage peer draws the run's failures itself, by the same
seeded draws as the engine (``core.failures``: one draw per iteration and stage, so any peer can draw any
iteration, lazily, for as long as the run takes) and dies at its own: before the op of its stage at which
the engine's timeline would have stopped (``schedule.failure_op``). Iterations are the swarm's step
attempts, carried across epochs by ``EpochRecord.iteration``. So the swarm meets the engine's failures for
the same trace: none is dropped or delayed, whatever recovery takes (the launcher's injection from outside,
``swarm.inject=launcher``, can only kill peers when it polls and after ``swarm.min_gap_s``: it records each
failure's delay instead).

Known limit: the leader counts a broken epoch's attempts from the steps its survivors committed. When every
stage is lost at once nobody survives to say how far the epoch got, so counting resumes from the epoch's
start and the failures drawn for those iterations are met again (the engine would go on to later ones); a
run then meets more failures than the engine's. ``swarm.inject=launcher`` has no such limit (and the
delays described above).

Before it dies the peer writes ``failure.json`` into its directory, for the launcher, which logs the failure
and brings a new machine as it does for a kill of its own. How the peer goes is drawn from the same seed:
killed (SIGKILL), frozen (SIGSTOP, share ``swarm.hang_fraction``) or, on emulated hosts, frozen while the
launcher cuts its host's link (share ``swarm.vanish_fraction``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from checkfree.core.failures import Failure, FailureConfig, FailureInjector
from checkfree.core.schedule import Schedule, failure_op
from checkfree.core.seeding import hash_seed

MARKER = "failure.json"
NOT_DETERMINISTIC = (
    "swarm.inject=peer needs the same failure draws on every peer, but failures.mode=hourly with "
    "failures.iteration_time_s=null uses each peer's measured iteration time; set failures.iteration_time_s "
    "(the paper's is 91.3 s) or swarm.inject=launcher"
)
LINK_DOWN = "LINK_DOWN"


def deterministic(cfg: FailureConfig) -> bool:
    """Whether every peer draws the same failures: not when the hourly rate is turned into a per-iteration
    probability by each peer's own measured iteration time."""
    return not (cfg.mode == "hourly" and cfg.iteration_time_s is None)


def how_it_fails(cfg: FailureConfig, failure: Failure, hang_fraction: float, vanish_fraction: float) -> str:
    """SIGKILL, SIGSTOP or LINK_DOWN, drawn from the failure's own seed."""
    u = float(np.random.default_rng(hash_seed(cfg.seed, failure.iteration, failure.stage, 7)).random())
    if u < hang_fraction:
        return signal.SIGSTOP.name
    if u < hang_fraction + vanish_fraction:
        return LINK_DOWN
    return signal.SIGKILL.name


class OwnFailures:
    """Called before each step attempt (``TrainingLoop``): this peer's failure in that attempt, if any."""

    def __init__(
        self,
        cfg: FailureConfig,
        schedule: Schedule,
        peer_dir: Path,
        hang_fraction: float = 0.0,
        vanish_fraction: float = 0.0,
        die: Callable[[str], None] | None = None,
    ):
        if not deterministic(cfg):
            raise ValueError(NOT_DETERMINISTIC)
        self.cfg, self.schedule, self.dir = cfg, schedule, Path(peer_dir)
        self.hang_fraction, self.vanish_fraction = hang_fraction, vanish_fraction
        self.injector = FailureInjector(cfg, schedule.num_stages)
        self.drawn = -1  # the last iteration drawn: every iteration is drawn once, in order (max_failures counts)
        self.fired: dict[int, list[Failure]] = {}
        self.die = die or _die

    def failure_at(self, iteration: int, stage: int) -> Failure | None:
        while self.drawn < iteration:
            self.drawn += 1
            found = self.injector.failures_at(self.drawn)
            if found:
                self.fired[self.drawn] = found
        return next((f for f in self.fired.get(iteration, []) if f.stage == stage), None)

    def __call__(self, iteration: int, stage: int, step: int) -> tuple[int, Callable[[], None]] | None:
        failure = self.failure_at(iteration, stage)
        if failure is None:
            return None
        op = failure_op(self.schedule, stage, failure.phase, failure.at)
        index = 0 if op is None else self.schedule.ops[stage].index(op)
        how = how_it_fails(self.cfg, failure, self.hang_fraction, self.vanish_fraction)

        def fail() -> None:
            record = {"stage": stage, "step": step, "iteration": iteration, "phase": failure.phase, "at": failure.at}
            record["time"] = time.time()  # when it died: the launcher logs the failure at this time, not when it looks
            tmp = self.dir / (MARKER + ".tmp")
            tmp.write_text(json.dumps({**record, "signal": how, "op_index": index}) + "\n")
            tmp.replace(self.dir / MARKER)
            self.die(how)

        return index, fail


def _die(how: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL if how == signal.SIGKILL.name else signal.SIGSTOP)
    # SIGSTOP: frozen until the launcher ends this process once the swarm replaced it


def read_marker(peer_dir: Path) -> dict | None:
    """The failure a peer injected into itself, once it wrote it (None before)."""
    path = Path(peer_dir) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
