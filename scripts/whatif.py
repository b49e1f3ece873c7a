"""What if: when does CheckFree beat checkpointing? (checkfree.analysis.costmodel)

Expected wall-clock to a target of S committed steps for checkpointing (at the exact optimal interval, at
Young's and Daly's, and at ``--intervals``), CheckFree(+) (each lost stage costs q extra steps) and the hybrid
(CheckFree plus asynchronous checkpoints that ``--p-unrecoverable`` of the incidents roll back to; by default
the share of incidents that lose two neighbouring stages), at each ``--hourly-rate`` x ``--storage-mb-s``
point, checked against the seeded Monte-Carlo simulation of the same model (``--mc-runs``), with the
break-even save time. Saves and restores move the whole training state (weights and Adam moments: 3x the
parameter bytes) at the storage throughput. Then a map of the winner over storage throughput x failure
rate, with the margin (the runner-up's time over the winner's) in each cell; with an interval for q (three
``--q`` values, or ``--q-json`` from scripts/measure_q.py), cells whose winner differs between q's low and
high ends are marked "not resolved". Defaults: the paper's medium model (~500M parameters, 91.3 s steps,
6 stages, ~30 s to replace a stage). Prints a table, saves JSON and a PNG next to it.

    python scripts/whatif.py --q 30 --out runs/whatif/whatif.json
    python scripts/whatif.py --q-json docs/results/q_bench.json --q-key plus/2 --q-at 50 --from-run runs/bench
    python scripts/whatif.py --replay runs/a runs/b --step-s 91.3 --storage-mb-s 500 --downtime-s 30
    python scripts/whatif.py --validate runs/ckpt runs/cfplus --q 12 --target-loss 2.6
    python scripts/whatif.py --fit-overlap runs/bench/overlap-fit-runs checkfree_plus --q 21 --q-full-step 300

``--replay`` re-times recorded engine runs (their own trajectory of commits, failures, saves and rollbacks)
under the given step, save, restore and downtime costs (any left out: the run's own). ``--validate`` takes
runs recorded with ``checkpoint.storage_mb_s`` emulation, one of them with ``recovery.strategy`` checkpoint
or none (its steps to the target are the failure-free ones), and compares each run's measured time to the
target loss, relative to the first run, with the model's prediction from the runs' own measurements.
``--fit-overlap`` fits q and ``--q-overlap-iterations`` (losses that follow each other closely cost less than
one q each) on a convergence sweep with failure-free runs, to be validated on another sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from checkfree.analysis import costmodel as cm
from checkfree.analysis.stats import bootstrap
from checkfree.core.metrics import report
from checkfree.plot import save_figure

STRATEGIES = ("checkpoint", "checkfree", "hybrid")
COLORS = ("#4c72b0", "#55a868", "#dd8452")
PAPER_MEDIUM = {"param_bytes": 500e6 * 4, "step_s": 91.3, "num_stages": 6, "downtime_s": 30.0}


def q_interval(ns) -> tuple[float, float, float]:
    """(estimate, low, high) of q: from ``--q-json`` (measure_q's table[KEY]["q@K"]) or ``--q`` (one value; or
    the first as the estimate and the others' range as the interval)."""
    if ns.q_json:
        table = json.loads(Path(ns.q_json).read_text()).get("table", {})
        cell = table.get(ns.q_key, {}).get(f"q@{ns.q_at}")
        if cell is None:
            have = {k: [f for f in v if f.startswith("q@")] for k, v in table.items()}
            raise SystemExit(f"--q-json {ns.q_json}: no table[{ns.q_key!r}]['q@{ns.q_at}']; it has {have}")
        if not cell.get("n"):
            raise SystemExit(f"--q-json {ns.q_json}: {ns.q_key} q@{ns.q_at} has no seed that reached the target")
        return cell["estimate"], cell["low"], cell["high"]
    if not ns.q:
        raise SystemExit("give q, the extra steps per rebuilt stage: --q Q [LOW HIGH], or --q-json PATH --q-key M/S")
    if any(not (q >= 0) for q in ns.q):
        raise SystemExit(f"--q {ns.q}: expected numbers >= 0")
    return ns.q[0], min(ns.q), max(ns.q)


def base_parameters(ns) -> dict:
    """Model bytes, step time and stages: given, else from ``--from-run`` (its summary and measurements),
    else the paper's medium model."""
    base = {**PAPER_MEDIUM, "payload_bytes": 3 * PAPER_MEDIUM["param_bytes"]}
    if ns.from_run:
        run = cm.load_run(ns.from_run)
        if "memory/param_bytes" not in run.summary:
            raise SystemExit(f"--from-run {ns.from_run}: summary.json has no memory/param_bytes (an unfinished run?)")
        sc = cm.run_scenario(run, 1)
        base |= {"payload_bytes": 3 * run.summary["memory/param_bytes"], "step_s": sc.step_s}
        base |= {"num_stages": run.config["model"]["num_stages"], "downtime_s": sc.downtime_s}
    given = {"payload_bytes": ns.model_bytes, "step_s": ns.step_s, "num_stages": ns.num_stages}
    base |= {k: v for k, v in given.items() if v is not None}
    return base | ({} if ns.downtime_s is None else {"downtime_s": ns.downtime_s})


def scenario(ns, base: dict, rate: float, mb_s: float, q: float) -> cm.Scenario:
    io_s = base["payload_bytes"] / (mb_s * 1e6)
    p = cm.per_step_probability(rate, ns.iteration_s or base["step_s"], ns.acceleration)
    return cm.Scenario(
        target_steps=ns.target_steps,
        step_s=base["step_s"],
        stage_fail_prob=p,
        num_stages=base["num_stages"],
        save_s=io_s,
        restore_s=io_s if ns.restore_s is None else ns.restore_s,
        downtime_s=base["downtime_s"],
        q=q,
        interrupt_fraction=ns.interrupt_fraction,
        q_full_step=ns.q_full_step,
        q_overlap_iterations=ns.q_overlap_iterations,
        swap_tax=ns.swap_tax,
    )


def policies(ns, sc: cm.Scenario) -> dict[str, cm.Policy]:
    """The three strategies at their best settings: checkpointing at its exact optimal interval; the hybrid
    saving as often as a save can finish before the next one starts (or ``--async-every``)."""
    u = ns.p_unrecoverable
    u = cm.adjacent_loss_fraction(sc.stage_fail_prob, sc.num_stages) if u is None else u
    every = max(ns.async_every or 1, math.ceil(sc.save_s / sc.step_s))
    return {
        "checkpoint": cm.checkpointing(cm.optimal_interval(sc)),
        "checkfree": cm.checkfree(),
        "hybrid": cm.hybrid(every, u),
    }


def winner(times: dict[str, float]) -> tuple[str, float]:
    """The fastest strategy and its margin: the runner-up's time over the winner's."""
    order = sorted(times, key=times.get)
    best, second = times[order[0]], times[order[1]]
    return order[0], (second / best if math.isfinite(best) else math.nan)  # inf: only the winner gets there


def point(ns, base: dict, rate: float, mb_s: float, qs: tuple[float, float, float]) -> dict:
    """Every strategy's expected time at one (failure rate, throughput), Monte-Carlo checks, break-even."""
    sc = scenario(ns, base, rate, mb_s, qs[0])
    pols = policies(ns, sc)
    lam = sc.failures_per_step
    rows = {name: {"interval": pol.interval, "time_s": cm.expected_time(sc, pol)} for name, pol in pols.items()}
    for name, rule in (("young", cm.young_interval_steps), ("daly", cm.daly_interval_steps)):
        k = max(1, round(min(rule(sc.save_s, sc.step_s, lam), ns.target_steps + 1)))
        rows[f"checkpoint@{name}"] = {"interval": k, "time_s": cm.expected_time(sc, cm.checkpointing(k))}
    for k in ns.intervals:
        rows[f"checkpoint@{k}"] = {"interval": k, "time_s": cm.expected_time(sc, cm.checkpointing(k))}
    for i, (name, pol) in enumerate(pols.items()):
        if ns.mc_runs:
            x = cm.simulate(sc, pol, runs=ns.mc_runs, seed=ns.seed + i)
            ok = x[np.isfinite(x)]
            rows[name]["mc_time_s"] = float(ok.mean()) if ok.size else math.inf
            rows[name]["mc_sem_s"] = float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else math.nan
    for name, q in (("low", qs[1]), ("high", qs[2])):
        s = scenario(ns, base, rate, mb_s, q)
        for pname in ("checkfree", "hybrid"):
            rows[pname][f"time_s_q_{name}"] = cm.expected_time(s, pols[pname])
    best, margin = winner({n: rows[n]["time_s"] for n in STRATEGIES})
    be = cm.break_even_save_s(sc)
    return {
        "hourly_rate": rate,
        "storage_mb_s": mb_s,
        "p_stage_step": sc.stage_fail_prob,
        "save_s": sc.save_s,
        "restore_s": sc.restore_s,
        "p_unrecoverable": pols["hybrid"].p_unrecoverable,
        "strategies": rows,
        "winner": best,
        "margin": margin,
        "break_even_save_s": be,
        "break_even_save_s_approx": cm.break_even_save_s_approx(lam, sc.q, sc.step_s, sc.restore_s),
        "break_even_storage_mb_s": base["payload_bytes"] / (be * 1e6) if 0 < be < math.inf else None,
    }


def strategy_map(ns, base: dict, qs: tuple[float, float, float]) -> dict:
    """Winner, margin and whether q's interval can change the winner, over throughput x failure rate."""
    xs = np.geomspace(ns.map_storage[0], ns.map_storage[1], int(ns.map_storage[2])).tolist()
    ys = np.geomspace(ns.map_rates[0], ns.map_rates[1], int(ns.map_rates[2])).tolist()
    win, margin, resolved = [], [], []
    for rate in ys:
        w_row, m_row, r_row = [], [], []
        for mb_s in xs:
            sc = scenario(ns, base, rate, mb_s, qs[0])
            pols = policies(ns, sc)
            ckpt = cm.expected_time(sc, pols["checkpoint"])  # does not depend on q
            winners = []
            for q, tau, sigma in _q_variants(ns, qs):
                s = cm.Scenario(**{**sc.__dict__, "q": q, "q_overlap_iterations": tau, "swap_tax": sigma})
                times = {"checkpoint": ckpt} | {n: cm.expected_time(s, pols[n]) for n in ("checkfree", "hybrid")}
                winners.append(winner(times))
            w_row.append(winners[0][0])
            m_row.append(winners[0][1])
            # resolved: q's ends agree, or (with --overlap-fit) the winner holds in >= 95% of the fit's samples
            agree = sum(w == winners[0][0] for w, _ in winners[1:]) / max(len(winners) - 1, 1)
            r_row.append(agree >= 0.95 if ns.fit_samples else agree == 1.0)
        win.append(w_row)
        margin.append(m_row)
        resolved.append(r_row)
    return {"storage_mb_s": xs, "hourly_rate": ys, "winner": win, "margin": margin, "resolved": resolved}


def _q_variants(ns, qs) -> list[tuple[float, float]]:
    """(q, tau, sigma) to decide a map cell with: the estimate first, then q's ends, or the fit's bootstrap
    samples."""
    first = (qs[0], ns.q_overlap_iterations, ns.swap_tax)
    if ns.fit_samples:
        return [first, *(tuple(x) for x in ns.fit_samples)]
    return [first, (qs[1], ns.q_overlap_iterations, ns.swap_tax), (qs[2], ns.q_overlap_iterations, ns.swap_tax)]


def draw_map(grid: dict, base: dict, ns, qs, path: Path) -> None:
    xs, ys = np.array(grid["storage_mb_s"]), np.array(grid["hourly_rate"])
    codes = np.array([[STRATEGIES.index(w) for w in row] for row in grid["winner"]])
    margin, resolved = np.array(grid["margin"], dtype=float), np.array(grid["resolved"])
    fig, ax = plt.subplots(figsize=(11, 6))
    ex, ey = _edges(xs), _edges(ys)
    ax.pcolormesh(ex, ey, codes, cmap=ListedColormap(COLORS), vmin=-0.5, vmax=2.5, shading="flat")
    for i, j in zip(*np.nonzero(~resolved)):
        box = (ex[j], ey[i]), ex[j + 1] - ex[j], ey[i + 1] - ey[i]
        ax.add_patch(plt.Rectangle(*box, fill=False, hatch="//", edgecolor="0.25", linewidth=0))
    if len(xs) * len(ys) <= 400:
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                m = margin[i, j]
                text = f"{m:.2f}" if math.isfinite(m) else ("-" if math.isnan(m) else "inf")
                ax.text(x, y, text if resolved[i, j] else f"{text}\n?", ha="center", va="center", fontsize=7)
    else:
        cs = ax.contour(xs, ys, np.minimum(margin, 10), levels=[1.05, 1.1, 1.25, 1.5, 2, 3], colors="k")
        ax.clabel(cs, fmt="%.2f", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("storage throughput (MB/s; save = restore = training state / throughput)")
    ax.set_ylabel("failure rate (per stage per hour)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS]
    handles.append(plt.Rectangle((0, 0), 1, 1, fill=False, hatch="//"))
    ax.legend(
        handles,
        [
            *STRATEGIES,
            "not resolved over the fit's samples (?)" if ns.fit_samples else "not resolved over q's interval (?)",
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
    )
    ax.set_title(
        f"fastest to {ns.target_steps:g} steps; in each cell the runner-up's time over the winner's\n"
        + (f"q = {qs[0]:.3g} (fitted)" if ns.fit_samples else f"q = {qs[0]:g} [{qs[1]:g}, {qs[2]:g}]")
        + (f" overlapping over {ns.q_overlap_iterations:.3g} iterations" if ns.q_overlap_iterations else "")
        + (f", swap tax {ns.swap_tax:.3g} (checkfree and hybrid: CheckFree+)" if ns.swap_tax else "")
        + f", step {base['step_s']:.3g} s, "
        f"state {base['payload_bytes'] / 1e9:.3g} GB, "
        f"{base['num_stages']} stages, downtime {base['downtime_s']:g} s",
        fontsize=9,
    )
    save_figure(fig, path)


def _edges(v: np.ndarray) -> np.ndarray:
    """Cell edges around log-spaced centres."""
    if len(v) == 1:
        return np.array([v[0] / 1.5, v[0] * 1.5])
    r = np.sqrt(v[1:] / v[:-1])
    return np.concatenate([[v[0] / r[0]], v[:-1] * r, [v[-1] * r[-1]]])


def replay_mode(ns) -> dict:
    """Recorded runs re-timed under the given costs (per ``--storage-mb-s`` value when given)."""
    out = []
    for d in ns.replay:
        run = cm.load_run(d)
        own = cm.replay(run)
        payload = 3 * run.summary["memory/param_bytes"] if "memory/param_bytes" in run.summary else None
        if ns.storage_mb_s and payload is None:
            raise SystemExit(f"--replay {d}: summary.json has no memory/param_bytes to size a save at --storage-mb-s")
        retimed = []
        for mb_s in ns.storage_mb_s or [None]:
            r = cm.replay(run, ns.step_s, ns.save_s, ns.restore_s, ns.downtime_s or 0.0, ns.rebuild_s, payload, mb_s)
            retimed.append({"storage_mb_s": mb_s, **r.as_dict()})
            print(
                f"{d}: {run.config['recovery']['strategy']}, {len(run.iterations)} iterations, recorded "
                f"{own.recorded_train_s or math.nan:.2f} s, own costs {own.wall_s:.2f} s, re-timed "
                f"{r.wall_s:.1f} s ({r.wall_s / 3600:.3f} h) at {mb_s or '-'} MB/s: "
                + ", ".join(f"{k} {v:.1f}" for k, v in r.breakdown.items() if v)
            )
        out.append({"run_dir": d, "own": own.as_dict(), "retimed": retimed})
    return {"replay": out}


def _policy_of(run: cm.RecordedRun) -> cm.Policy:
    every = run.config["checkpoint"]["every_steps"] or None
    strategy = run.config["recovery"]["strategy"]
    if strategy == "checkpoint":
        return cm.checkpointing(every)
    return cm.Policy(strategy, every, True, 0.0)  # rebuilds in place; saves (the fallback's) block


def validate_mode(ns) -> dict:
    """Measured time to the target loss of each run (relative to the first) against the model's prediction
    from the runs' own step, save, restore, rebuild times and failure rate."""
    runs = [cm.load_run(d) for d in ns.validate]
    finals = [r.summary["final_val_loss"] for r in runs if r.summary.get("final_val_loss") is not None]
    target = ns.target_loss if ns.target_loss is not None else max(finals, default=math.nan)
    ref = next((r for r in runs if r.config["recovery"]["strategy"] in ("checkpoint", "none")), None)
    if ref is None:
        raise SystemExit("--validate needs a run with recovery.strategy checkpoint or none (failure-free steps)")
    reached = cm.steps_to_target(ref, target)
    if reached is None:
        raise SystemExit(f"--validate: the reference run {ref.run_dir} never reached validation loss {target}")
    rebuilding = any(r.config["recovery"]["strategy"] not in ("checkpoint", "none") for r in runs)
    qs = q_interval(ns) if rebuilding else (0.0, 0.0, 0.0)
    rows = [
        _validate_row(run, reached[0], target, qs, ns.q_full_step, ns.q_overlap_iterations, ns.swap_tax) for run in runs
    ]
    first = rows[0]
    for row in rows:
        row["measured_ratio"] = _ratio(row["measured_s"], first["measured_s"])
        row["predicted_ratio"] = _ratio(row["predicted_s"], first["predicted_s"])
        row["predicted_ratio_q_range"] = [
            _ratio(row[f"predicted_s_q_{e}"], first["predicted_s"]) for e in ("low", "high")
        ]
        print(
            f"{row['run_dir']}: {row['strategy']}, target {target:.3f} at step {row['measured_steps']} in "
            f"{row['measured_s']:.2f} s (predicted {row['predicted_s']:.2f} s); ratio to the first run: measured "
            f"{row['measured_ratio']:.3f}, predicted {row['predicted_ratio']:.3f}"
        )
    return {
        "validate": {
            "target_loss": target,
            "reference": ref.run_dir,
            "reference_steps": reached[0],
            "q": qs,
            "runs": rows,
        }
    }


def validate_sweep(ns) -> dict:
    """``--validate`` on each (rate, seed) of a convergence sweep: the model's predicted ratio of OURS over
    BASELINE against the measured one, per pair, and how many measured ratios fall inside the range q's
    interval predicts."""
    runs_dir, baseline, ours = Path(ns.validate_sweep[0]), ns.validate_sweep[1], ns.validate_sweep[2]
    pairs = []
    for base, tag, _, _ in _sweep_runs(runs_dir, baseline):
        mine = runs_dir / f"{ours.replace(':', 'K')}-{tag}"
        if (base / "summary.json").is_file() and (mine / "summary.json").is_file():
            ns.validate = [str(base), str(mine)]
            row = validate_mode(ns)["validate"]
            b, m = row["runs"]
            pairs.append(
                {
                    "pair": tag,
                    "target_loss": row["target_loss"],
                    "measured_ratio": m["measured_ratio"],
                    "predicted_ratio": m["predicted_ratio"],
                    "predicted_range": _sampled_range(b, m, ns.fit_samples)
                    if ns.fit_samples
                    else m["predicted_ratio_q_range"],
                    "baseline_s": b["measured_s"],
                    "ours_s": m["measured_s"],
                    "failures": [b["failures"], m["failures"]],
                }
            )
    if not pairs:
        raise ValueError(f"--validate-sweep: no {baseline} / {ours} pairs with a summary.json in {runs_dir}")
    lines = [
        f"{ours} over {baseline}, time to the pair's common target (the higher final validation loss), measured vs "
        "predicted by the cost model from each run's own step, save, restore and rebuild times and failures; "
        + (
            f"the range is the 2.5-97.5 percentiles of the prediction over the fit's {len(ns.fit_samples)} bootstrap "
            "(q, tau, sigma) samples.\n"
            if ns.fit_samples
            else "the range is the prediction at q's low and high ends.\n"
        ),
        "| pair | measured ratio | predicted ratio | predicted range | inside | failures (baseline, ours) |",
        "|---|---|---|---|---|---|",
    ]
    inside = 0
    for p in pairs:
        lo, hi = (
            sorted(x for x in p["predicted_range"] if x is not None)
            if None not in p["predicted_range"]
            else (None, None)
        )
        ok = p["measured_ratio"] is not None and lo is not None and lo <= p["measured_ratio"] <= hi
        inside += ok
        fmt = lambda x: "-" if x is None else f"{x:.2f}"
        lines.append(
            f"| {p['pair']} | {fmt(p['measured_ratio'])} | {fmt(p['predicted_ratio'])} | "
            f"{fmt(lo)}-{fmt(hi)} | {'yes' if ok else 'no'} | {p['failures'][0]}, {p['failures'][1]} |"
        )
    # how far the point predictions are off, whatever the range: a wide q interval makes "inside" easy
    logs = [
        abs(math.log(p["predicted_ratio"] / p["measured_ratio"]))
        for p in pairs
        if p["predicted_ratio"] and p["measured_ratio"] and math.isfinite(p["predicted_ratio"])
    ]
    off = math.exp(sum(logs) / len(logs)) if logs else math.nan
    lines.append(
        f"\n{inside} of {len(pairs)} measured ratios inside the predicted range; the point predictions are off by "
        f"a factor of {off:.2f} (geometric mean over the pairs)"
        + (
            f"; q = {ns.q[0]:.3g} from the fit {ns.overlap_fit}"
            if ns.fit_samples
            else (f"; q = {qs[0]:g} [{qs[1]:g}, {qs[2]:g}]" if (ns.q or ns.q_json) and (qs := q_interval(ns)) else "")
        )
        + (f", growing to its value at step {ns.q_full_step:g}" if ns.q_full_step else ", the same at every step")
        + (
            f"; a loss J iterations after the previous one costs q (1 - exp(-J / {ns.q_overlap_iterations:.3g}))"
            if ns.q_overlap_iterations
            else "; every loss costs its whole q"
        )
        + (f"; the swapped schedule costs {ns.swap_tax:.3g} extra steps per step" if ns.swap_tax else "")
        + "."
    )
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return {
        "validate_sweep": {
            "baseline": baseline,
            "ours": ours,
            "pairs": pairs,
            "inside": inside,
            "point_error_factor": off,
            "q_full_step": ns.q_full_step,
            "q_overlap_iterations": ns.q_overlap_iterations,
            "swap_tax": ns.swap_tax,
        }
    }


OVERLAP_GRID = np.concatenate([[0.0], np.geomspace(1.0, 3000.0, 160)])


def fit_overlap(ns) -> dict:
    """Fit q, tau (``q_overlap_iterations``) and the swap tax sigma on a convergence sweep of OURS against the
    failure-free runs: per (rate, seed), the measured extra committed steps to the pair's common target (the
    higher final validation loss, as ``--validate-sweep`` compares) against sigma times the failure-free
    run's steps to it (paid only by a run on the swapped schedule) plus the debt the model charges the run's
    own losses (``recorded_debt``, with ``--q-full-step``'s ramp; losses after OURS reached the target left
    out). Both are linear, so for each tau on a grid (q, sigma) is non-negative least squares, and the tau with
    the least squared error wins (``cm.fit_q_overlap``); bootstrap intervals over the seeds (a seed's pairs
    share its failure-free run, so they are resampled together). Compared with the same fit without the tax,
    with the given ``--q`` alone, and with the best single q. The fit is only as good as the runs: fit on one
    sweep and validate on another."""
    runs_dir, ours = Path(ns.fit_overlap[0]), ns.fit_overlap[1]
    given = q_interval(ns)[0]
    pairs, unit = [], []
    for mine, tag, rate, seed in _sweep_runs(runs_dir, ours):
        ref_dir = runs_dir / f"none-s{seed}"
        if not (mine / "summary.json").is_file() or not (ref_dir / "summary.json").is_file():
            continue
        run, ref = cm.load_run(mine), cm.load_run(ref_dir)
        target = max(run.summary["final_val_loss"], ref.summary["final_val_loss"])
        got, base = cm.steps_to_target(run, target), cm.steps_to_target(ref, target)
        if got is None or base is None:
            continue
        model = lambda t: cm.Scenario(1, 1, 0, 1, q=1.0, q_full_step=ns.q_full_step, q_overlap_iterations=t)
        unit.append([cm.recorded_debt(run, model(t), got[0]) for t in OVERLAP_GRID])  # debt per unit q
        pairs.append(
            {
                "pair": tag,
                "seed": seed,
                "rate": rate,
                "failures": sum(it.failures for it in run.iterations if it.step < got[0]),
                "target_loss": target,
                "base_steps": base[0],
                "swap": run.swap,
                "measured_extra_steps": got[0] - base[0],
            }
        )
    if len(pairs) < 3:
        raise ValueError(f"--fit-overlap: {len(pairs)} none / {ours} pairs that reached their target in {runs_dir}")
    d = np.array(unit)  # pairs x grid
    m = np.array([p["measured_extra_steps"] for p in pairs], dtype=float)
    taxed = np.array([p["base_steps"] if p["swap"] else 0.0 for p in pairs], dtype=float)
    seeds = sorted({p["seed"] for p in pairs})
    of_seed = [[i for i, p in enumerate(pairs) if p["seed"] == s] for s in seeds]

    def fit(seed_idx, tax: bool = True) -> tuple[float, int, float]:
        rows = [i for s in np.asarray(seed_idx, dtype=int) for i in of_seed[s]]
        return cm.fit_q_overlap(d[rows], m[rows], taxed[rows] if tax and taxed.any() else None)

    q_fit, k, sigma = fit(range(len(seeds)))
    q_iv = bootstrap(range(len(seeds)), lambda i: fit(i)[0], resamples=2000)
    tau_iv = bootstrap(range(len(seeds)), lambda i: float(OVERLAP_GRID[fit(i)[1]]), resamples=2000)
    sigma_iv = bootstrap(range(len(seeds)), lambda i: fit(i)[2], resamples=2000)
    draw = np.random.default_rng(0).integers(0, len(seeds), size=(200, len(seeds)))
    samples = [[q, float(OVERLAP_GRID[j]), sg] for q, j, sg in (fit(i) for i in draw)]
    q_nt, k_nt, _ = fit(range(len(seeds)), tax=False)
    q_add, _, _ = cm.fit_q_overlap(d[:, :1], m)
    rmse = lambda pred: float(np.sqrt(((pred - m) ** 2).mean()))
    fits = {
        "fitted": rmse(q_fit * d[:, k] + sigma * taxed),
        "fitted_without_tax": rmse(q_nt * d[:, k_nt]),
        "given_q_no_overlap": rmse(given * d[:, 0]),
        "best_q_no_overlap": rmse(q_add * d[:, 0]),
    }
    for p, row, tx in zip(pairs, d, taxed):
        p["predicted_fitted"] = float(q_fit * row[k] + sigma * tx)
        p["predicted_tax_part"] = float(sigma * tx)
        p["predicted_given_q"] = float(given * row[0])
    tau = float(OVERLAP_GRID[k])
    lines = [
        f"Overlap fit: {ours} against the failure-free run of each seed in {runs_dir} ({len(pairs)} pairs). "
        "Measured extra committed steps to the pair's common target (the higher final validation loss) against "
        "the swap tax (sigma times the failure-free run's steps to the target) plus the model's debt for the "
        "run's own losses"
        + (f", q growing to its value at step {ns.q_full_step:g}" if ns.q_full_step else "")
        + f". Fitted: sigma = {sigma:.3g} [{sigma_iv.low:.3g}, {sigma_iv.high:.3g}], q = {q_fit:.3g} "
        f"[{q_iv.low:.3g}, {q_iv.high:.3g}], tau = {tau:.3g} [{tau_iv.low:.3g}, {tau_iv.high:.3g}] iterations "
        f"(bootstrap over the {len(seeds)} seeds). RMSE {fits['fitted']:.1f} steps fitted, "
        f"{fits['fitted_without_tax']:.1f} fitted without the tax, "
        f"{fits['given_q_no_overlap']:.1f} with q = {given:g} alone, {fits['best_q_no_overlap']:.1f} with "
        f"the best single q ({q_add:.3g}).\n",
        "| rate (/h) | pairs | failures before the target | measured extra steps | fitted model | of which the "
        f"swap tax | q = {given:g} alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate in sorted({p["rate"] for p in pairs}):
        at = [p for p in pairs if p["rate"] == rate]
        mean = lambda key, at=at: bootstrap([p[key] for p in at]).fmt(1)
        lines.append(
            f"| {rate:g} | {len(at)} | {mean('failures')} | {mean('measured_extra_steps')} | "
            f"{mean('predicted_fitted')} | {mean('predicted_tax_part')} | {mean('predicted_given_q')} |"
        )
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {
        "fit_overlap": {
            "ours": ours,
            "q_full_step": ns.q_full_step,
            "q": q_iv.as_dict() | {"estimate": q_fit},
            "tau": tau_iv.as_dict() | {"estimate": tau},
            "swap_tax": sigma_iv.as_dict() | {"estimate": sigma},
            "given_q": given,
            "best_q_no_overlap": q_add,
            "rmse": fits,
            "pairs": pairs,
            "samples": samples,  # (q, tau, sigma) on 200 bootstrap resamples of the seeds: --overlap-fit's ranges
        }
    }


def _sweep_runs(runs_dir: Path, strategy: str) -> list[tuple[Path, str, float, int]]:
    """The runs of ``strategy`` in a ``bench_convergence.py --runs-dir``, named ``STRATEGY-rRATE-sSEED`` (":"
    written "K"): (directory, "rRATE-sSEED", rate, seed), by name."""
    prefix = strategy.replace(":", "K")
    out = []
    for d in sorted(runs_dir.glob(f"{prefix}-r*-s*")):
        named = re.fullmatch(re.escape(prefix) + r"-r(.+)-s(\d+)", d.name)
        if named is not None:
            out.append((d, d.name[len(prefix) + 1 :], float(named.group(1)), int(named.group(2))))
    return out


def _row_model(row: dict, q: float, tau: float, sigma: float) -> tuple[cm.Scenario, cm.Policy]:
    """The scenario and policy a ``_validate_row`` predicted with, for another q, tau and swap tax (which
    only a run that paid one pays)."""
    model = {k: v for k, v in row["model"].items() if k != "interval"} | {"q": q, "q_overlap_iterations": tau}
    model["swap_tax"] = sigma if row["model"].get("swap_tax") else 0.0
    interval = row["model"]["interval"]
    strategy = row["strategy"]
    pol = cm.checkpointing(interval) if strategy == "checkpoint" else cm.Policy(strategy, interval, True, 0.0)
    return cm.Scenario(**model), pol


def _sampled_range(base: dict, mine: dict, samples: list) -> list[float | None]:
    """The predicted ratio mine / base over the fit's bootstrap (q, tau) samples: its 2.5 and 97.5 percentiles."""
    ratios = []
    for q, tau, sigma in samples:
        b, m = (cm.expected_time(*_row_model(row, q, tau, sigma)) for row in (base, mine))
        ratios.append(m / b if b and math.isfinite(b) else math.inf)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return [float(lo), float(hi)]


def apply_overlap_fit(ns) -> None:
    """``--overlap-fit PATH``: q, tau and the ramp from a ``--fit-overlap`` JSON, and its bootstrap samples for
    the predicted ranges (given with --q or --q-overlap-iterations as well: refused, they would disagree)."""
    ns.fit_samples = None
    if not ns.overlap_fit:
        return
    if ns.q or ns.q_json or ns.q_overlap_iterations or ns.swap_tax:
        raise SystemExit(
            "--overlap-fit sets q, --q-overlap-iterations and --swap-tax from the fit: give none of them with it"
        )
    path = Path(ns.overlap_fit)
    if not path.is_file():
        raise SystemExit(f"--overlap-fit {path}: no such file (write it with --fit-overlap)")
    fit = json.loads(path.read_text()).get("fit_overlap")
    if fit is None:
        raise SystemExit(f"--overlap-fit {path}: no fit_overlap result in it (written by --fit-overlap?)")
    ns.q = [fit["q"]["estimate"]]
    ns.q_overlap_iterations = fit["tau"]["estimate"]
    ns.q_full_step = fit["q_full_step"]
    ns.swap_tax = fit["swap_tax"]["estimate"]
    ns.fit_samples = fit["samples"]


def _ratio(a, b):
    return a / b if a is not None and b else None


def _validate_row(
    run: cm.RecordedRun,
    ref_steps: int,
    target: float,
    qs,
    q_full_step: float = 0.0,
    overlap: float = 0.0,
    swap_tax: float = 0.0,
) -> dict:
    got = cm.steps_to_target(run, target)
    pol = _policy_of(run)
    tax = swap_tax if run.swap else 0.0  # only a run on the swapped schedule pays it
    model = lambda q: cm.run_scenario(
        run, ref_steps, q, q_full_step=q_full_step, q_overlap_iterations=overlap, swap_tax=tax
    )
    predicted = {name: cm.expected_time(model(q), pol) for name, q in zip(("", "_q_low", "_q_high"), qs)}
    sc = model(qs[0])
    return {
        "run_dir": run.run_dir,
        "strategy": run.config["recovery"]["strategy"],
        "storage_mb_s": run.config["checkpoint"]["storage_mb_s"],
        "failures": sum(it.failures for it in run.iterations),
        "measured_steps": got[0] if got else None,
        "measured_s": got[1] if got else None,
        "predicted_s": predicted[""],
        "predicted_s_q_low": predicted["_q_low"],
        "predicted_s_q_high": predicted["_q_high"],
        "model": sc.__dict__ | {"interval": pol.interval},
    }


def _t(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.3g} s"


def points_markdown(points: list[dict], qs, ns=None) -> str:
    """The points' expected times as a table (for docs/benchmarks/results.md)."""
    fitted = ns is not None and ns.fit_samples
    model = (
        f"q = {qs[0]:.3g} extra steps per lost stage, a loss J iterations after the previous one costing "
        f"q (1 - exp(-J / {ns.q_overlap_iterations:.3g})), and a swap tax of {ns.swap_tax:.3g} steps per step for "
        f"checkfree and the hybrid (CheckFree+), fitted in {ns.overlap_fit}"
        if fitted
        else f"q = {qs[0]:g} [{qs[1]:g}, {qs[2]:g}] extra steps per lost stage"
    )
    lines = [
        f"{model}. Expected time to the target per strategy "
        "(checkpointing at its optimal interval and at the given ones), the winner and its margin over the "
        "runner-up, and the break-even blocking save time (checkpointing is faster when a save takes less).\n",
        "| rate (/h/stage) | storage MB/s | save s | winner | margin | break-even save s | times |",
        "|---|---|---|---|---|---|---|",
    ]
    for pt in points:
        times = "; ".join(
            f"{name}{' every ' + str(row['interval']) if row.get('interval') else ''}: {_t(row['time_s'])}"
            for name, row in pt["strategies"].items()
        )
        lines.append(
            f"| {pt['hourly_rate']:g} | {pt['storage_mb_s']:g} | {pt['save_s']:.3g} | {pt['winner']} | "
            f"{pt['margin']:.3f} | {pt['break_even_save_s']:.3g} | {times} |"
        )
    return "\n".join(lines) + "\n"


def print_points(points: list[dict]) -> None:
    for pt in points:
        print(
            f"rate {pt['hourly_rate']:g}/h/stage, {pt['storage_mb_s']:g} MB/s (save {pt['save_s']:.1f} s): winner "
            f"{pt['winner']} by {pt['margin']:.3f}x; break-even save {pt['break_even_save_s']:.1f} s "
            f"(first order {pt['break_even_save_s_approx']:.1f} s)"
        )
        for name, row in pt["strategies"].items():
            mc = f", simulated {_t(row['mc_time_s'])} +- {_t(row['mc_sem_s'])}" if "mc_time_s" in row else ""
            k = f" every {row['interval']}" if row.get("interval") else ""
            print(f"    {name:<18}{k:<12} {_t(row['time_s']):>10}{mc}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-run", help="an engine run: its training state (3x memory/param_bytes), step time, stages")
    ap.add_argument("--model-bytes", type=float, help="bytes a checkpoint of every stage moves (weights + Adam)")
    ap.add_argument("--step-s", type=float, help="seconds per step (default: the run's, or 91.3)")
    ap.add_argument("--num-stages", type=int)
    ap.add_argument("--hourly-rate", type=float, nargs="+", default=[0.05, 0.10, 0.16], help="per stage per hour")
    ap.add_argument("--iteration-s", type=float, help="seconds of exposure one step stands for (default: --step-s)")
    ap.add_argument("--acceleration", type=float, default=1.0, help="multiplies each step's exposure")
    ap.add_argument("--storage-mb-s", type=float, nargs="+", default=None, help="default 100 1000 (replay: none)")
    ap.add_argument("--save-s", type=float, help="replay: a blocking save (default: from --storage-mb-s or the run's)")
    ap.add_argument("--restore-s", type=float, help="restore time (default: the save's)")
    ap.add_argument("--downtime-s", type=float, help="per incident: detection and replacement (default 30; replay 0)")
    ap.add_argument("--rebuild-s", type=float, help="replay: per rebuilt incident (default: the run's)")
    ap.add_argument("--q", type=float, nargs="+", help="extra steps per rebuilt stage: Q, or Q LOW HIGH")
    ap.add_argument("--q-json", help="a JSON written by scripts/measure_q.py")
    ap.add_argument("--q-key", default="plus/2", help="METHOD/STAGE in its table")
    ap.add_argument("--q-at", type=int, default=50, help="its q@K column")
    ap.add_argument(
        "--q-full-step",
        type=float,
        default=0.0,
        help="the step at which q was measured (measure_q.py --fail-at): a loss at step s costs q min(1, s / F), "
        "as losses early in training cost less; 0 (default): q at every step",
    )
    ap.add_argument(
        "--q-overlap-iterations",
        type=float,
        default=0.0,
        help="tau: an incident J iterations after the previous one costs q (1 - exp(-J / tau)) per lost stage, "
        "as a model still recovering from a rebuild loses less to the next (fit it with --fit-overlap); "
        "0 (default): every loss costs its whole q",
    )
    ap.add_argument(
        "--swap-tax",
        type=float,
        default=0.0,
        help="sigma: extra steps per step that CheckFree+'s swapped schedule costs without failures (its target is "
        "S (1 + sigma); checkpointing does not pay it); fitted by --fit-overlap. Default 0",
    )
    ap.add_argument("--target-steps", type=float, default=10_000)
    ap.add_argument("--intervals", type=int, nargs="*", default=[50, 200])
    ap.add_argument("--p-unrecoverable", type=float, help="hybrid: share of incidents rolled back (default: adjacent)")
    ap.add_argument(
        "--async-every", type=int, help="hybrid: steps between async checkpoints (default: as often as fits)"
    )
    ap.add_argument("--interrupt-fraction", type=float, default=0.5)
    ap.add_argument("--map-storage", type=float, nargs=3, default=[10, 10_000, 13], metavar=("LOW", "HIGH", "N"))
    ap.add_argument("--map-rates", type=float, nargs=3, default=[0.01, 0.5, 10], metavar=("LOW", "HIGH", "N"))
    ap.add_argument("--mc-runs", type=int, default=200, help="Monte-Carlo runs per strategy and point (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--validate", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--target-loss", type=float, help="validate: default the highest final validation loss")
    ap.add_argument(
        "--validate-sweep",
        nargs=3,
        metavar=("RUNS_DIR", "BASELINE", "OURS"),
        help="validate every (rate, seed) pair of a bench_convergence.py --runs-dir: BASELINE (e.g. checkpoint:25) "
        "against OURS (e.g. checkfree_plus), and write a markdown table next to --out",
    )
    ap.add_argument(
        "--fit-overlap",
        nargs=2,
        metavar=("RUNS_DIR", "OURS"),
        help="fit --q-overlap-iterations on a bench_convergence.py --runs-dir with a none strategy: OURS's extra "
        "steps to target against the model's debt for its own losses, given --q (and --q-full-step)",
    )
    ap.add_argument(
        "--overlap-fit",
        metavar="JSON",
        help="q, --q-overlap-iterations and --q-full-step from a --fit-overlap result, whose bootstrap samples give "
        "--validate-sweep's predicted ranges and the map's not-resolved cells",
    )
    ap.add_argument("--out", default="runs/whatif/whatif.json")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    ns = parse_args(argv)
    apply_overlap_fit(ns)
    try:
        if ns.replay:
            result = replay_mode(ns)
        elif ns.fit_overlap:
            result = fit_overlap(ns)
        elif ns.validate_sweep:
            result = validate_sweep(ns)
        elif ns.validate:
            result = validate_mode(ns)
        else:
            result = whatif(ns)
    except ValueError as e:  # a run directory or a parameter the cost model refused
        raise SystemExit(f"whatif: {e}") from e
    report(_json_safe({"args": vars(ns), **result}), ns.out)


def _json_safe(value):
    """JSON has no inf or NaN: write them as strings, as metrics.jsonl does."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def whatif(ns) -> dict:
    qs = q_interval(ns)
    base = base_parameters(ns)
    points = [point(ns, base, r, s, qs) for r in ns.hourly_rate for s in ns.storage_mb_s or [100, 1000]]
    grid = strategy_map(ns, base, qs)
    png = Path(ns.out).with_suffix(".png")
    draw_map(grid, base, ns, qs, png)
    Path(ns.out).with_suffix(".md").write_text(points_markdown(points, qs, ns))
    print_points(points)
    print(f"map: {png}")
    return {"base": base, "q": qs, "points": points, "map": grid, "png": str(png)}


if __name__ == "__main__":
    main()
