"""
Cost model
==========

When does CheckFree beat checkpointing? The expected wall-clock time to reach a target of S committed
steps under stage failures, for three ways of surviving them, as closed forms and as a seeded Monte-Carlo
simulation of the same model (so each checks the other); the checkpoint interval of Young (1974) and Daly
(2006); the save time at which CheckFree and checkpointing break even; and ``replay``, which re-times a run
the engine recorded under other step, save, restore and downtime costs.

The model is the engine's (``checkfree.core.failures``): failures are drawn per *iteration* (step attempt).
In each iteration each of the L stages fails independently with probability p. An iteration in which at
least one stage fails is an *incident*, with probability h = 1 - (1 - p)^L (about lambda = L p, the
failures per step of the whole pipeline). An incident interrupts the step a fraction f of the way through
(f T of work lost, T the step time), costs a downtime D (detect the loss, bring in a replacement; losses in
one iteration are replaced in parallel, so D is per incident), and then:

- **checkpointing** (interval k; a blocking save of C seconds after every k-th committed step; restore R):
  every stage goes back to the last checkpoint and the steps since then are redone, exposed to failures
  again;
- **CheckFree(+)**: the lost stages are rebuilt in place and training goes on; each lost stage adds q
  committed steps to the target (the extra steps to the same loss, measured by ``scripts/measure_q.py``),
  less early in training (``q_full_step``) and less when it follows another loss closely
  (``q_overlap_iterations``); CheckFree+'s swapped schedule trains less per step even without failures
  (``swap_tax``); no saves, no rollback;
- **hybrid**: CheckFree for the incidents it can recover, plus asynchronous checkpoints every k_a steps
  that do not stall training; a fraction u (``p_unrecoverable``) of incidents (two neighbours lost at once,
  everything lost) rolls back to the last of them, at restore cost R (a save counts as complete when its
  step commits: the write's lag behind training is not modelled).

Saves, restores and rebuilds are not exposed to failures (the engine draws failures per iteration only).
The three are one process with three settings (u = 1, 0, or in between), which ``Policy`` holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from checkfree.analysis import runs
from checkfree.core.failures import hourly_to_per_iteration
from checkfree.core.metrics import read_jsonl
from checkfree.core.schedule import PipelineConfig, schedule_for
from checkfree.core.strategies import SWAPPED


@dataclass(frozen=True)
class Scenario:
    """The system the strategies are compared on (units in the names: seconds, steps)."""

    target_steps: float  # S: committed steps a failure-free run needs to reach the target
    step_s: float  # T: time of one step (iteration) that runs to the end
    stage_fail_prob: float  # p: probability that a given stage fails in one iteration
    num_stages: int  # L: stages that may fail
    save_s: float = 0.0  # C: blocking save of every stage (checkpointing)
    restore_s: float = 0.0  # R: loading a checkpoint into every stage
    downtime_s: float = 0.0  # D: per incident, detection and replacement (and a rebuild)
    q: float = 0.0  # extra committed steps to the target per stage lost and rebuilt (CheckFree)
    interrupt_fraction: float = 0.5  # f: how far through its step an incident lands, on average
    # F: 0, q is the same whenever a stage is lost; else q is what a loss at committed step F costs, and a
    # loss at step s costs q min(1, s / F) (early losses cost less: measure_q.py's regime scan)
    q_full_step: float = 0.0
    # tau: 0, every loss costs its whole q; else an incident J iterations after the previous one costs
    # q (1 - exp(-J / tau)) per lost stage: a model still recovering from one rebuild loses less to the next
    # (the sweeps' realised q per failure falls as the rate rises). Fitted by whatif.py --fit-overlap.
    q_overlap_iterations: float = 0.0
    # sigma: extra committed steps per step a rebuilding strategy pays even without failures (CheckFree+'s
    # swapped microbatches train less per step than the plain schedule), so its target is S (1 + sigma);
    # checkpointing runs the plain schedule and does not pay it. Fitted by whatif.py --fit-overlap.
    swap_tax: float = 0.0

    def __post_init__(self) -> None:
        if not self.target_steps > 0 or not self.step_s > 0:
            raise ValueError(f"target_steps={self.target_steps} and step_s={self.step_s} must both be > 0")
        if not 0.0 <= self.stage_fail_prob <= 1.0 or self.num_stages < 1:
            raise ValueError(
                f"stage_fail_prob={self.stage_fail_prob}, num_stages={self.num_stages}: "
                "expected a probability in [0, 1] and at least one stage"
            )
        costs = {"save_s": self.save_s, "restore_s": self.restore_s, "downtime_s": self.downtime_s, "q": self.q}
        bad = {k: v for k, v in costs.items() if not v >= 0}
        if bad:
            raise ValueError(f"{bad}: costs and q must be >= 0")
        if not 0.0 <= self.interrupt_fraction <= 1.0:
            raise ValueError(f"interrupt_fraction={self.interrupt_fraction} must be in [0, 1]")
        if not self.q_full_step >= 0:
            raise ValueError(f"q_full_step={self.q_full_step} must be >= 0 (0: q at every step)")
        if not self.swap_tax >= 0:
            raise ValueError(f"swap_tax={self.swap_tax} must be >= 0 (extra steps per step of the swapped schedule)")
        if not self.q_overlap_iterations >= 0:
            raise ValueError(
                f"q_overlap_iterations={self.q_overlap_iterations} must be >= 0 (0: every loss costs its whole q)"
            )

    @property
    def failures_per_step(self) -> float:
        """lambda = L p: stages lost per iteration, the whole pipeline's failure rate per step."""
        return self.num_stages * self.stage_fail_prob

    @property
    def incident_prob(self) -> float:
        """h = 1 - (1 - p)^L: probability that an iteration loses at least one stage."""
        return -math.expm1(self.num_stages * math.log1p(-self.stage_fail_prob)) if self.stage_fail_prob < 1 else 1.0

    def overlap_share(self, p_unrecoverable: float = 0.0) -> float:
        """The mean share of q a loss costs when losses overlap (``q_overlap_iterations`` tau > 0). The gap
        counts from the previous *rebuilt* incident (a rollback restores a checkpoint, which is not recovering
        from a rebuild): rebuilt incidents come with probability r = h (1 - u) per iteration, so the
        iterations J between them are geometric, P(J = j) = r (1 - r)^(j - 1), and with z = exp(-1 / tau),
        E[1 - z^J] = 1 - r z / (1 - (1 - r) z), about 1 / (1 + lambda tau) for small r. The first rebuilt
        incident of a run, which follows none and costs its whole q, is left out (``_first_loss_extra``)."""
        r = self.incident_prob * (1.0 - p_unrecoverable)
        if not self.q_overlap_iterations or r <= 0.0:
            return 1.0
        z = math.exp(-1.0 / self.q_overlap_iterations)
        return 1.0 - r * z / (1.0 - (1.0 - r) * z)

    def loss_cost(self, committed_step, gap_iterations):
        """q for one lost stage: the ramp of ``q_full_step`` at the committed step it was lost at, times the
        overlap discount 1 - exp(-J / tau) for an incident J iterations after the previous one (inf: none
        before it). Takes numbers or numpy arrays."""
        q = self.q * np.minimum(1.0, np.asarray(committed_step) / self.q_full_step) if self.q_full_step else self.q
        if self.q_overlap_iterations:
            q = q * -np.expm1(-np.asarray(gap_iterations, dtype=float) / self.q_overlap_iterations)
        return q


@dataclass(frozen=True)
class Policy:
    """How failures are survived: checkpoints every ``interval`` steps (None: never), blocking or not, and
    the fraction of incidents that roll back to the last checkpoint (the others are rebuilt, CheckFree).
    ``rebuilds`` False: a lost stage is restored exactly (redundant computation keeps a copy of it), so it
    costs no q and the plain schedule pays no swap tax; its slower step is the scenario's ``step_s``."""

    name: str
    interval: int | None
    blocking_save: bool
    p_unrecoverable: float
    rebuilds: bool = True

    def __post_init__(self) -> None:
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"{self.name}: checkpoint interval {self.interval} must be >= 1 step (or None)")
        if not 0.0 <= self.p_unrecoverable <= 1.0:
            raise ValueError(f"{self.name}: p_unrecoverable={self.p_unrecoverable} must be in [0, 1]")
        if self.interval is None and 0.0 < self.p_unrecoverable < 1.0:
            raise ValueError(f"{self.name}: a hybrid needs a checkpoint interval to roll back to")


def checkpointing(interval: int | None) -> Policy:
    return Policy("checkpoint", interval, True, 1.0)


def checkfree() -> Policy:
    return Policy("checkfree", None, False, 0.0)


def hybrid(async_every: int, p_unrecoverable: float) -> Policy:
    return Policy("hybrid", async_every, False, p_unrecoverable)


def redundant() -> Policy:
    """Redundant computation: every stage also runs its neighbour's work, so a lost stage comes back exact (no
    q, no rollback); give its slower step (the paper: 151.0 s against 91.3 s) as the scenario's ``step_s``."""
    return Policy("redundant", None, False, 0.0, rebuilds=False)


def _charged(sc: Scenario, pol: Policy) -> Scenario:
    """The scenario as ``pol`` pays it: a policy that restores lost stages exactly pays no q and no swap tax."""
    return sc if pol.rebuilds else Scenario(**{**sc.__dict__, "q": 0.0, "swap_tax": 0.0})


def per_step_probability(hourly_rate: float, iteration_s: float, acceleration: float = 1.0) -> float:
    """p for a stage that fails with probability ``hourly_rate`` within an hour, one step standing for
    ``iteration_s * acceleration`` seconds of exposure (as ``failures.mode=hourly`` draws them)."""
    if not 0.0 <= hourly_rate <= 1.0 or iteration_s <= 0 or acceleration <= 0:
        raise ValueError(
            f"hourly_rate={hourly_rate}, iteration_s={iteration_s}, acceleration={acceleration}: "
            "expected a rate in [0, 1] and positive times"
        )
    return hourly_to_per_iteration(hourly_rate, iteration_s * acceleration) if hourly_rate > 0 else 0.0


def adjacent_loss_fraction(p: float, num_stages: int) -> float:
    """Share of incidents that lose two neighbouring stages at once, which CheckFree cannot rebuild from
    neighbours (a chain: stage 0 and 1 count as neighbours, 0 and L-1 do not). A default for the hybrid's u."""
    alive, lost = 1.0 - p, p  # P(no neighbouring pair so far, last stage alive / lost)
    for _ in range(num_stages - 1):
        alive, lost = (alive + lost) * (1.0 - p), alive * p
    h = Scenario(1, 1, p, num_stages).incident_prob
    return max(0.0, 1.0 - alive - lost) / h if h > 0 else 0.0


# ---- checkpoint intervals ------------------------------------------------------------------------------
def young_interval_steps(save_s: float, step_s: float, failures_per_step: float) -> float:
    """Young (1974): the interval between checkpoints that minimises the expected waste to first order,
    tau = sqrt(2 C M) seconds with M = T / lambda the mean time between failures of the pipeline, i.e.

        k_Young = sqrt(2 C / (lambda T))  steps.
    """
    if failures_per_step <= 0:
        return math.inf
    return math.sqrt(2.0 * save_s / (failures_per_step * step_s))


def daly_interval_steps(save_s: float, step_s: float, failures_per_step: float) -> float:
    """Daly (2006), the higher-order optimum: with M = T / lambda,
    tau = sqrt(2 C M) [1 + sqrt(C / 2M) / 3 + (C / 2M) / 9] - C for C < 2M, else tau = M; k_Daly = tau / T."""
    if failures_per_step <= 0:
        return math.inf
    m = step_s / failures_per_step
    if save_s >= 2.0 * m:
        return m / step_s
    x = save_s / (2.0 * m)
    return (math.sqrt(2.0 * save_s * m) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - save_s) / step_s


# ---- closed form ------------------------------------------------------------------------------------
def _segment(sc: Scenario, pol: Policy, k: float, save_s: float) -> tuple[float, float]:
    """Expected (time, iterations) to commit ``k`` steps from a checkpoint and then save (``save_s``).

    Per iteration: success (s = 1 - h, cost T), a rebuilt incident (a = h (1 - u), cost f T + D, no progress
    lost) or a rollback (b = h u, cost f T + D + R, back to the segment's start). Among the iterations that
    are not rebuilt incidents a success has probability sigma = s / (s + b), so k successes in a row take
        M = sigma^-k - 1 rollbacks,  M sigma / (1 - sigma) successful iterations (k when b = 0),
    and the rebuilt incidents are geometric in between: M / (1 - sigma) * a / (s + b) of them.
    """
    h = sc.incident_prob
    s, a, b = 1.0 - h, h * (1.0 - pol.p_unrecoverable), h * pol.p_unrecoverable
    if s <= 0.0:
        return math.inf, math.inf
    lost = sc.interrupt_fraction * sc.step_s + sc.downtime_s
    if b > 0.0:
        one_minus_sigma = b / (s + b)
        try:
            rollbacks = math.expm1(-k * math.log1p(-one_minus_sigma))
        except OverflowError:
            return math.inf, math.inf
        non_rebuilt = rollbacks / one_minus_sigma
        successes = non_rebuilt - rollbacks
    else:
        rollbacks, non_rebuilt, successes = 0.0, k, k
    rebuilt = non_rebuilt * a / (s + b)
    time = sc.step_s * successes + lost * rebuilt + (lost + sc.restore_s) * rollbacks + save_s
    return time, non_rebuilt / (s + b)


def _steps_needed(target: float, g: float, full_step: float) -> float:
    """Committed steps N that reach ``target`` when each committed step s adds g min(1, s / F) steps of debt
    (F = ``full_step``; 0: g at every step): N = S + integral of the debt over 0..N. Flat: S / (1 - g). With
    the ramp, N <= F solves g N^2 / 2F - N + S = 0; past F, N = (S - g F / 2) / (1 - g). inf: never."""
    if g <= 0.0:
        return target
    if full_step > 0.0:
        disc = 1.0 - 2.0 * g * target / full_step
        if disc >= 0.0:
            n = 2.0 * target / (1.0 + math.sqrt(disc))  # the smaller root, without cancellation
            if n <= full_step:
                return n
        return (target - g * full_step / 2.0) / (1.0 - g) if g < 1.0 else math.inf
    return target / (1.0 - g) if g < 1.0 else math.inf


def _target(sc: Scenario, pol: Policy) -> float:
    """Committed steps to the target before any failure: S, or S (1 + sigma) for a rebuilding policy, which
    runs CheckFree+'s swapped schedule and pays its ``swap_tax``."""
    return float(sc.target_steps) * (1.0 + (sc.swap_tax if pol.p_unrecoverable < 1.0 else 0.0))


def _first_loss_extra(sc: Scenario, pol: Policy, steps: float) -> float:
    """With overlap, a rebuilt incident early in a run has fewer rebuilt incidents before it to overlap with
    (the first has none and costs its whole q), so it costs more than the stationary ``overlap_share`` phi.
    With r = h (1 - u) the probability of a rebuilt incident per iteration, one at iteration t follows the
    previous one by j <= t iterations with probability r (1 - r)^(j - 1), and none with probability
    (1 - r)^t, so its expected share is exactly phi + (1 - phi) y^t with y = (1 - r) z, z = exp(-1 / tau).
    Summed over the iterations of a run of ``steps`` committed steps (T = steps / (1 - h) iterations), each
    with a rebuilt incident with probability r, at the ramp's value min(1, a t) (a = (1 - h) / F: committed
    steps per iteration over F; rollbacks' redone steps ignored), the excess over phi is

        q c (1 - phi) r [a sum_{t < M} t y^t + (y^M - y^T) / (1 - y)],  M = min(T, 1 / a),

    with sum_{t < M} t y^t = y (1 - M y^(M - 1) + (M - 1) y^M) / (1 - y)^2 and c the stages lost per incident.
    """
    h = sc.incident_prob
    r = h * (1.0 - pol.p_unrecoverable)
    if not sc.q_overlap_iterations or r <= 0.0 or h >= 1.0 or math.isinf(steps):
        return 0.0
    y = (1.0 - r) * math.exp(-1.0 / sc.q_overlap_iterations)
    t_end = max(steps, 0.0) / (1.0 - h)
    if sc.q_full_step:
        a = (1.0 - h) / sc.q_full_step
        m = min(t_end, 1.0 / a)
        weight = a * y * (1.0 - m * y ** (m - 1.0) + (m - 1.0) * y**m) / (1.0 - y) ** 2
        weight += (y**m - y**t_end) / (1.0 - y)
    else:
        weight = (1.0 - y**t_end) / (1.0 - y)
    per_incident = sc.failures_per_step / h  # stages lost per incident
    return sc.q * (1.0 - sc.overlap_share(pol.p_unrecoverable)) * r * weight * per_incident


def expected_time(sc: Scenario, pol: Policy) -> float:
    """Expected wall-clock to reach ``sc.target_steps`` under ``pol`` (inf when it never gets there).

    Every stage rebuilt adds q to the target, and stages are lost at lambda (1 - u) per iteration, so each
    committed step adds g = q lambda (1 - u) E[iterations of a segment] / k to the target, and the steps
    needed are N = S / (1 - g) (Wald; exact for CheckFree, where it reads S / (1 - q lambda / (1 - h)),
    up to the fraction of a step the last one overshoots). N is cut into floor(N / k) segments that end
    with a save and a remainder that does not (``_segment``). For checkpointing (u = 1) N = S and the
    result is exact; for the hybrid, which rolls back steps whose debt it already counted, a close
    approximation (the tests bound it against ``simulate``). With ``q_full_step`` F the debt of a step s
    is g min(1, s / F) (``_steps_needed``). With ``q_overlap_iterations`` each loss costs the stationary
    ``overlap_share`` of q, and the early ones more (``_first_loss_extra``, an approximation the tests
    bound against ``simulate``).
    """
    sc = _charged(sc, pol)
    save_s = sc.save_s if pol.blocking_save else 0.0
    need = _target(sc, pol)
    if pol.p_unrecoverable < 1.0 and sc.q > 0.0:
        k = pol.interval or need
        _, iters = _segment(sc, pol, k, 0.0)
        g = sc.q * sc.overlap_share(pol.p_unrecoverable) * sc.failures_per_step * (1.0 - pol.p_unrecoverable)
        g *= iters / k
        need = _steps_needed(need + _first_loss_extra(sc, pol, _steps_needed(need, g, 0.0)), g, sc.q_full_step)
        if math.isinf(need):
            return math.inf
    if pol.interval is None or pol.interval > need:  # never saves: one segment from the start
        return _segment(sc, pol, need, 0.0)[0]
    full, rest = divmod(need, pol.interval)
    total = full * _segment(sc, pol, pol.interval, save_s)[0]
    return total + (_segment(sc, pol, rest, 0.0)[0] if rest > 1e-12 else 0.0)


def optimal_interval(sc: Scenario) -> int:
    """The checkpoint interval (steps) that minimises ``expected_time`` of checkpointing exactly: a
    logarithmic grid over 1..S + 1 (S + 1: never save), then a ternary search between the best point's
    neighbours (the cost is unimodal in k but for plateaus: saves fall as 1/k, redone work grows with k)."""
    cost = lambda k: expected_time(sc, checkpointing(k))
    top = math.ceil(sc.target_steps) + 1  # past the target: never save
    grid = sorted({max(1, round(x)) for x in np.geomspace(1, top, 64)})
    i = min(range(len(grid)), key=lambda j: cost(grid[j]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    while hi - lo > 2:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        lo, hi = (lo, m2) if cost(m1) <= cost(m2) else (m1, hi)
    return min([grid[i], *range(lo, hi + 1)], key=cost)  # the grid's best too: the cost has plateaus


# ---- break-even ------------------------------------------------------------------------------------
def break_even_save_s_approx(failures_per_step: float, q: float, step_s: float, restore_s: float = 0.0) -> float:
    """First order in lambda. Per committed step, checkpointing every k steps wastes C / k on saves and,
    per failure, the (k - 1) / 2 committed steps it redoes on average plus R + D + f T; CheckFree wastes q T
    + D + f T per failure. D and f T cancel; the best k is Young's, k* = sqrt(2 C / (lambda T)), where
    checkpointing wastes sqrt(2 C lambda T) + lambda (R - T / 2). CheckFree wins when that exceeds
    lambda q T, i.e. when

        C > lambda (q T - R + T / 2)^2 / (2 T),

    and always when q T + T / 2 <= R. The issue's C > lambda q^2 T / 2 is its R = 0, q >> 1 form (Young's
    continuous model counts the interrupted step in the k T / 2 lost; here both strategies pay it as f T).
    At the break-even the optimal interval is about q + 1/2 - R / T steps. ``break_even_save_s`` tends to
    this as lambda -> 0 (the tests check it).
    """
    return failures_per_step * max(q * step_s - restore_s + step_s / 2.0, 0.0) ** 2 / (2.0 * step_s)


def break_even_save_s(sc: Scenario, tol: float = 1e-6) -> float:
    """The save time C (``sc.save_s`` ignored; R, D, f as given) above which CheckFree reaches the target
    sooner than checkpointing at its exact optimal interval, by bisection on the exact model (checkpointing's
    best time grows with C). 0: CheckFree wins even with free saves; inf: it never does (q lambda too
    large to finish). It tends to ``break_even_save_s_approx`` as lambda k* and q lambda go to 0; beyond,
    redone work exposed to failures again favours CheckFree and q's compounding (1 / (1 - g)) checkpointing.
    """
    target = expected_time(sc, checkfree())
    if math.isinf(target):
        return math.inf

    def ckpt(c: float) -> float:
        s = Scenario(**{**sc.__dict__, "save_s": c})
        return expected_time(s, checkpointing(optimal_interval(s)))

    if ckpt(0.0) >= target:
        return 0.0
    lo, hi = 0.0, max(sc.step_s, break_even_save_s_approx(sc.failures_per_step, sc.q, sc.step_s, sc.restore_s))
    while ckpt(hi) < target:
        lo, hi = hi, hi * 2.0
        if hi > 1e6 * sc.target_steps * sc.step_s:
            return math.inf
    while hi - lo > tol * max(hi, 1e-9):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if ckpt(mid) < target else (lo, mid)
    return (lo + hi) / 2.0


# ---- Monte-Carlo -----------------------------------------------------------------------------------
def simulate(
    sc: Scenario, pol: Policy, runs: int = 1000, seed: int = 0, max_iterations: int | None = None
) -> np.ndarray:
    """Wall-clock to the target of ``runs`` independent runs of the same model, iteration by iteration
    (each stage a Bernoulli(p) draw per iteration, a rebuilt incident adds q per lost stage to the target,
    a rollback returns to the last checkpoint), seeded. A run still short of the target after
    ``max_iterations`` (default: 20x the expected iterations, at most 200 000) is reported as inf."""
    rng = np.random.default_rng(seed)
    sc = _charged(sc, pol)
    expected = expected_time(sc, pol)
    if math.isinf(expected):
        return np.full(runs, math.inf)
    t, done = np.zeros(runs), np.zeros(runs, dtype=bool)
    committed, last_ckpt = np.zeros(runs, dtype=np.int64), np.zeros(runs, dtype=np.int64)
    last_rebuilt = np.full(runs, -np.inf)  # the iteration of each run's previous rebuilt incident (overlap)
    target = np.full(runs, _target(sc, pol))
    lost_s = sc.interrupt_fraction * sc.step_s + sc.downtime_s
    save_s = sc.save_s if pol.blocking_save else 0.0
    if max_iterations is None:
        max_iterations = int(min(20 * expected / sc.step_s + 100, 200_000))
    for i in range(max_iterations):
        idx = np.flatnonzero(~done)
        if idx.size == 0:
            break
        count = (rng.random((idx.size, sc.num_stages)) < sc.stage_fail_prob).sum(axis=1)
        back = (count > 0) & (rng.random(idx.size) < pol.p_unrecoverable)
        rebuilt, ok = idx[(count > 0) & ~back], idx[count == 0]
        t[idx[count > 0]] += lost_s
        target[rebuilt] += sc.loss_cost(committed[rebuilt], i - last_rebuilt[rebuilt]) * count[(count > 0) & ~back]
        last_rebuilt[rebuilt] = i
        t[idx[back]] += sc.restore_s
        committed[idx[back]] = last_ckpt[idx[back]]
        t[ok] += sc.step_s
        committed[ok] += 1
        if pol.interval is not None:
            saved = ok[committed[ok] % pol.interval == 0]
            t[saved] += save_s
            last_ckpt[saved] = committed[saved]
        done[ok] = committed[ok] >= target[ok]
    t[~done] = math.inf
    return t


# ---- replay of a recorded engine run --------------------------------------------------------------
@dataclass
class Iteration:
    """One step attempt of a recorded run, with what the run measured for it."""

    index: int
    step: int  # the step it attempted (0-based)
    kind: str  # commit, interrupted (a stage lost) or discarded (a non-finite gradient)
    step_s: float | None = None  # commit: the measured step
    save_s: float | None = None  # commit: the blocking save that followed it, if any
    fraction: float = 0.0  # interrupted: how far through the step's ops it stopped
    failures: int = 0  # interrupted: stages lost
    restore_s: float | None = None  # interrupted: a rollback's restore
    rebuild_s: float = 0.0  # interrupted: the rebuilds' total duration
    row: int | None = None  # commit: its index in metrics.jsonl


@dataclass
class RecordedRun:
    """An engine run directory, read: resolved config, metrics rows, events, summary, and its trajectory."""

    run_dir: str
    config: dict
    rows: list[dict]
    events: list[dict]
    summary: dict
    iterations: list[Iteration]
    timeline_ops: int  # ops in one step of its schedule (where an interrupted step stopped, as a fraction)
    swap: bool = False  # trained with CheckFree+'s swapped schedule (pays ``Scenario.swap_tax``)


def _read(path: Path, what: str):
    if not path.is_file():
        raise ValueError(f"{path.parent} is not an engine run directory: no {path.name} ({what})")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())


def load_run(run_dir) -> RecordedRun:
    """Read what ``checkfree train`` wrote into ``run_dir`` and rebuild its per-iteration trajectory.

    Raises:
        ValueError: a file is missing, the run is not an engine run, or its records do not add up (an
            iteration neither committed nor interrupted, saves that match no commit); the message says which.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"{run_dir} is not a directory (expected an engine run directory)")
    cfg = _read(d / "config.yaml", "the resolved TrainConfig")
    rows = _read(d / "metrics.jsonl", "one row per committed step")
    events = _read(d / "events.jsonl", "failures, rebuilds, rollbacks and saves")
    summary = _read(d / "summary.json", "the run's totals") if (d / "summary.json").is_file() else {}
    if not any(e["event"] == "run_started" for e in events):
        raise ValueError(f"{run_dir}: events.jsonl has no run_started event; replay reads engine runs only")
    swap = cfg["pipeline"].get("swap")
    swap = cfg["recovery"]["strategy"] in SWAPPED if swap is None else swap  # as TrainConfig.swap_enabled
    pipe = PipelineConfig(**cfg["pipeline"])
    ops = len(schedule_for(pipe, cfg["model"]["num_stages"], bool(swap)).timeline)
    its: dict[int, Iteration] = {}
    for n, r in enumerate(rows):
        its[r["iteration"]] = Iteration(r["iteration"], r["step"], "commit", step_s=r["time/step_s"], row=n)
    current = None
    for e in events:
        if e["event"] == "failure":
            current = its.setdefault(e["iteration"], Iteration(e["iteration"], e["step"], "interrupted"))
            current.failures += 1
            current.fraction = e.get("op_index", 0) / ops
        elif e["event"] == "rolled_back" and current is not None:
            current.restore_s = e["restore_s"]
        elif e["event"] == "rebuilt" and current is not None:
            current.rebuild_s += e["duration_s"]
        elif e["event"] == "step_discarded" and e["reason"] != "stage lost":
            its[e["iteration"]] = Iteration(e["iteration"], e["step"], "discarded")
    total = summary.get("iterations", max(its, default=-1) + 1)
    missing = [i for i in range(total) if i not in its]
    if missing:
        raise ValueError(f"{run_dir}: iterations {missing[:10]} are neither committed nor interrupted in the records")
    _attach_saves(run_dir, cfg, [its[i] for i in range(total)], events)
    return RecordedRun(str(run_dir), cfg, rows, events, summary, [its[i] for i in range(total)], ops, bool(swap))


def _attach_saves(run_dir, cfg: dict, its: list[Iteration], events: list[dict]) -> None:
    """Saves follow the commits that complete a multiple of ``checkpoint.every_steps`` steps, in order; the
    save of step 0 before the first iteration is not training time (the engine leaves it out of train_s)."""
    every = cfg["checkpoint"]["every_steps"]
    saves = [e["save_s"] for e in events if e["event"] == "checkpoint_save"]
    saves = saves[1:] if every else saves  # the first is the initial save of step 0
    commits = [it for it in its if it.kind == "commit" and every and (it.step + 1) % every == 0]
    if len(saves) != len(commits):
        raise ValueError(
            f"{run_dir}: {len(saves)} checkpoint saves after the start, but {len(commits)} commits complete a "
            f"multiple of checkpoint.every_steps={every}"
        )
    for it, save_s in zip(commits, saves):
        it.save_s = save_s


@dataclass
class Replay:
    """A recorded run re-timed: its wall-clock, where it went, and the time at each committed row."""

    run_dir: str
    wall_s: float
    recorded_train_s: float | None
    breakdown: dict[str, float]  # compute, interrupted, discarded, save, restore, rebuild, downtime
    row_times: list[float]  # wall-clock when each metrics.jsonl row was committed

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "row_times"}


def replay(
    run_dir,
    step_s: float | None = None,
    save_s: float | None = None,
    restore_s: float | None = None,
    downtime_s: float = 0.0,
    rebuild_s: float | None = None,
    payload_bytes: float | None = None,
    storage_mb_s: float | None = None,
) -> Replay:
    """Re-time the recorded trajectory of ``run_dir`` (or a ``RecordedRun``): the same iterations, commits,
    failures, saves and rollbacks, each costed anew. A cost left None is the run's own measurement, iteration
    by iteration, so ``replay(run_dir)`` reproduces the recorded ``time/train_s`` (up to bookkeeping such as
    edge replica refreshes). ``payload_bytes`` / ``storage_mb_s`` give the save and restore time as
    bytes / throughput (MB/s) unless given. An interrupted step costs the fraction of its ops it ran times
    the step time (the run's mean when ``step_s`` is None), a discarded one a whole step; every incident
    costs ``downtime_s`` plus its rebuilds and restore.
    """
    run = run_dir if isinstance(run_dir, RecordedRun) else load_run(run_dir)
    if storage_mb_s is not None and payload_bytes is not None:
        if storage_mb_s <= 0:
            raise ValueError(f"storage_mb_s={storage_mb_s} must be > 0")
        io_s = payload_bytes / (storage_mb_s * 1e6)
        save_s, restore_s = (io_s if save_s is None else save_s), (io_s if restore_s is None else restore_s)
    measured = [it.step_s for it in run.iterations if it.kind == "commit"]
    mean_step = step_s if step_s is not None else (sum(measured) / len(measured) if measured else 0.0)
    parts = dict.fromkeys(("compute", "interrupted", "discarded", "save", "restore", "rebuild", "downtime"), 0.0)
    row_times, clock = [], 0.0
    for it in run.iterations:
        if it.kind == "commit":
            cost = {"compute": it.step_s if step_s is None else step_s}
            if it.save_s is not None:
                cost["save"] = it.save_s if save_s is None else save_s
        elif it.kind == "discarded":
            cost = {"discarded": mean_step}
        else:
            cost = {"interrupted": it.fraction * mean_step, "downtime": downtime_s}
            cost["rebuild"] = it.rebuild_s if rebuild_s is None or not it.rebuild_s else rebuild_s
            if it.restore_s is not None:
                cost["restore"] = it.restore_s if restore_s is None else restore_s
        for k, v in cost.items():
            parts[k] += v
        clock += sum(cost.values())
        if it.kind == "commit":
            row_times.append(clock)
    return Replay(run.run_dir, clock, run.summary.get("train_s"), parts, row_times)


def val_curve(run: RecordedRun, times: list[float] | None = None) -> list[tuple[int, float, float]]:
    """(committed steps, validation loss, wall-clock) of every evaluated row, in the order they were written;
    wall-clock from ``times`` (a replay's ``row_times``) or the recorded ``time/train_s``."""
    return [(p.steps, p.loss, p.seconds) for p in runs.val_curve(run.rows, times)]


def steps_to_target(run: RecordedRun, target: float, times: list[float] | None = None) -> tuple[int, float] | None:
    """The first evaluated row whose validation loss is <= ``target``: (committed steps, wall-clock), or None
    when the run never got there."""
    p = runs.steps_to_target(runs.val_curve(run.rows, times), target)
    return None if p is None else (p.steps, p.seconds)


def recorded_debt(run: RecordedRun, sc: Scenario, until_step: float = math.inf) -> float:
    """The extra committed steps ``sc``'s q (its ramp and overlap included) charges a recorded run for its own
    rebuilt losses: every incident rebuilt in place (not rolled back) before committed step ``until_step``,
    each lost stage costing ``sc.loss_cost`` at the step it was lost and the iterations since the rebuilt
    incident before it, as ``simulate`` charges them."""
    debt, last = 0.0, -math.inf
    for it in run.iterations:
        if it.kind != "interrupted" or not it.failures or it.restore_s is not None:
            continue
        if it.step < until_step:
            debt += it.failures * float(sc.loss_cost(it.step, it.index - last))
        last = it.index
    return debt


def fit_q_overlap(
    unit_debt: np.ndarray, measured: np.ndarray, base_steps: np.ndarray | None = None
) -> tuple[float, int, float]:
    """The (q, tau, sigma) that fit measured extra steps best: ``unit_debt[i, j]`` is the debt of pair i for
    q = 1 at the j-th tau of a grid (``recorded_debt``); with ``base_steps`` (the failure-free run's steps to
    pair i's target) the swap tax sigma adds sigma * base_steps[i]. Both are linear, so for each tau (q, sigma)
    is non-negative least squares through the origin, and the tau with the least squared error wins.
    Returns (q, index of tau, sigma); sigma is 0 without ``base_steps``."""
    x, y = np.asarray(unit_debt, dtype=float), np.asarray(measured, dtype=float)
    b = np.zeros_like(y) if base_steps is None else np.asarray(base_steps, dtype=float)
    best = (math.inf, 0.0, 0, 0.0)
    for j in range(x.shape[1]):
        for q, sigma in _nonneg_lstsq2(x[:, j], b, y):
            err = float(((q * x[:, j] + sigma * b - y) ** 2).sum())
            if err < best[0] - 1e-12:
                best = (err, q, j, sigma)
    return best[1], best[2], best[3]


def _nonneg_lstsq2(u: np.ndarray, v: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
    """Candidates for min |a u + c v - y|^2 over a, c >= 0: the unconstrained solution when it is feasible,
    and each one-variable fit with the other at 0 (the constrained optimum is among them)."""
    uu, vv, uv, uy, vy = (u @ u), (v @ v), (u @ v), (u @ y), (v @ y)
    out = [(max(uy / uu, 0.0) if uu > 0 else 0.0, 0.0), (0.0, max(vy / vv, 0.0) if vv > 0 else 0.0)]
    det = uu * vv - uv * uv
    if det > 1e-12 * max(uu * vv, 1e-300):
        a, c = (vv * uy - uv * vy) / det, (uu * vy - uv * uy) / det
        if a >= 0 and c >= 0:
            out.append((a, c))
    return out


def run_scenario(
    run: RecordedRun,
    target_steps: float,
    q: float = 0.0,
    downtime_s: float | None = None,
    q_full_step: float = 0.0,
    q_overlap_iterations: float = 0.0,
    swap_tax: float = 0.0,
) -> Scenario:
    """The ``Scenario`` a recorded run measured: mean step, save and restore times, the mean point where
    failures interrupted a step, and its per-stage failure probability (the configured one for ``per_step``
    and ``hourly`` failures without ``neighbour_prob``, else the realised failures per iteration and stage).
    ``downtime_s`` None: the run's mean rebuild time per incident (the engine replaces a stage at once)."""
    f, its = run.config["failures"], run.iterations
    correlated = bool(f.get("neighbour_prob"))  # the configured p leaves out the neighbours lost with a failure
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    step_s = mean([it.step_s for it in its if it.kind == "commit"])
    hit = [it for it in its if it.kind == "interrupted"]
    stages = len(f["stages"]) if f.get("stages") else run.config["model"]["num_stages"]
    if f["mode"] == "per_step" and not correlated:
        p = f["per_step_prob"]
    elif f["mode"] == "hourly" and not correlated:
        p = per_step_probability(f["hourly_rate"], f.get("iteration_time_s") or step_s, f["time_acceleration"])
    else:
        p = sum(it.failures for it in hit) / (len(its) * stages) if its else 0.0
    return Scenario(
        target_steps=target_steps,
        step_s=step_s,
        stage_fail_prob=p,
        num_stages=stages,
        save_s=mean([it.save_s for it in its if it.save_s is not None]),
        restore_s=mean([it.restore_s for it in hit if it.restore_s is not None]),
        downtime_s=mean([it.rebuild_s for it in hit]) if downtime_s is None else downtime_s,
        q=q,
        interrupt_fraction=mean([it.fraction for it in hit]) if hit else 0.5,
        q_full_step=q_full_step,
        q_overlap_iterations=q_overlap_iterations,
        swap_tax=swap_tax,
    )
