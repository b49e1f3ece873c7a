"""
What if
=======

The cost model (``checkfree.analysis.costmodel``) put to work on a parameter space, for ``scripts/whatif.py
map``: each strategy's expected time to S committed steps at given failure rates and storage throughputs
(checkpointing at its exact optimal interval, at Young's and Daly's and at given ones; CheckFree(+); the
hybrid), checked against the Monte-Carlo simulation, the break-even save time, and a map of the winner over
throughput x failure rate with the margin in each cell, "not resolved" where q's interval (or the overlap
fit's samples) can change the winner.

The model's inputs every what-if program shares live here too: q as given (``QSpec``) and how a lost stage is
charged beyond q (``DebtModel``: the ramp, the overlap, the swap tax, a fit's samples). The other programs
have their own modules: ``validation`` (replay, validate, validate-sweep), ``null_predictor`` (the model
against the null predictor), ``overlap_fit`` (fit-overlap) and ``table2`` (the paper's Table 2).
Functions raise ``ValueError`` for what a user can get wrong.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from checkfree.analysis import costmodel as cm
from checkfree.plot import save_figure

logger = logging.getLogger(__name__)

STRATEGIES = ("checkpoint", "checkfree", "hybrid")
COLORS = ("#4c72b0", "#55a868", "#dd8452")
PAPER_MEDIUM = {"param_bytes": 500e6 * 4, "step_s": 91.3, "num_stages": 6, "downtime_s": 30.0}


@dataclass(frozen=True)
class QSpec:
    """q, the extra steps per rebuilt stage, as the user gave it: ``values`` (Q, or Q LOW HIGH: the first is
    the estimate, the others' range the interval) or a cell of a ``scripts/measure_q.py`` table. Read only
    when a program needs it, so a validation of checkpointing runs alone needs no q."""

    values: list[float] | None  # --q
    json_path: str | None  # --q-json: a measure_q.py result
    key: str = "plus/2"  # --q-key: METHOD/STAGE in its table
    at: int = 50  # --q-at: its q@K column

    @property
    def given(self) -> bool:
        return bool(self.values or self.json_path)

    def interval(self) -> tuple[float, float, float]:
        """(estimate, low, high) of q: from the table's ``[key]["q@at"]`` or from ``values``."""
        if self.json_path:
            table = json.loads(Path(self.json_path).read_text()).get("table", {})
            cell = table.get(self.key, {}).get(f"q@{self.at}")
            if cell is None:
                have = {k: [f for f in v if f.startswith("q@")] for k, v in table.items()}
                raise ValueError(f"--q-json {self.json_path}: no table[{self.key!r}]['q@{self.at}']; it has {have}")
            if not cell.get("n"):
                raise ValueError(
                    f"--q-json {self.json_path}: {self.key} q@{self.at} has no seed that reached the target"
                )
            return cell["estimate"], cell["low"], cell["high"]
        if not self.values:
            raise ValueError(
                "give q, the extra steps per rebuilt stage: --q Q [LOW HIGH], or --q-json PATH --q-key M/S"
            )
        if any(not (q >= 0) for q in self.values):
            raise ValueError(f"--q {self.values}: expected numbers >= 0")
        return self.values[0], min(self.values), max(self.values)


@dataclass(frozen=True)
class DebtModel:
    """How the model charges a lost stage beyond q (``cm.Scenario``'s fields of the same names), and where
    they came from when fitted: a ``fit-overlap`` result, whose bootstrap samples then decide the map's
    not-resolved cells and validate-sweep's predicted ranges instead of q's interval."""

    q_full_step: float = 0.0  # a loss at step s costs q min(1, s / F); 0: q at every step
    q_overlap_iterations: float = 0.0  # tau: a loss J iterations after the previous costs q (1 - exp(-J / tau))
    swap_tax: float = 0.0  # sigma: extra steps per step on CheckFree+'s swapped schedule
    fit_path: str | None = None  # the fit-overlap JSON these were read from
    fit_samples: list[list[float]] | None = None  # its (q, tau, sigma) on bootstrap resamples


@dataclass(frozen=True)
class MapSettings:
    """What ``map`` computes over: the points, the map's axes, the exposure and the strategies' settings
    (``scripts/whatif.py map``'s options of the same names; its defaults are the paper's)."""

    hourly_rate: list[float]  # failures per stage per hour at the points
    storage_mb_s: list[float]  # storage throughputs at the points (MB/s)
    map_storage: list[float]  # the map's throughputs: LOW HIGH N (log-spaced)
    map_rates: list[float]  # the map's failure rates: LOW HIGH N (log-spaced)
    target_steps: float  # committed steps to the target
    iteration_s: float | None  # seconds of exposure one step stands for (None: the step time)
    acceleration: float  # multiplies each step's exposure
    restore_s: float | None  # None: the save's
    interrupt_fraction: float  # the share of a step an incident interrupts on average
    intervals: list[int]  # checkpoint intervals to show beside the optimal one
    p_unrecoverable: float | None  # hybrid: share of incidents rolled back (None: adjacent losses)
    async_every: int | None  # hybrid: steps between async checkpoints (None: as often as fits)
    mc_runs: int  # Monte-Carlo runs per strategy and point (0: none)
    seed: int


def base_parameters(
    from_run: str | None = None,
    model_bytes: float | None = None,
    step_s: float | None = None,
    num_stages: int | None = None,
    downtime_s: float | None = None,
) -> dict:
    """Model bytes, step time, stages and downtime: given, else from ``from_run`` (an engine run directory:
    its summary and measurements), else the paper's medium model."""
    base = {**PAPER_MEDIUM, "payload_bytes": 3 * PAPER_MEDIUM["param_bytes"]}
    if from_run:
        run = cm.load_run(from_run)
        if "memory/param_bytes" not in run.summary:
            raise ValueError(f"--from-run {from_run}: summary.json has no memory/param_bytes (an unfinished run?)")
        sc = cm.run_scenario(run, 1)
        base |= {"payload_bytes": 3 * run.summary["memory/param_bytes"], "step_s": sc.step_s}
        base |= {"num_stages": run.config["model"]["num_stages"], "downtime_s": sc.downtime_s}
    given = {"payload_bytes": model_bytes, "step_s": step_s, "num_stages": num_stages}
    base |= {k: v for k, v in given.items() if v is not None}
    return base | ({} if downtime_s is None else {"downtime_s": downtime_s})


def scenario(ms: MapSettings, debt: DebtModel, base: dict, rate: float, mb_s: float, q: float) -> cm.Scenario:
    io_s = base["payload_bytes"] / (mb_s * 1e6)
    p = cm.per_step_probability(rate, ms.iteration_s or base["step_s"], ms.acceleration)
    return cm.Scenario(
        target_steps=ms.target_steps,
        step_s=base["step_s"],
        stage_fail_prob=p,
        num_stages=base["num_stages"],
        save_s=io_s,
        restore_s=io_s if ms.restore_s is None else ms.restore_s,
        downtime_s=base["downtime_s"],
        q=q,
        interrupt_fraction=ms.interrupt_fraction,
        q_full_step=debt.q_full_step,
        q_overlap_iterations=debt.q_overlap_iterations,
        swap_tax=debt.swap_tax,
    )


def policies(ms: MapSettings, sc: cm.Scenario) -> dict[str, cm.Policy]:
    """The three strategies at their best settings: checkpointing at its exact optimal interval; the hybrid
    saving as often as a save can finish before the next one starts (or ``async_every``)."""
    u = ms.p_unrecoverable
    u = cm.adjacent_loss_fraction(sc.stage_fail_prob, sc.num_stages) if u is None else u
    every = max(ms.async_every or 1, math.ceil(sc.save_s / sc.step_s))
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


def point(
    ms: MapSettings, debt: DebtModel, base: dict, rate: float, mb_s: float, qs: tuple[float, float, float]
) -> dict:
    """Every strategy's expected time at one (failure rate, throughput), Monte-Carlo checks, break-even."""
    sc = scenario(ms, debt, base, rate, mb_s, qs[0])
    pols = policies(ms, sc)
    lam = sc.failures_per_step
    rows = {name: {"interval": pol.interval, "time_s": cm.expected_time(sc, pol)} for name, pol in pols.items()}
    for name, rule in (("young", cm.young_interval_steps), ("daly", cm.daly_interval_steps)):
        k = max(1, round(min(rule(sc.save_s, sc.step_s, lam), ms.target_steps + 1)))
        rows[f"checkpoint@{name}"] = {"interval": k, "time_s": cm.expected_time(sc, cm.checkpointing(k))}
    for k in ms.intervals:
        rows[f"checkpoint@{k}"] = {"interval": k, "time_s": cm.expected_time(sc, cm.checkpointing(k))}
    for i, (name, pol) in enumerate(pols.items()):
        if ms.mc_runs:
            x = cm.simulate(sc, pol, runs=ms.mc_runs, seed=ms.seed + i)
            ok = x[np.isfinite(x)]
            rows[name]["mc_time_s"] = float(ok.mean()) if ok.size else math.inf
            rows[name]["mc_sem_s"] = float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else math.nan
    for name, q in (("low", qs[1]), ("high", qs[2])):
        s = scenario(ms, debt, base, rate, mb_s, q)
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


def strategy_map(ms: MapSettings, debt: DebtModel, base: dict, qs: tuple[float, float, float]) -> dict:
    """Winner, margin and whether q's interval can change the winner, over throughput x failure rate."""
    xs = np.geomspace(ms.map_storage[0], ms.map_storage[1], int(ms.map_storage[2])).tolist()
    ys = np.geomspace(ms.map_rates[0], ms.map_rates[1], int(ms.map_rates[2])).tolist()
    win, margin, resolved = [], [], []
    for rate in ys:
        w_row, m_row, r_row = [], [], []
        for mb_s in xs:
            sc = scenario(ms, debt, base, rate, mb_s, qs[0])
            pols = policies(ms, sc)
            ckpt = cm.expected_time(sc, pols["checkpoint"])  # does not depend on q
            winners = []
            for q, tau, sigma in _q_variants(debt, qs):
                s = cm.Scenario(**{**sc.__dict__, "q": q, "q_overlap_iterations": tau, "swap_tax": sigma})
                times = {"checkpoint": ckpt} | {n: cm.expected_time(s, pols[n]) for n in ("checkfree", "hybrid")}
                winners.append(winner(times))
            w_row.append(winners[0][0])
            m_row.append(winners[0][1])
            # resolved: q's ends agree, or (with --overlap-fit) the winner holds in >= 95% of the fit's samples
            agree = sum(w == winners[0][0] for w, _ in winners[1:]) / max(len(winners) - 1, 1)
            r_row.append(agree >= 0.95 if debt.fit_samples else agree == 1.0)
        win.append(w_row)
        margin.append(m_row)
        resolved.append(r_row)
    return {"storage_mb_s": xs, "hourly_rate": ys, "winner": win, "margin": margin, "resolved": resolved}


def _q_variants(debt: DebtModel, qs: tuple[float, float, float]) -> list[tuple[float, float, float]]:
    """(q, tau, sigma) to decide a map cell with: the estimate first, then q's ends, or the fit's bootstrap
    samples."""
    first = (qs[0], debt.q_overlap_iterations, debt.swap_tax)
    if debt.fit_samples:
        return [first, *(tuple(x) for x in debt.fit_samples)]
    tau, sigma = debt.q_overlap_iterations, debt.swap_tax
    return [first, (qs[1], tau, sigma), (qs[2], tau, sigma)]


def draw_map(grid: dict, base: dict, ms: MapSettings, debt: DebtModel, qs: tuple, path: Path) -> None:
    """The winner's map as a PNG: a colour per winner, the margin in each cell (contours on a large grid),
    hatched where the winner is not resolved."""
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
            "not resolved over the fit's samples (?)" if debt.fit_samples else "not resolved over q's interval (?)",
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
    )
    ax.set_title(
        f"fastest to {ms.target_steps:g} steps; in each cell the runner-up's time over the winner's\n"
        + (f"q = {qs[0]:.3g} (fitted)" if debt.fit_samples else f"q = {qs[0]:g} [{qs[1]:g}, {qs[2]:g}]")
        + (f" overlapping over {debt.q_overlap_iterations:.3g} iterations" if debt.q_overlap_iterations else "")
        + (f", swap tax {debt.swap_tax:.3g} (checkfree and hybrid: CheckFree+)" if debt.swap_tax else "")
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


def _t(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.3g} s"


def points_markdown(points: list[dict], qs: tuple, debt: DebtModel | None = None) -> str:
    """The points' expected times as a table (for docs/benchmarks/results.md)."""
    fitted = debt is not None and debt.fit_samples
    model = (
        f"q = {qs[0]:.3g} extra steps per lost stage, a loss J iterations after the previous one costing "
        f"q (1 - exp(-J / {debt.q_overlap_iterations:.3g})), and a swap tax of {debt.swap_tax:.3g} steps per step "
        f"for "
        f"checkfree and the hybrid (CheckFree+), fitted in {debt.fit_path}"
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


def log_points(points: list[dict]) -> None:
    for pt in points:
        logger.info(
            f"rate {pt['hourly_rate']:g}/h/stage, {pt['storage_mb_s']:g} MB/s (save {pt['save_s']:.1f} s): winner "
            f"{pt['winner']} by {pt['margin']:.3f}x; break-even save {pt['break_even_save_s']:.1f} s "
            f"(first order {pt['break_even_save_s_approx']:.1f} s)"
        )
        for name, row in pt["strategies"].items():
            mc = f", simulated {_t(row['mc_time_s'])} +- {_t(row['mc_sem_s'])}" if "mc_time_s" in row else ""
            k = f" every {row['interval']}" if row.get("interval") else ""
            logger.info(f"    {name:<18}{k:<12} {_t(row['time_s']):>10}{mc}")


def json_safe(value):
    """JSON has no inf or NaN: write them as strings, as metrics.jsonl does."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def run_map(ms: MapSettings, debt: DebtModel, q: QSpec, base: dict, png: Path) -> tuple[dict, str]:
    """``map``: every strategy at each (``hourly_rate``, ``storage_mb_s``) point and the winner's map over
    ``map_storage`` x ``map_rates``, drawn to ``png``. Returns the result and the points' markdown.

    Args:
        base: ``base_parameters``' model bytes, step time, stages and downtime.
    """
    qs = q.interval()
    points = [point(ms, debt, base, r, s, qs) for r in ms.hourly_rate for s in ms.storage_mb_s or [100, 1000]]
    grid = strategy_map(ms, debt, base, qs)
    draw_map(grid, base, ms, debt, qs, png)
    markdown = points_markdown(points, qs, debt)
    log_points(points)
    logger.info(f"map: {png}")
    return {"base": base, "q": qs, "points": points, "map": grid, "png": str(png)}, markdown
