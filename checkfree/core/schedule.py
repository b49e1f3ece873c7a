"""
Schedules
=========

A pipeline schedule is data: for every stage, the ordered list of operations it runs in one step
(forward or backward of microbatch ``m`` at hop ``h`` of that microbatch's route, with the stage its
input comes from and the stage its output goes to). Pure functions build it; the single-process engine
and the multi-process runtime both execute the same lists.

A *route* is the sequence of hops a microbatch takes through the stages. The plain route visits
0, 1, ..., L-1, the first hop running the embedding and blocks, the last hop the blocks and the head.
The CheckFree+ swapped route (L >= 4) runs the first two and the last two stages' blocks out of order:
``E@0, blocks@1, blocks@0, blocks@2 .. blocks@L-3, blocks@L-1, blocks@L-2, head@L-1``, so that stage 0
learns to stand in for stage 1 (and L-1 for L-2) and can later be rebuilt from it. Gradients go back
along the same route in reverse.

Per-stage orders come from simulating the pipeline tick by tick under a policy (GPipe: all forwards,
then all backwards; 1F1B: backwards first, with at most ``L - stage`` microbatches in flight), so every
schedule produced is deadlock-free by construction; ``validate`` re-proves it independently.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("gpipe", "1f1b")


@dataclass
class PipelineConfig:
    schedule: str = "1f1b"  # gpipe or 1f1b
    num_microbatches: int = 4  # microbatches per optimizer step (gradient accumulation)
    swap: bool | None = None  # CheckFree+ swapped routes; None: on iff recovery.strategy=checkfree_plus
    swap_fraction: float = 0.5  # share of microbatches that take the swapped route (paper: half)

    def __post_init__(self) -> None:
        if self.schedule not in KINDS:
            raise ValueError(f"pipeline.schedule={self.schedule!r} is not one of {', '.join(KINDS)}")
        if self.num_microbatches < 1:
            raise ValueError(f"pipeline.num_microbatches={self.num_microbatches} must be >= 1")
        if not 0.0 <= self.swap_fraction <= 1.0:
            raise ValueError(f"pipeline.swap_fraction={self.swap_fraction} must be in [0, 1]")


class ScheduleError(ValueError):
    """A schedule that is malformed or cannot run to completion."""


@dataclass(frozen=True)
class Hop:
    """One visit of a microbatch to a stage and which of the stage's parts it runs."""

    stage: int
    embed: bool = False
    blocks: bool = False
    head: bool = False


@dataclass(frozen=True)
class Op:
    kind: str  # "F" or "B"
    mb: int  # microbatch
    hop: int  # index into the microbatch's route
    stage: int
    src: int | None  # stage the input (activation for F, gradient for B) comes from; None: data / loss
    dst: int | None  # stage the output goes to; None: nowhere (loss for F, leaf for B)


@dataclass(frozen=True)
class Schedule:
    kind: str
    num_stages: int
    num_microbatches: int
    routes: tuple[tuple[Hop, ...], ...]  # per microbatch
    ops: tuple[tuple[Op, ...], ...]  # per stage, in execution order
    timeline: tuple[Op, ...]  # one global order consistent with every dependency

    def swapped(self, mb: int) -> bool:
        return len(self.routes[mb]) != self.num_stages


def is_swapped(mb: int, fraction: float) -> bool:
    """Spread ``fraction`` of the microbatches evenly; 0.5 swaps the odd ones."""
    return int((mb + 1) * fraction) > int(mb * fraction)


def swapped_count(num_microbatches: int, fraction: float) -> int:
    """How many of a step's microbatches take the swapped route."""
    return sum(is_swapped(m, fraction) for m in range(num_microbatches))


def plain_route(num_stages: int) -> tuple[Hop, ...]:
    last = num_stages - 1
    return tuple(Hop(s, embed=s == 0, blocks=True, head=s == last) for s in range(num_stages))


def swapped_route(num_stages: int) -> tuple[Hop, ...]:
    if num_stages < 4:
        raise ScheduleError(f"the CheckFree+ swapped route needs num_stages >= 4, got {num_stages}")
    last = num_stages - 1
    order = [1, 0, *range(2, last - 1), last, last - 1]
    return (Hop(0, embed=True), *(Hop(s, blocks=True) for s in order), Hop(last, head=True))


def build_schedule(kind: str, num_stages: int, num_microbatches: int, swap_fraction: float = 0.0) -> Schedule:
    """Per-stage op lists for ``kind`` (gpipe or 1f1b), swapping ``swap_fraction`` of the microbatches."""
    if kind not in KINDS:
        raise ScheduleError(f"schedule kind {kind!r} is not one of {', '.join(KINDS)}")
    if num_stages < 1 or num_microbatches < 1:
        raise ScheduleError(f"need num_stages >= 1 and num_microbatches >= 1, got {num_stages}, {num_microbatches}")
    routes = tuple(
        swapped_route(num_stages) if swap_fraction and is_swapped(m, swap_fraction) else plain_route(num_stages)
        for m in range(num_microbatches)
    )
    timeline = _simulate(kind, num_stages, routes)
    ops = tuple(tuple(op for op in timeline if op.stage == s) for s in range(num_stages))
    schedule = Schedule(kind, num_stages, num_microbatches, routes, ops, tuple(timeline))
    validate(schedule)
    return schedule


def _make_op(kind: str, mb: int, hop: int, route: tuple[Hop, ...]) -> Op:
    prev = route[hop - 1].stage if hop > 0 else None
    nxt = route[hop + 1].stage if hop + 1 < len(route) else None
    return (
        Op(kind, mb, hop, route[hop].stage, prev, nxt)
        if kind == "F"
        else Op(kind, mb, hop, route[hop].stage, nxt, prev)
    )


def _ready(op: Op, done: set[tuple[str, int, int]], route_len: int) -> bool:
    if op.kind == "F":
        return op.hop == 0 or ("F", op.mb, op.hop - 1) in done
    if ("F", op.mb, op.hop) not in done:
        return False
    return op.hop == route_len - 1 or ("B", op.mb, op.hop + 1) in done


def _simulate(kind: str, num_stages: int, routes: tuple[tuple[Hop, ...], ...]) -> list[Op]:
    pending: list[list[Op]] = [[] for _ in range(num_stages)]
    for m, route in enumerate(routes):
        for h, hop in enumerate(route):
            pending[hop.stage] += [_make_op("F", m, h, route), _make_op("B", m, h, route)]
    done: set[tuple[str, int, int]] = set()
    started: list[set[int]] = [set() for _ in range(num_stages)]  # microbatches with a forward done
    finished: list[set[int]] = [set() for _ in range(num_stages)]  # microbatches with all backwards done
    timeline: list[Op] = []
    while any(pending):
        chosen = []
        for s in range(num_stages):
            ready = [op for op in pending[s] if _ready(op, done, len(routes[op.mb]))]
            op = _pick(kind, s, num_stages, ready, pending[s], started[s] - finished[s])
            if op is not None:
                chosen.append(op)
        if not chosen:
            raise ScheduleError(f"{kind} policy deadlocked with {sum(map(len, pending))} ops left")
        for op in chosen:  # ops of one tick complete together
            pending[op.stage].remove(op)
            done.add((op.kind, op.mb, op.hop))
            timeline.append(op)
            if op.kind == "F":
                started[op.stage].add(op.mb)
            elif not any(o.mb == op.mb and o.kind == "B" for o in pending[op.stage]):
                finished[op.stage].add(op.mb)
    return timeline


def _pick(kind: str, stage: int, num_stages: int, ready: list[Op], pending: list[Op], in_flight: set[int]) -> Op | None:
    forwards = sorted((op for op in ready if op.kind == "F"), key=lambda o: (o.mb, o.hop))
    backwards = sorted((op for op in ready if op.kind == "B"), key=lambda o: (o.mb, -o.hop))
    if kind == "gpipe":
        if forwards:
            return forwards[0]
        all_forwards_done = not any(op.kind == "F" for op in pending)
        return backwards[0] if backwards and all_forwards_done else None
    if backwards:
        return backwards[0]
    limit = num_stages - stage  # 1F1B warm-up depth: the first stage keeps L microbatches in flight
    for op in forwards:
        if op.mb in in_flight or len(in_flight) < limit:
            return op
    return None


def validate(schedule: Schedule) -> None:
    """Prove that every microbatch visits every stage's blocks exactly once forward, embedding first and
    head last, that backwards run in reverse route order, that sources and destinations match the
    routes, and that executing each stage's list in order (blocking on inputs) completes.

    Raises:
        ScheduleError: naming the first violated property.
    """
    L, M = schedule.num_stages, schedule.num_microbatches
    if len(schedule.routes) != M or len(schedule.ops) != L:
        raise ScheduleError(f"expected {M} routes and {L} op lists, got {len(schedule.routes)} and {len(schedule.ops)}")
    for m, route in enumerate(schedule.routes):
        block_stages = sorted(h.stage for h in route if h.blocks)
        if block_stages != list(range(L)):
            raise ScheduleError(
                f"microbatch {m} runs blocks on stages {block_stages}, expected each of 0..{L - 1} once"
            )
        if not (route[0].embed and route[0].stage == 0) or sum(h.embed for h in route) != 1:
            raise ScheduleError(f"microbatch {m} must run the embedding exactly once, on stage 0, at its first hop")
        if not (route[-1].head and route[-1].stage == L - 1) or sum(h.head for h in route) != 1:
            raise ScheduleError(f"microbatch {m} must run the head exactly once, on stage {L - 1}, at its last hop")
    expected = {(k, m, h) for m, r in enumerate(schedule.routes) for h in range(len(r)) for k in "FB"}
    seen: set[tuple[str, int, int]] = set()
    for s, ops in enumerate(schedule.ops):
        for op in ops:
            key = (op.kind, op.mb, op.hop)
            route = schedule.routes[op.mb] if 0 <= op.mb < M else None
            if route is None or not 0 <= op.hop < len(route) or key in seen:
                raise ScheduleError(f"stage {s}: op {op} is unknown or repeated")
            if op != _make_op(op.kind, op.mb, op.hop, route) or op.stage != s:
                raise ScheduleError(f"stage {s}: op {op} does not match route hop {route[op.hop]}")
            seen.add(key)
    if seen != expected:
        raise ScheduleError(f"ops missing from the schedule: {sorted(expected - seen)[:5]}")
    _check_runs(schedule)


def _check_runs(schedule: Schedule) -> None:
    cursors = [0] * schedule.num_stages
    done: set[tuple[str, int, int]] = set()
    progress = True
    while progress:
        progress = False
        for s, ops in enumerate(schedule.ops):
            while cursors[s] < len(ops) and _ready(ops[cursors[s]], done, len(schedule.routes[ops[cursors[s]].mb])):
                op = ops[cursors[s]]
                done.add((op.kind, op.mb, op.hop))
                cursors[s] += 1
                progress = True
    stuck = [(s, schedule.ops[s][c]) for s, c in enumerate(cursors) if c < len(schedule.ops[s])]
    if stuck:
        raise ScheduleError(f"schedule deadlocks: stages wait forever at {stuck[:3]}")
    # the timeline must itself respect every dependency (the single-process engine runs it in order)
    done.clear()
    for op in schedule.timeline:
        if not _ready(op, done, len(schedule.routes[op.mb])):
            raise ScheduleError(f"timeline runs {op} before its inputs exist")
        done.add((op.kind, op.mb, op.hop))


def schedule_for(cfg: PipelineConfig, num_stages: int, swap: bool) -> Schedule:
    return build_schedule(cfg.schedule, num_stages, cfg.num_microbatches, cfg.swap_fraction if swap else 0.0)


def failure_op(schedule: Schedule, stage: int, phase: str, at: float) -> Op | None:
    """The op of ``stage`` before which a failure in ``phase`` at position ``at`` in [0, 1) lands; None: before
    the step's first op. ``mid_forward`` / ``mid_backward`` pick among the stage's forward / backward ops that
    are not the step's very first op, so a failure "in the middle" always leaves some work to discard. The
    engine stops its whole timeline there; a swarm peer injecting its own failure dies there (the same
    failure, so both executors replay one trace alike)."""
    if phase == "before_forward":
        return None
    kind = "F" if phase == "mid_forward" else "B"
    first = schedule.timeline[0]
    candidates = [op for op in schedule.ops[stage] if op.kind == kind and op != first]
    if not candidates:
        return None
    return candidates[min(int(at * len(candidates)), len(candidates) - 1)]
