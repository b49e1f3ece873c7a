"""The cost model (checkfree.analysis.costmodel) and scripts/whatif.py: the closed forms against hand computations
and against the Monte-Carlo simulation of the same model, their limits, the break-even save time, the replay
of a real recorded run, and the script end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkfree.analysis import costmodel as cm
from checkfree.engine.trainer import Trainer
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def scenario(**kw) -> cm.Scenario:
    base = dict(target_steps=300, step_s=1.0, stage_fail_prob=0.01, num_stages=4, save_s=3.0, restore_s=2.0)
    return cm.Scenario(**(base | dict(downtime_s=5.0, q=4.0) | kw))


# ---- intervals --------------------------------------------------------------------------------------
def test_young_and_daly_intervals_match_a_hand_computation():
    # C = 60 s, T = 10 s, lambda = 0.01 failures per step: M = T / lambda = 1000 s
    assert cm.young_interval_steps(60, 10, 0.01) == pytest.approx(math.sqrt(1200), rel=1e-12)  # 34.64 steps
    # Daly: sqrt(2 * 60 * 1000) * (1 + sqrt(0.03) / 3 + 0.03 / 9) - 60 = 307.565 s = 30.7565 steps
    assert cm.daly_interval_steps(60, 10, 0.01) == pytest.approx(30.7565, rel=1e-4)
    assert cm.daly_interval_steps(3000, 10, 0.01) == pytest.approx(100.0)  # C >= 2M: the MTBF itself
    assert cm.young_interval_steps(60, 10, 0.0) == math.inf


def test_the_exact_optimal_interval_is_youngs_when_failures_are_rare():
    sc = scenario(target_steps=1e6, stage_fail_prob=1e-5, save_s=10.0)
    young = cm.young_interval_steps(sc.save_s, sc.step_s, sc.failures_per_step)  # 707 steps
    assert abs(cm.optimal_interval(sc) - young) <= 0.02 * young
    costs = {k: cm.expected_time(sc, cm.checkpointing(k)) for k in (300, cm.optimal_interval(sc), 1500)}
    assert min(costs, key=costs.get) == cm.optimal_interval(sc)


# ---- closed form against Monte-Carlo ---------------------------------------------------------------
@pytest.mark.parametrize(
    "policy",
    [cm.checkpointing(10), cm.checkpointing(3), cm.checkfree(), cm.hybrid(5, 0.3), cm.hybrid(20, 0.8)],
    ids=lambda p: f"{p.name}-{p.interval}-{p.p_unrecoverable}",
)
@pytest.mark.parametrize("p", [0.002, 0.02])
def test_closed_form_agrees_with_the_monte_carlo_simulation(policy, p):
    sc = scenario(stage_fail_prob=p)
    times = cm.simulate(sc, policy, runs=2000, seed=1)
    assert np.isfinite(times).all()
    sem = times.std(ddof=1) / math.sqrt(times.size)
    expected = cm.expected_time(sc, policy)
    # 4 standard errors, plus 1% for the hybrid's approximation and the last step's overshoot of a fractional q
    assert abs(times.mean() - expected) <= 4 * sem + 0.01 * expected, (times.mean(), sem, expected)


def test_q_that_grows_with_progress_agrees_with_the_simulation():
    """q_full_step F: a loss at step s costs q min(1, s / F). Losses before F cost less, so the target comes
    sooner than with q at every step, and the closed form (the debt integrated over the steps) agrees with
    the Monte-Carlo simulation of the same model, below F and past it."""
    assert cm._steps_needed(100.0, 0.5, 0.0) == pytest.approx(200.0)  # flat: S / (1 - g)
    n = cm._steps_needed(100.0, 0.5, 1000.0)  # all before F: N = S + g N^2 / 2F
    assert n == pytest.approx(100.0 + 0.5 * n * n / 2000.0) and n < 1000.0
    assert cm._steps_needed(300.0, 0.5, 100.0) == pytest.approx((300.0 - 25.0) / 0.5)  # past F
    assert cm._steps_needed(300.0, 1.0, 100.0) == math.inf  # past F the debt outruns the progress
    flat, ramp = scenario(q=12.0), scenario(q=12.0, q_full_step=200.0)
    assert cm.expected_time(ramp, cm.checkfree()) < cm.expected_time(flat, cm.checkfree())
    for p, q in ((0.002, 12.0), (0.02, 6.0)):
        sc = scenario(q=q, q_full_step=200.0, stage_fail_prob=p)
        times = cm.simulate(sc, cm.checkfree(), runs=2000, seed=2)
        sem, expected = times.std(ddof=1) / math.sqrt(times.size), cm.expected_time(sc, cm.checkfree())
        assert np.isfinite(times).all()
        assert abs(times.mean() - expected) <= 4 * sem + 0.02 * expected, (times.mean(), sem, expected)
    with pytest.raises(ValueError, match="q_full_step=-1"):
        scenario(q_full_step=-1.0)


def test_the_overlap_share_is_the_mean_discount_of_a_geometric_gap():
    """q_overlap_iterations tau: a rebuilt incident J iterations after the previous rebuilt one costs
    q (1 - exp(-J / tau)); J is geometric with r = h (1 - u), so the mean share is 1 - r z / (1 - (1 - r) z),
    about 1 / (1 + lambda tau) when rare."""
    assert scenario().overlap_share() == 1.0  # off
    sc = scenario(q_overlap_iterations=50.0, stage_fail_prob=0.001)
    for u in (0.0, 0.4):
        r, z = sc.incident_prob * (1 - u), math.exp(-1 / 50.0)
        js = np.arange(1, 200_000)
        by_sum = float((r * (1 - r) ** (js - 1) * -np.expm1(-js / 50.0)).sum())
        assert sc.overlap_share(u) == pytest.approx(by_sum, rel=1e-9)
        assert sc.overlap_share(u) == pytest.approx(1 - r * z / (1 - (1 - r) * z))
    assert sc.overlap_share() == pytest.approx(1 / (1 + sc.failures_per_step * 50.0), rel=0.03)
    assert sc.loss_cost(10, math.inf) == sc.q and sc.loss_cost(10, 50.0) == pytest.approx(sc.q * (1 - math.exp(-1)))
    with pytest.raises(ValueError, match="q_overlap_iterations=-1"):
        scenario(q_overlap_iterations=-1.0)


@pytest.mark.parametrize("full", [0.0, 50.0, 300.0])
@pytest.mark.parametrize("u", [0.0, 0.3])
def test_the_early_incidents_excess_is_its_direct_sum(full, u):
    """_first_loss_extra against the sum it stands for, iteration by iteration, including runs far longer
    than the ramp: q c (1 - phi) sum_t r min(1, a t) y^t over the T iterations of the run."""
    sc = scenario(q=30.0, q_overlap_iterations=100.0, q_full_step=full, stage_fail_prob=0.0005, target_steps=10_000)
    pol = cm.hybrid(5, u) if u else cm.checkfree()
    h = sc.incident_prob
    r = h * (1 - u)
    y = (1 - r) * math.exp(-1 / 100.0)
    steps = 10_000.0
    t = np.arange(int(round(steps / (1 - h))))
    ramp = np.minimum(1.0, t * (1 - h) / full) if full else np.ones(t.size)
    direct = sc.q * (sc.failures_per_step / h) * (1 - sc.overlap_share(u)) * r * float((ramp * y**t).sum())
    assert cm._first_loss_extra(sc, pol, steps) == pytest.approx(direct, rel=0.01)


@pytest.mark.parametrize(
    "q, tau, full", [(4.0, 20.0, 0.0), (30.0, 100.0, 0.0), (12.0, 50.0, 0.0), (30.0, 100.0, 300.0)]
)
@pytest.mark.parametrize("p", [0.002, 0.02])
def test_overlapping_losses_agree_with_the_simulation_and_cost_less(q, tau, full, p):
    """Closed form (stationary share, and the excess of the early incidents with fewer before them) against
    the Monte-Carlo of the same model, for CheckFree and the hybrid; overlap only ever lowers the time."""
    for policy in (cm.checkfree(), cm.hybrid(5, 0.3)):
        sc = scenario(q=q, q_overlap_iterations=tau, q_full_step=full, stage_fail_prob=p)
        times = cm.simulate(sc, policy, runs=2000, seed=5)
        assert np.isfinite(times).all()
        sem, expected = times.std(ddof=1) / math.sqrt(times.size), cm.expected_time(sc, policy)
        assert abs(times.mean() - expected) <= 4 * sem + 0.01 * expected, (policy.name, times.mean(), sem, expected)
        assert expected < cm.expected_time(scenario(q=q, q_full_step=full, stage_fail_prob=p), policy)


def test_large_overlapping_q_stays_within_three_percent_of_the_simulation():
    """The regime a fit on the bench sweeps lands in (q ~ 100, tau ~ 170): the closed form's use of the mean
    run length for the early incidents' excess leaves it a little pessimistic, within 3%."""
    for full in (0.0, 300.0):
        sc = scenario(q=100.0, q_overlap_iterations=170.0, q_full_step=full, stage_fail_prob=0.01)
        times = cm.simulate(sc, cm.checkfree(), runs=2000, seed=6)
        expected = cm.expected_time(sc, cm.checkfree())
        assert 0.0 <= expected / times.mean() - 1.0 <= 0.03 + 4 * times.std(ddof=1) / math.sqrt(times.size) / expected


def test_recorded_debt_charges_each_loss_its_discounted_q():
    its = [cm.Iteration(i, i, "commit") for i in range(30)]
    for index, step, lost in ((3, 3, 1), (5, 4, 2), (20, 18, 1)):
        its[index] = cm.Iteration(index, step, "interrupted", failures=lost)
    its[12] = cm.Iteration(12, 11, "interrupted", failures=2, restore_s=1.0)  # rolled back: no debt, no gap
    run = cm.RecordedRun("synthetic", {}, [], [], {}, its, 10)
    sc = scenario(q=10.0, q_overlap_iterations=4.0)
    first_two = 10.0 + 2 * 10.0 * (1 - math.exp(-2 / 4))
    assert cm.recorded_debt(run, sc, until_step=10) == pytest.approx(first_two)
    assert cm.recorded_debt(run, sc) == pytest.approx(first_two + 10.0 * (1 - math.exp(-15 / 4)))
    assert cm.recorded_debt(run, scenario(q=10.0)) == pytest.approx(40.0)  # no overlap: q per lost stage
    ramp = scenario(q=10.0, q_full_step=8.0)
    assert cm.recorded_debt(run, ramp) == pytest.approx(10 * 3 / 8 + 2 * 10 * 4 / 8 + 10.0)


def test_the_fit_recovers_the_q_tau_and_swap_tax_that_made_the_debts():
    """Runs whose measured extra steps are exactly the swap tax on their failure-free steps plus the model's
    debt for q = 40 and a tau on the grid, at rates from rare to frequent: the fit finds all three; without
    the tax, or with every loss costing its whole q, it cannot fit them."""
    grid = [0.0, 5.0, 20.0, 60.0, 200.0]
    rng = np.random.default_rng(0)
    runs, base = [], []
    for p in (0.002, 0.01, 0.05):
        for _ in range(4):
            its = [
                cm.Iteration(i, i, "interrupted", failures=1) if rng.random() < p else cm.Iteration(i, i, "commit")
                for i in range(300)
            ]
            runs.append(cm.RecordedRun("synthetic", {}, [], [], {}, its, 10))
            base.append(float(rng.integers(150, 300)))
    unit = np.array([[cm.recorded_debt(r, scenario(q=1.0, q_overlap_iterations=t)) for t in grid] for r in runs])
    debt = np.array([cm.recorded_debt(r, scenario(q=40.0, q_overlap_iterations=20.0)) for r in runs])
    measured = debt + 0.25 * np.array(base)
    q, j, sigma = cm.fit_q_overlap(unit, measured, np.array(base))
    assert q == pytest.approx(40.0, rel=1e-6) and grid[j] == 20.0 and sigma == pytest.approx(0.25, rel=1e-6)
    q_nt, j_nt, sigma_nt = cm.fit_q_overlap(unit, measured)
    assert sigma_nt == 0.0 and ((q_nt * unit[:, j_nt] - measured) ** 2).sum() > 10.0
    q0, _, _ = cm.fit_q_overlap(unit[:, :1], debt)  # no overlap: the best single q
    assert ((q0 * unit[:, 0] - debt) ** 2).sum() > 10.0


def test_the_swap_tax_lengthens_the_rebuilding_strategies_only():
    """swap_tax sigma: CheckFree(+) and the hybrid need S (1 + sigma) steps (their swapped schedule trains
    less per step), checkpointing S; the closed form still agrees with the simulation."""
    plain, taxed = scenario(stage_fail_prob=0.0), scenario(stage_fail_prob=0.0, swap_tax=0.2)
    assert cm.expected_time(taxed, cm.checkfree()) == pytest.approx(360.0)
    assert cm.expected_time(taxed, cm.hybrid(7, 0.5)) == pytest.approx(360.0)
    assert cm.expected_time(taxed, cm.checkpointing(7)) == cm.expected_time(plain, cm.checkpointing(7))
    sc = scenario(q=6.0, q_overlap_iterations=20.0, swap_tax=0.25, stage_fail_prob=0.01)
    for policy in (cm.checkfree(), cm.hybrid(5, 0.3)):
        times = cm.simulate(sc, policy, runs=2000, seed=7)
        sem, expected = times.std(ddof=1) / math.sqrt(times.size), cm.expected_time(sc, policy)
        assert abs(times.mean() - expected) <= 4 * sem + 0.01 * expected, (policy.name, times.mean(), expected)
    with pytest.raises(ValueError, match="swap_tax=-0.1"):
        scenario(swap_tax=-0.1)


def test_the_simulation_is_seeded():
    sc = scenario()
    a, b = cm.simulate(sc, cm.checkfree(), runs=50, seed=3), cm.simulate(sc, cm.checkfree(), runs=50, seed=3)
    assert (a == b).all() and not (a == cm.simulate(sc, cm.checkfree(), runs=50, seed=4)).all()


def test_a_checkfree_that_cannot_keep_up_never_arrives():
    sc = scenario(stage_fail_prob=0.1, q=10.0)  # 4 stages x 0.1 x 10 extra steps > 1 step per step
    assert cm.expected_time(sc, cm.checkfree()) == math.inf
    assert np.isinf(cm.simulate(sc, cm.checkfree(), runs=5)).all()
    assert cm.break_even_save_s(sc) == math.inf


# ---- limits ---------------------------------------------------------------------------------------
def test_without_failures_checkfree_takes_s_steps_and_checkpointing_adds_its_saves():
    sc = scenario(stage_fail_prob=0.0)
    assert cm.expected_time(sc, cm.checkfree()) == pytest.approx(300.0)
    assert cm.expected_time(sc, cm.hybrid(7, 0.5)) == pytest.approx(300.0)  # asynchronous saves: no stall
    assert cm.expected_time(sc, cm.checkpointing(7)) == pytest.approx(300.0 + (300 // 7) * 3.0)
    assert cm.optimal_interval(sc) > 300  # with nothing to lose, never save
    assert cm.expected_time(sc, cm.checkpointing(cm.optimal_interval(sc))) == pytest.approx(300.0)


def test_free_saves_leave_checkpointing_only_the_lost_work():
    sc = scenario(save_s=0.0)
    h = sc.incident_prob
    # every step saved: an incident loses only the interrupted step, the downtime and the restore
    lost_per_incident = sc.interrupt_fraction * sc.step_s + sc.downtime_s + sc.restore_s
    assert cm.optimal_interval(sc) == 1
    best = cm.expected_time(sc, cm.checkpointing(1))
    assert best == pytest.approx(300 * sc.step_s + 300 * h / (1 - h) * lost_per_incident)
    # and with nothing lost per incident either, failures cost nothing
    free = scenario(save_s=0.0, restore_s=0.0, downtime_s=0.0, interrupt_fraction=0.0)
    assert cm.expected_time(free, cm.checkpointing(1)) == pytest.approx(300.0)


def test_checkfree_closed_form_matches_the_hand_formula():
    sc = scenario()
    h, lam = sc.incident_prob, sc.failures_per_step
    steps = 300 / (1 - sc.q * lam / (1 - h))
    per_step = sc.step_s + h / (1 - h) * (sc.interrupt_fraction * sc.step_s + sc.downtime_s)
    assert cm.expected_time(sc, cm.checkfree()) == pytest.approx(steps * per_step)


def test_adjacent_loss_fraction_counts_neighbouring_pairs():
    p = 0.1  # 3 stages: incidents with 0-1 or 1-2 both lost, over incidents
    adjacent = 2 * p * p * (1 - p) + p**3
    assert cm.adjacent_loss_fraction(p, 3) == pytest.approx(adjacent / (1 - (1 - p) ** 3))
    assert cm.adjacent_loss_fraction(p, 1) == 0.0


# ---- break-even -----------------------------------------------------------------------------------
def test_break_even_grows_with_the_failure_rate_and_q():
    by_p = [cm.break_even_save_s(scenario(target_steps=1e5, stage_fail_prob=p)) for p in (1e-4, 1e-3, 5e-3)]
    by_q = [cm.break_even_save_s(scenario(target_steps=1e5, stage_fail_prob=1e-3, q=q)) for q in (2, 4, 8, 16)]
    assert by_p == sorted(by_p) and len(set(by_p)) == 3
    assert by_q == sorted(by_q) and len(set(by_q)) == 4


def test_break_even_separates_the_winners_and_tends_to_the_first_order_formula():
    sc = scenario(target_steps=1e5, stage_fail_prob=1e-3)
    c = cm.break_even_save_s(sc)
    for factor, checkfree_wins in ((0.8, False), (1.25, True)):
        s = cm.Scenario(**{**sc.__dict__, "save_s": c * factor})
        ckpt = cm.expected_time(s, cm.checkpointing(cm.optimal_interval(s)))
        assert (cm.expected_time(s, cm.checkfree()) < ckpt) == checkfree_wins
    rare = scenario(target_steps=1e7, stage_fail_prob=1e-5, restore_s=0.0, q=20.0)
    approx = cm.break_even_save_s_approx(rare.failures_per_step, rare.q, rare.step_s, rare.restore_s)
    assert cm.break_even_save_s(rare) == pytest.approx(approx, rel=0.05)
    # the lambda q^2 T / 2 is its q >> 1 form
    assert approx == pytest.approx(rare.failures_per_step * 20.5**2 / 2)
    assert cm.break_even_save_s(scenario(restore_s=10.0, q=1.0)) == 0.0  # a rebuild beats a restore alone


# ---- replay of a real run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two ~20-step runs with the same failures: checkpointing (rollbacks, saves) and CheckFree+ (rebuilds)."""
    out = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, extra in (
        ("ckpt", ["recovery.strategy=checkpoint", "checkpoint.every_steps=4", "checkpoint.storage_mb_s=20"]),
        ("cfp", ["recovery.strategy=checkfree_plus"]),
    ):
        cfg = tiny_config(
            out, *extra, "num_steps=20", "eval_every_steps=5", "failures.mode=per_step", "failures.per_step_prob=0.04"
        )
        cfg.run_name = name
        Trainer(cfg).run()
        runs[name] = out / name
    return runs


@pytest.mark.parametrize("name", ["ckpt", "cfp"])
def test_replay_with_the_runs_own_costs_reproduces_its_train_time(recorded, name):
    run = cm.load_run(recorded[name])
    assert any(it.kind == "interrupted" for it in run.iterations)  # the run did lose stages
    if name == "ckpt":
        assert any(it.restore_s is not None for it in run.iterations)
        assert any(it.save_s is not None for it in run.iterations)
    r = cm.replay(run)
    assert r.wall_s == pytest.approx(run.summary["train_s"], rel=0.10)
    assert r.row_times[-1] <= r.wall_s + 1e-9


def test_replay_under_other_costs_counts_every_commit_save_rollback_and_incident(recorded):
    run = cm.load_run(recorded["ckpt"])
    its = run.iterations
    commits = [it for it in its if it.kind == "commit"]
    hit = [it for it in its if it.kind == "interrupted"]
    lost = sum(e["lost_steps"] for e in run.events if e["event"] == "rolled_back")
    assert len(commits) == run.summary["steps"] + lost and len(its) == run.summary["iterations"]
    r = cm.replay(run, step_s=10.0, save_s=2.0, restore_s=3.0, downtime_s=4.0)
    assert r.breakdown["compute"] == pytest.approx(10.0 * len(commits))
    assert r.breakdown["save"] == pytest.approx(2.0 * sum(it.save_s is not None for it in its))
    assert r.breakdown["restore"] == pytest.approx(3.0 * len(hit))
    assert r.breakdown["downtime"] == pytest.approx(4.0 * len(hit))
    assert r.breakdown["interrupted"] == pytest.approx(10.0 * sum(it.fraction for it in hit))
    # bytes over throughput instead of a save time
    assert cm.replay(run, payload_bytes=4e6, storage_mb_s=2.0).breakdown["save"] == pytest.approx(
        2.0 * sum(it.save_s is not None for it in its)
    )


def test_steps_to_target_reads_the_first_row_at_or_below_it(recorded):
    run = cm.load_run(recorded["ckpt"])
    curve = cm.val_curve(run)
    steps, loss, t = curve[1]
    first = next(s for s, v, _ in curve if v <= loss)
    assert cm.steps_to_target(run, loss)[0] == first <= steps
    assert cm.steps_to_target(run, -1.0) is None
    times = cm.replay(run, step_s=1.0).row_times
    assert cm.steps_to_target(run, loss, times)[1] == pytest.approx(
        next(tt for s, v, tt in cm.val_curve(run, times) if v <= loss)
    )


def test_a_directory_without_metrics_is_refused_by_name(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ValueError, match="metrics.jsonl"):
        cm.load_run(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        cm.load_run(tmp_path / "nope")


# ---- the script -----------------------------------------------------------------------------------
def _whatif(tmp_path, *args) -> dict:
    out = tmp_path / "whatif.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "whatif.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_whatif_script_end_to_end(tmp_path):
    q = {"table": {"plus/2": {"q@50": {"estimate": 3.0, "low": 1.0, "high": 6.0, "n": 3}}}}
    (tmp_path / "q.json").write_text(json.dumps(q))
    small = ["--model-bytes", "1e8", "--step-s", "1", "--num-stages", "4", "--target-steps", "200"]
    grid = ["--map-storage", "10", "1000", "3", "--map-rates", "0.05", "0.5", "3", "--acceleration", "100"]
    args = [*small, *grid, "--hourly-rate", "0.1", "--storage-mb-s", "100", "--mc-runs", "50", "--intervals", "5"]
    result = _whatif(tmp_path, "map", *args, "--q-json", "q.json", "--q-key", "plus/2", "--q-at", "50")
    assert result["q"] == [3.0, 1.0, 6.0]
    (pt,) = result["points"]
    assert set(pt["strategies"]) >= {"checkpoint", "checkfree", "hybrid", "checkpoint@young", "checkpoint@5"}
    assert pt["winner"] in ("checkpoint", "checkfree", "hybrid") and pt["margin"] >= 1.0
    assert len(result["map"]["winner"]) == 3 and len(result["map"]["winner"][0]) == 3
    assert (tmp_path / "whatif.png").stat().st_size > 0


def test_whatif_replay_and_validate_modes(tmp_path, recorded):
    runs = [str(recorded["ckpt"]), str(recorded["cfp"])]
    rep = _whatif(tmp_path, "replay", *runs, "--step-s", "2", "--storage-mb-s", "10", "--downtime-s", "1")
    assert [r["run_dir"] for r in rep["replay"]] == runs and rep["replay"][0]["retimed"][0]["wall_s"] > 0
    val = _whatif(tmp_path, "validate", *runs, "--q", "2")
    first, second = val["validate"]["runs"]
    assert first["measured_ratio"] == 1.0 and first["predicted_ratio"] == 1.0 and first["null_ratio"] == 1.0
    assert second["null_ratio"] > 0  # the null predictor beside the model, from the runs' own seconds per iteration
    assert second["measured_ratio"] > 0 and second["predicted_ratio"] > 0


@pytest.mark.long  # ~45 s (seven engine runs, the fit's bootstrap); --validate-sweep runs in the default run
def test_whatif_fits_the_overlap_on_a_sweep(tmp_path):
    """--fit-overlap on a runs-dir laid out as bench_convergence.py writes it: the failure-free run of a seed
    and CheckFree+ at three failure rates. The fitted (q, tau) family holds tau = 0 with the best q, so its
    error is at most that one's; the measured extra steps are the runs' own."""
    runs = tmp_path / "sweep"
    common = ["num_steps=24", "eval_every_steps=2", "seed=0"]
    Trainer(_named(tiny_config(runs, *common, "recovery.strategy=none"), "none-s0")).run()
    for p in (0.02, 0.05, 0.1):
        draws = ["failures.mode=per_step", f"failures.per_step_prob={p}"]
        Trainer(
            _named(tiny_config(runs, *common, *draws, "recovery.strategy=checkfree_plus"), f"checkfree_plus-r{p}-s0")
        ).run()
        ckpt = ["recovery.strategy=checkpoint", "checkpoint.every_steps=4"]
        Trainer(_named(tiny_config(runs, *common, *draws, *ckpt), f"checkpointK4-r{p}-s0")).run()
    fit = _whatif(tmp_path, "fit-overlap", str(runs), "checkfree_plus", "--q", "2")["fit_overlap"]
    assert len(fit["pairs"]) == 3 and fit["given_q"] == 2.0
    assert fit["q"]["estimate"] >= 0 and fit["tau"]["estimate"] >= 0 and fit["swap_tax"]["estimate"] >= 0
    assert len(fit["samples"]) == 200 and all(len(x) == 3 for x in fit["samples"])
    assert all(p["swap"] for p in fit["pairs"])  # CheckFree+ trains on the swapped schedule
    assert fit["rmse"]["fitted"] <= fit["rmse"]["best_q_no_overlap"] + 1e-9
    ref = cm.load_run(runs / "none-s0")
    for pair in fit["pairs"]:
        mine = cm.load_run(runs / f"checkfree_plus-{pair['pair']}")
        want = cm.steps_to_target(mine, pair["target_loss"])[0] - cm.steps_to_target(ref, pair["target_loss"])[0]
        assert pair["measured_extra_steps"] == want
    assert "Overlap fit" in (tmp_path / "whatif.md").read_text()
    # the fit validated on a sweep: the ranges come from its bootstrap samples
    (tmp_path / "fit.json").write_text((tmp_path / "whatif.json").read_text())
    val = _whatif(tmp_path, "validate-sweep", str(runs), "checkpoint:4", "checkfree_plus", "--overlap-fit", "fit.json")
    pairs = val["validate_sweep"]["pairs"]
    null = val["validate_sweep"]["null"]
    assert null["model"]["pairs"] == null["null"]["pairs"] == 3 and "the null predictor" in null["verdict"]
    assert all(p["null_ratio"] > 0 for p in pairs)
    assert len(pairs) == 3 and all(lo <= hi for lo, hi in (p["predicted_range"] for p in pairs))
    assert val["validate_sweep"]["q_overlap_iterations"] == fit["tau"]["estimate"]
    assert "bootstrap (q, tau, sigma) samples" in (tmp_path / "whatif.md").read_text()
    grid = ["--map-storage", "10", "1000", "2", "--map-rates", "0.05", "0.5", "2", "--mc-runs", "0"]
    small = ["--model-bytes", "1e8", "--step-s", "1", "--num-stages", "4", "--target-steps", "200"]
    mapped = _whatif(tmp_path, "map", *small, *grid, "--storage-mb-s", "100", "--overlap-fit", "fit.json")
    assert mapped["q"][0] == fit["q"]["estimate"] and len(mapped["map"]["resolved"]) == 2
    both = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "whatif.py"), "map", "--overlap-fit", "fit.json", "--q", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert both.returncode != 0 and "give none of them with it" in both.stderr
    for bad, why in (("missing.json", "no such file"), ("whatif.json", "no fit_overlap result in it")):
        refused = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "whatif.py"), "map", "--overlap-fit", bad],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert refused.returncode != 0 and why in refused.stderr, refused.stderr


def _named(cfg, name: str):
    cfg.run_name = name
    return cfg
