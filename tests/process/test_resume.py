"""Resume and clean stops of ``checkfree train``, for real: a SIGKILL at a random step and the same command
run again, Ctrl-C and SIGTERM at a step boundary, a second signal that aborts, an unwritable run directory
and a disk that fills up during a save (the refusals are tested in process, tests/unit/test_resume.py).
The resumed runs' losses must equal the uninterrupted run's, step for step (the engine is deterministic and
failures are keyed by iteration)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TINY, poll

# failures on, so the redone steps, rebuilds and the draws' position are part of what must resume exactly
COMMON = [*TINY, "num_threads=1", "failures.mode=per_step", "failures.per_step_prob=0.04", "num_steps=40"]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "checkfree", "train", *COMMON, *args]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=240)


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(*args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss/train"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _steps_done(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _reference(cwd: Path, *args: str) -> list[tuple[int, float]]:
    out = _run(cwd, "run_name=ref", *args)
    assert out.returncode == 0, out.stderr
    losses = _losses(cwd / "runs" / "ref")
    assert [s for s, _ in losses] == list(range(40))
    summary = json.loads((cwd / "runs" / "ref" / "summary.json").read_text())
    assert summary["failures"] >= 2  # the comparison covers redone steps and rebuilds
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple[int, float]]:
    """The uninterrupted run's losses, with periodic saves (which change what is trained: with a checkpoint at
    hand, two neighbours lost together are restored from it, recovery.adjacent_fallback=checkpoint)."""
    return _reference(tmp_path_factory.mktemp("reference"), "checkpoint.every_steps=5")


@pytest.fixture(scope="module")
def reference_unsaved(tmp_path_factory) -> list[tuple[int, float]]:
    """The uninterrupted run's losses without periodic saves."""
    return _reference(tmp_path_factory.mktemp("reference_unsaved"))


def test_sigkill_at_a_random_step_then_the_same_command_continues_exactly(tmp_path, reference):
    at = random.Random().randint(8, 30)  # a random step, each run: the resume must hold wherever it lands
    proc = _start(tmp_path, "run_name=r", "checkpoint.every_steps=5")
    run = tmp_path / "runs" / "r"
    try:
        poll(lambda: _steps_done(run) >= at or proc.poll() is not None, timeout_s=120)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close(), proc.stderr.close()
    killed_at = _steps_done(run)
    assert killed_at < 40, "the run finished before the kill; nothing was interrupted"
    out = _run(tmp_path, "run_name=r", "checkpoint.every_steps=5")
    assert out.returncode == 0, out.stderr
    assert "resuming run" in out.stderr and "resumed at step" in out.stdout
    assert _losses(run) == reference, f"killed after {killed_at} steps"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["resumed_from"] <= killed_at and (run / "model.safetensors").exists()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().split("\n") if line]
    assert any(e["event"] == "run_resumed" for e in events)


# SIGTERM takes the same path as SIGINT (GracefulStop); the abort test below sends both
@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.long)])
def test_a_signal_stops_at_a_step_boundary_saves_and_the_same_command_continues(tmp_path, reference_unsaved, sig):
    # no periodic saves: the stop alone must leave what a resume needs
    proc = _start(tmp_path, "run_name=s")
    run = tmp_path / "runs" / "s"
    try:
        poll(lambda: _steps_done(run) >= 10 or proc.poll() is not None, timeout_s=120)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "run the same command to continue" in err
    summary = json.loads((run / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped"] == signal.Signals(sig).name and 10 <= stopped_at < 40
    assert (run / "model.safetensors").exists() and (run / "checkpoints" / "resume").is_dir()
    assert json.loads((run / "model.json").read_text())["step"] == stopped_at
    out = _run(tmp_path, "run_name=s")
    assert out.returncode == 0, out.stderr
    assert f"resumed at step {stopped_at}" in out.stdout
    assert _losses(run) == reference_unsaved


def test_a_second_signal_aborts_at_once_and_keeps_the_last_save(tmp_path):
    proc = _start(tmp_path, "run_name=a", "checkpoint.every_steps=5")
    run = tmp_path / "runs" / "a"
    try:
        poll(lambda: _steps_done(run) >= 12 or proc.poll() is not None, timeout_s=120)
        os.kill(proc.pid, signal.SIGINT)  # two different signals: neither can merge into the other while pending
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and "aborted at step" in err and "Traceback" not in err, err
    assert not list(run.rglob("*.tmp"))
    out = _run(tmp_path, "run_name=a", "checkpoint.every_steps=5")
    assert out.returncode == 0 and "resumed at step" in out.stdout, out.stderr


def test_an_unwritable_run_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = _run(tmp_path, f"out_dir={tmp_path / 'file' / 'runs'}", "num_steps=2")
    assert out.returncode == 2 and "cannot write the run directory" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a disk that really fills up (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_loses_nothing_already_saved(tmp_path, small_disk):
    args = ["run_name=d", f"out_dir={small_disk}", "checkpoint.every_steps=5", "checkpoint.keep=1"]
    first = _run(tmp_path, *args, "num_steps=10")
    assert first.returncode == 0, first.stderr
    run = small_disk / "d"
    weights = (run / "model.safetensors").read_bytes()
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == ["step_00000010"]
    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave less than one stage's checkpoint file
        f.write(b"\0" * max(0, free - 64 * 1024))
    out = _run(tmp_path, *args, "num_steps=20")
    assert out.returncode == 2, out.stderr
    assert "No space left on device" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))[:1] == saved
    assert (run / "model.safetensors").read_bytes() == weights
    assert not list(run.rglob("*.tmp")), list(run.rglob("*.tmp"))
    filler.unlink()
    time.sleep(0.1)
    out = _run(tmp_path, *args, "num_steps=20")
    assert out.returncode == 0 and "resumed at step" in out.stdout, out.stderr
