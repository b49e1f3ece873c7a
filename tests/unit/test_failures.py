import math

import pytest

from checkfree.core.failures import (
    Failure,
    FailureConfig,
    FailureInjector,
    hourly_to_per_iteration,
    read_trace,
    write_trace,
)


def test_hourly_rate_conversion():
    # one hour of exposure per iteration: the probability is the hourly rate itself
    assert hourly_to_per_iteration(0.16, 3600) == pytest.approx(0.16)
    # two iterations of half an hour each compound to the hourly rate
    p = hourly_to_per_iteration(0.16, 1800)
    assert 1 - (1 - p) ** 2 == pytest.approx(0.16)
    # the paper's medium setting: 16%/h at 91.3 s per iteration is ~0.44% per iteration and stage
    assert hourly_to_per_iteration(0.16, 91.3) == pytest.approx(0.00441, abs=1e-4)
    assert hourly_to_per_iteration(1.0, 1) == 1.0


def test_seeded_draws_are_reproducible_and_rate_matches():
    cfg = FailureConfig(mode="per_step", per_step_prob=0.05, seed=3)
    a, b = FailureInjector(cfg, 4), FailureInjector(cfg, 4)
    fa = [f for i in range(2000) for f in a.failures_at(i)]
    fb = [f for i in range(2000) for f in b.failures_at(i)]
    assert fa == fb
    assert len(fa) / (2000 * 4) == pytest.approx(0.05, rel=0.2)
    assert {f.phase for f in fa} == {"before_forward", "mid_forward", "mid_backward"}


def test_hourly_mode_uses_measured_time_when_unset():
    inj = FailureInjector(FailureConfig(mode="hourly", hourly_rate=0.5, iteration_time_s=None), 2)
    assert inj.probability(None) == 0.0
    assert inj.probability(36.0) == pytest.approx(1 - math.exp(math.log(0.5) * 0.01))
    fast = FailureInjector(
        FailureConfig(mode="hourly", hourly_rate=0.5, iteration_time_s=36.0, time_acceleration=10), 2
    )
    assert fast.probability(None) == pytest.approx(1 - 0.5**0.1)


def test_trace_round_trip_and_exact_replay(tmp_path):
    rec = FailureInjector(FailureConfig(mode="per_step", per_step_prob=0.1, seed=1), 4)
    for i in range(100):
        rec.failures_at(i)
    path = tmp_path / "trace.jsonl"
    write_trace(path, rec.fired, 4)
    assert read_trace(path, 4) == rec.fired
    replay = FailureInjector(FailureConfig(mode="trace", trace_path=str(path)), 4)
    assert [f for i in range(100) for f in replay.failures_at(i)] == rec.fired


def test_max_failures_and_stage_filter():
    inj = FailureInjector(FailureConfig(mode="per_step", per_step_prob=1.0, stages=[2], max_failures=3), 4)
    fired = [f for i in range(10) for f in inj.failures_at(i)]
    assert len(fired) == 3 and {f.stage for f in fired} == {2}


def test_bad_traces_are_refused(tmp_path):
    p = tmp_path / "t.jsonl"
    write_trace(p, [Failure(3, 5, "mid_forward", 0.5)], 6)
    with pytest.raises(ValueError, match="stage 5 out of range 0..3"):
        read_trace(p, 4)
    p.write_text('{"iteration": 1, "stage": 0}\n')
    with pytest.raises(ValueError, match="expected iteration, stage, phase, at"):
        read_trace(p, 4)
    p.write_text("not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        read_trace(p, 4)
    with pytest.raises(ValueError, match="no such file"):
        FailureConfig(mode="trace", trace_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="failures.phases"):
        FailureConfig(phases=["sideways"])


def test_neighbour_prob_adds_correlated_losses_on_top_of_the_independent_ones():
    """failures.neighbour_prob c: each neighbour of an independently drawn failure fails in the same iteration
    with probability c, from a draw of its own, so the independent failures are exactly those of c = 0."""
    indep = FailureInjector(FailureConfig(mode="per_step", per_step_prob=0.02, seed=5), 6)
    corr = FailureInjector(FailureConfig(mode="per_step", per_step_prob=0.02, seed=5, neighbour_prob=0.5), 6)
    base = {i: {f.stage for f in indep.failures_at(i)} for i in range(5000)}
    both = {i: {f.stage for f in corr.failures_at(i)} for i in range(5000)}
    added = eligible = 0
    for i, stages in base.items():
        assert stages <= both[i]
        extra = both[i] - stages
        assert all(s - 1 in stages or s + 1 in stages for s in extra)  # only neighbours of a drawn failure
        added += len(extra)
        eligible += len({nb for s in stages for nb in (s - 1, s + 1) if 0 <= nb < 6} - stages)
    assert added / eligible == pytest.approx(0.5, abs=0.08)  # each eligible neighbour once, with probability c
    # c = 1: every neighbour of a drawn failure fails with it (no cascade beyond), only among the stages
    # allowed to fail
    full = FailureInjector(FailureConfig(mode="per_step", per_step_prob=0.05, seed=1, neighbour_prob=1.0), 6)
    alone = FailureInjector(FailureConfig(mode="per_step", per_step_prob=0.05, seed=1), 6)
    for i in range(200):
        drawn, stages = {f.stage for f in alone.failures_at(i)}, {f.stage for f in full.failures_at(i)}
        assert stages == drawn | {nb for s in drawn for nb in (s - 1, s + 1) if 0 <= nb < 6}
    mid = FailureInjector(FailureConfig(mode="per_step", per_step_prob=0.2, stages=[2, 3], neighbour_prob=1.0), 6)
    assert {f.stage for i in range(50) for f in mid.failures_at(i)} == {2, 3}


def test_bad_neighbour_prob_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neighbour_prob=1.5"):
        FailureConfig(mode="per_step", per_step_prob=0.1, neighbour_prob=1.5)
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, [], 4)
    with pytest.raises(ValueError, match="neighbour_prob=0.5 does not apply to failures.mode='trace'"):
        FailureConfig(mode="trace", trace_path=str(trace), neighbour_prob=0.5)
    FailureConfig(mode="none", neighbour_prob=0.5)  # nothing fails: accepted, as an hourly_rate would be


def test_max_failures_keeps_the_independent_failures_first():
    """A cap on failures never trades an independent failure for a neighbour's: the independent draws are
    taken first, then neighbours while there is room."""
    for cap in (1, 2, 3):
        plain = FailureInjector(FailureConfig(mode="per_step", per_step_prob=0.05, seed=1, max_failures=cap), 6)
        corr = FailureInjector(
            FailureConfig(mode="per_step", per_step_prob=0.05, seed=1, max_failures=cap, neighbour_prob=1.0), 6
        )
        first = next(i for i in range(1000) if plain.failures_at(i))
        for i in range(first):
            corr.failures_at(i)
        got = corr.failures_at(first)
        assert {(f.iteration, f.stage) for f in plain.fired} <= {(f.iteration, f.stage) for f in got}
        assert len(corr.fired) <= cap
