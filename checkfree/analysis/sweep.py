"""
Sweep runner
============

Runs a list of named trainings, each ``python -m checkfree train FILES... OVERRIDES... run_name=NAME
out_dir=OUT`` in a subprocess of its own, at most ``jobs`` at once, each on one torch thread. A sweep can be
run in parts: a run whose directory already holds the summary of a finished run (not stopped, every step
committed, this version of checkfree) trained with the same resolved config is skipped; any other run starts
afresh (``overwrite=true``), so a changed config, or a run that was interrupted, is trained again.

Every subprocess has a deadline and is ended by its PID (SIGTERM, then SIGKILL after a grace period) when it
passes it, and when the sweep itself is interrupted (Ctrl-C or SIGTERM): no training outlives its sweep. Each
run's stdout and stderr go to ``OUT/NAME.log`` (beside the run directory: ``overwrite=true`` deletes the run
directory when the training starts). A failed run does not stop the others; ``run_sweep`` raises
``SweepError`` at the end, naming each failed run and its log.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from checkfree import __version__
from checkfree.config import load_config, to_yaml

logger = logging.getLogger(__name__)

GRACE_S = 15.0  # SIGTERM lets the trainer stop at a step boundary and save; past this it is killed
POLL_S = 0.2  # how often running subprocesses are checked (a run takes seconds to hours)


@dataclass(frozen=True)
class RunSpec:
    """One training of a sweep: its name (the run directory's, so a plain folder name), its config files
    and its ``key=value`` overrides."""

    name: str
    files: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What became of one run: ``skipped`` (already finished with this config), ``finished``, ``failed``
    (non-zero exit, or an exit without a finished summary), ``timed out`` or ``interrupted``."""

    name: str
    status: str
    run_dir: Path
    log: Path | None = None  # None: skipped, nothing was run
    returncode: int | None = None
    wall_s: float | None = None  # wall-clock seconds of the subprocess


class SweepError(RuntimeError):
    """Some runs of a sweep did not finish; the others did (or were skipped)."""

    def __init__(self, outcomes: Sequence[Outcome]):
        self.failed = [o for o in outcomes if o.status not in ("skipped", "finished")]
        lines = [f"{o.name}: {o.status} (exit {o.returncode}); log {o.log}" for o in self.failed]
        super().__init__(f"{len(self.failed)} of {len(outcomes)} runs did not finish:\n  " + "\n  ".join(lines))


def train_args(spec: RunSpec, out_dir: str | Path) -> list[str]:
    """The overrides a run is trained with: its own, then what the sweep fixes (after them, so they win)."""
    return [
        *spec.overrides,
        f"run_name={spec.name}",
        f"out_dir={Path(out_dir)}",  # one spelling ("./runs/" and "runs" alike), so a resume finds its runs
        "num_threads=1",
        "progress=false",
        "plot=false",
        "overwrite=true",
    ]


def command(spec: RunSpec, out_dir: str | Path, python: str = sys.executable) -> list[str]:
    """The argument list that trains ``spec`` (no shell)."""
    return [python, "-m", "checkfree", "train", *spec.files, *train_args(spec, out_dir)]


def is_done(spec: RunSpec, out_dir: str | Path) -> bool:
    """Whether ``OUT/NAME`` holds a finished run of exactly this config: a summary that is not a stop, with
    every step committed, by this version of checkfree (another may draw other data or weights), and a
    ``config.yaml`` equal to the config the run would be trained with now.

    Raises:
        checkfree.config.ConfigError: the spec's config does not load.
    """
    cfg = load_config(list(spec.files), train_args(spec, out_dir))  # first: a bad config is an error, not "not done"
    run_dir = Path(out_dir) / spec.name
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        return False
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    finished = summary.get("stopped") is None and summary.get("steps") == cfg.num_steps
    return finished and summary.get("checkfree_version") == __version__ and config_path.read_text() == to_yaml(cfg)


def _check_names(specs: Sequence[RunSpec]) -> None:
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"run names must be unique in a sweep, repeated: {dup}")
    bad = [n for n in names if not n or n in (".", "..") or "/" in n or "\\" in n]
    if bad:
        raise ValueError(f"run names must be plain folder names, got {bad}")


@dataclass
class _Running:
    spec: RunSpec
    proc: subprocess.Popen
    log: Path
    log_file: object
    started: float
    deadline: float


def _start(spec: RunSpec, out_dir: Path, python: str, timeout_s: float) -> _Running:
    log = out_dir / f"{spec.name}.log"
    log_file = open(log, "w")  # closed when the run ends (_finish)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the child's thread pools, as num_threads=1 sets torch's
    try:  # a session of its own: a terminal's Ctrl-C reaches the sweep only, which ends each run by its PID
        proc = subprocess.Popen(
            command(spec, out_dir, python),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except OSError:
        log_file.close()
        raise
    now = time.monotonic()
    logger.info("started %s (pid %d), log %s", spec.name, proc.pid, log)
    return _Running(spec, proc, log, log_file, now, now + timeout_s)


def _end(runs: Sequence[_Running], grace_s: float) -> None:
    """SIGTERM each run's process by its PID, give them ``grace_s`` together, then SIGKILL those still alive;
    every one is reaped."""
    for r in runs:
        if r.proc.poll() is None:
            r.proc.terminate()
    deadline = time.monotonic() + grace_s
    for r in runs:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def _finish(r: _Running, out_dir: Path, status: str | None = None) -> Outcome:
    r.log_file.close()
    code = r.proc.returncode
    if status is None:
        status = "finished" if code == 0 and is_done(r.spec, out_dir) else "failed"
    outcome = Outcome(r.spec.name, status, out_dir / r.spec.name, r.log, code, time.monotonic() - r.started)
    (logger.info if status == "finished" else logger.error)(
        "%s %s in %.1f s (exit %s), log %s", r.spec.name, status, outcome.wall_s, code, r.log
    )
    return outcome


def _collect(running: list[_Running], out_dir: Path, grace_s: float) -> list[Outcome]:
    """The outcomes of the runs that exited or passed their deadline (ended now), removed from ``running``."""
    done = []
    for r in list(running):
        status = None
        if r.proc.poll() is None:
            if time.monotonic() < r.deadline:
                continue
            _end([r], grace_s)
            status = "timed out"
        running.remove(r)
        done.append(_finish(r, out_dir, status))
    return done


class _TermAsInterrupt:
    """SIGTERM raises KeyboardInterrupt while a sweep runs (main thread only), so both end the runs."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def run_sweep(
    specs: Sequence[RunSpec],
    out_dir: str | Path,
    jobs: int = 1,
    timeout_s: float = 3600.0,
    python: str = sys.executable,
    grace_s: float = GRACE_S,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Train every run of ``specs`` that is not already done, ``jobs`` at a time, in the order given.

    Args:
        out_dir: the folder of the run directories (``OUT/NAME``) and logs (``OUT/NAME.log``); each run's
            config keeps it as given (normalised, not made absolute), so resume a sweep from the same folder.
        timeout_s: deadline of each run from its start; a run past it is ended by its PID.
        on_outcome: called with each outcome as it is known (skips first), e.g. to print progress.

    Returns:
        One outcome per spec, in the order of ``specs``.

    Raises:
        ValueError: names repeated or not plain folder names, or ``jobs`` < 1.
        checkfree.config.ConfigError: a spec whose config does not load (before anything runs).
        SweepError: some runs failed or timed out (after every other run finished).
        KeyboardInterrupt: Ctrl-C or SIGTERM; every running subprocess was ended first.
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be >= 1")
    _check_names(specs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, Outcome] = {}
    todo = []
    for spec in specs:  # loads every config first: a typo fails the sweep before any run starts
        if is_done(spec, out):
            outcomes[spec.name] = Outcome(spec.name, "skipped", out / spec.name)
            if on_outcome:
                on_outcome(outcomes[spec.name])
        else:
            todo.append(spec)
    logger.info("%d of %d runs already done; %d to run, %d at a time", len(outcomes), len(specs), len(todo), jobs)
    running: list[_Running] = []
    with _TermAsInterrupt():
        try:
            while todo or running:
                while todo and len(running) < jobs:
                    running.append(_start(todo.pop(0), out, python, timeout_s))
                time.sleep(POLL_S)
                for o in _collect(running, out, grace_s):
                    outcomes[o.name] = o
                    if on_outcome:
                        on_outcome(o)
        except BaseException:
            _end(running, grace_s)
            for r in running:
                _finish(r, out, "interrupted")
            raise
    result = [outcomes[s.name] for s in specs]
    if any(o.status not in ("skipped", "finished") for o in result):
        raise SweepError(result)
    return result
