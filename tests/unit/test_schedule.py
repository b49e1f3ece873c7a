import dataclasses

import pytest

from checkfree.core.schedule import (
    KINDS,
    Hop,
    ScheduleError,
    build_schedule,
    is_swapped,
    plain_route,
    swapped_route,
    validate,
)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_stages", range(2, 9))
@pytest.mark.parametrize("num_microbatches", [1, 2, 3, 4, 8])
def test_every_schedule_is_valid(kind, num_stages, num_microbatches):
    fractions = [0.0, 0.5, 1.0] if num_stages >= 4 else [0.0]
    for fraction in fractions:
        s = build_schedule(kind, num_stages, num_microbatches, fraction)
        validate(s)  # build_schedule validates too; be explicit
        assert sum(len(ops) for ops in s.ops) == len(s.timeline) == 2 * sum(len(r) for r in s.routes)
        assert [s.swapped(m) for m in range(num_microbatches)] == [
            bool(fraction) and is_swapped(m, fraction) for m in range(num_microbatches)
        ]


def test_swapped_route_order_for_six_stages():
    # E@0, S1, S0, S2, S3, S5, S4, head@5: first two and last two swapped, whatever the stage count
    r = swapped_route(6)
    assert [(h.stage, h.embed, h.blocks, h.head) for h in r] == [
        (0, True, False, False),
        (1, False, True, False),
        (0, False, True, False),
        (2, False, True, False),
        (3, False, True, False),
        (5, False, True, False),
        (4, False, True, False),
        (5, False, False, True),
    ]
    assert [h.stage for h in swapped_route(4) if h.blocks] == [1, 0, 3, 2]
    assert [h.stage for h in swapped_route(8) if h.blocks] == [1, 0, 2, 3, 4, 5, 7, 6]


def test_half_of_microbatches_swap_by_default_pattern():
    assert [is_swapped(m, 0.5) for m in range(6)] == [False, True, False, True, False, True]
    assert sum(is_swapped(m, 0.25) for m in range(8)) == 2


def test_swap_needs_four_stages():
    with pytest.raises(ScheduleError, match="num_stages >= 4"):
        build_schedule("1f1b", 3, 4, 0.5)


def test_1f1b_bounds_in_flight_microbatches():
    s = build_schedule("1f1b", 4, 8)
    for stage, ops in enumerate(s.ops):
        in_flight = peak = 0
        for op in ops:
            in_flight += 1 if op.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == 4 - stage  # warm-up depth of classic 1F1B
    g = build_schedule("gpipe", 4, 8)
    assert all([op.kind for op in ops] == ["F"] * 8 + ["B"] * 8 for ops in g.ops)


def test_backward_runs_the_route_in_reverse():
    s = build_schedule("gpipe", 5, 4, 0.5)
    for m, route in enumerate(s.routes):
        f = [op.hop for op in s.timeline if op.mb == m and op.kind == "F"]
        b = [op.hop for op in s.timeline if op.mb == m and op.kind == "B"]
        assert f == list(range(len(route))) and b == f[::-1]


def _corrupt(schedule, stage, ops):
    all_ops = list(schedule.ops)
    all_ops[stage] = tuple(ops)
    return dataclasses.replace(schedule, ops=tuple(all_ops))


def test_validator_rejects_a_missing_op():
    s = build_schedule("1f1b", 4, 4)
    with pytest.raises(ScheduleError, match="missing"):
        validate(_corrupt(s, 2, s.ops[2][:-1]))


def test_validator_rejects_a_repeated_op():
    s = build_schedule("1f1b", 4, 4)
    with pytest.raises(ScheduleError, match="repeated"):
        validate(_corrupt(s, 1, s.ops[1] + s.ops[1][:1]))


def test_validator_rejects_a_deadlocking_order():
    s = build_schedule("gpipe", 4, 2)
    ops = list(s.ops[1])
    ops.insert(0, ops.pop(ops.index(next(o for o in ops if o.kind == "B"))))  # a backward before any forward
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(_corrupt(s, 1, ops))


def test_validator_rejects_a_route_that_skips_a_stage():
    s = build_schedule("gpipe", 4, 2)
    bad = (plain_route(4)[:2] + (Hop(3, blocks=True, head=True),),) + s.routes[1:]
    with pytest.raises(ScheduleError, match="runs blocks on stages"):
        validate(dataclasses.replace(s, routes=bad))
