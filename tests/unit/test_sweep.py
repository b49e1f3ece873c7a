"""checkfree.analysis.sweep: runs train in subprocesses, a finished run of the same config is skipped, a changed
config is trained again, and a run that fails or passes its deadline is named with its log (and ended)."""

from __future__ import annotations

import json

import pytest

from checkfree.analysis.sweep import RunSpec, SweepError, is_done, run_sweep
from checkfree.config import ConfigError
from tests.helpers import TINY

FAST = (*TINY, "num_steps=2", "eval_every_steps=1", "failures.mode=none", "recovery.strategy=checkfree")


def _spec(name: str, *extra: str) -> RunSpec:
    return RunSpec(name, (), (*FAST, *extra))


def test_runs_then_skips_and_reruns_a_changed_config(tmp_path):
    specs = [_spec("a", "seed=0"), _spec("b", "seed=1")]
    first = run_sweep(specs, tmp_path, jobs=2, timeout_s=120)
    assert [o.status for o in first] == ["finished", "finished"]
    for o in first:
        summary = json.loads((o.run_dir / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["stopped"] is None
        assert o.log == tmp_path / f"{o.name}.log" and o.log.is_file()
    again = run_sweep(specs, f"{tmp_path}/./", jobs=2)  # the same folder, spelt otherwise
    assert [o.status for o in again] == ["skipped", "skipped"]
    changed = [specs[0], _spec("b", "seed=2")]
    assert not is_done(changed[1], tmp_path)
    assert [o.status for o in run_sweep(changed, tmp_path, jobs=2, timeout_s=120)] == ["skipped", "finished"]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 2


def test_a_stopped_or_shorter_run_is_not_done(tmp_path):
    spec = _spec("a")
    run_sweep([spec], tmp_path, timeout_s=120)
    assert is_done(spec, tmp_path)
    assert not is_done(_spec("a", "num_steps=3"), tmp_path)  # more steps wanted: trained again
    summary_path = tmp_path / "a" / "summary.json"
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), "stopped": "SIGTERM"}))
    assert not is_done(spec, tmp_path)


def test_a_failed_run_is_named_with_its_log_and_the_others_finish(tmp_path):
    specs = [_spec("bad", "data.max_bytes=10"), _spec("good")]  # too little text for one sequence: refused
    with pytest.raises(SweepError) as err:
        run_sweep(specs, tmp_path, jobs=2, timeout_s=120)
    [bad] = err.value.failed
    assert bad.name == "bad" and bad.status == "failed" and bad.returncode != 0
    assert "bad: failed" in str(err.value) and str(tmp_path / "bad.log") in str(err.value)
    assert "tokens" in (tmp_path / "bad.log").read_text()  # the trainer's own error is in the log
    assert is_done(specs[1], tmp_path)


def test_a_run_past_its_deadline_is_ended_and_named(tmp_path):
    with pytest.raises(SweepError) as err:
        run_sweep([_spec("slow", "num_steps=100000")], tmp_path, timeout_s=4, grace_s=5)
    [slow] = err.value.failed
    assert slow.status == "timed out" and slow.returncode is not None  # ended and reaped
    assert "slow: timed out" in str(err.value) and str(tmp_path / "slow.log") in str(err.value)


def test_an_interrupted_sweep_ends_its_running_runs(tmp_path):
    def interrupt(outcome):  # Ctrl-C while "slow" is still training
        raise KeyboardInterrupt

    specs = [_spec("bad", "data.max_bytes=10"), _spec("slow", "num_steps=100000")]
    with pytest.raises(KeyboardInterrupt):
        run_sweep(specs, tmp_path, jobs=2, timeout_s=120, grace_s=5, on_outcome=interrupt)
    assert not is_done(specs[1], tmp_path)  # ended by its PID (the fixture fails a test that leaves a process)


def test_bad_specs_fail_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_sweep([_spec("a"), _spec("a")], tmp_path)
    with pytest.raises(ValueError, match="plain folder"):
        run_sweep([_spec("x/y")], tmp_path)
    with pytest.raises(ConfigError):
        run_sweep([_spec("ok"), _spec("typo", "pipeline.num_microbatchez=2")], tmp_path)
    assert not list(tmp_path.glob("*.log"))
