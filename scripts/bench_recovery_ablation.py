"""Recovery quality ablation (the paper's Fig. 2): how good is a rebuilt stage?

For each seed, trains one model without failures, then from that same snapshot loses one *case* of
stages at a time and rebuilds it with each method (gradient-weighted average, uniform average, copy of a
neighbour, random re-initialisation), and trains on. Cases (``--cases``, stages joined by commas): by
default each middle stage alone (the paper's setting), two adjacent middle stages at once, and the first
two stages at once. When a rebuild's source is lost too, the method's adjacent fallback applies (no
checkpoint exists here, so the nearest live stage on each side; the embedding's replica is lost with
stage 1). Reports, per case kind (single / adjacent / first two) and method, over seeds and cases: the
validation-loss spike right after the rebuild, the steps until the pre-failure validation loss is
regained, and the validation loss / perplexity after ``--after-steps``. The paper's order weighted <
copy < random is checked on the single-stage cases. Prints a table, saves JSON and a plot.

    python scripts/bench_recovery_ablation.py [configs/bench.yaml] [key=value ...] [--seeds 0 1 2] [--cases 1 2 1,2 0,1]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from checkfree.config import load_config, split_args
from checkfree.core.metrics import report
from checkfree.engine.trainer import Trainer
from checkfree.plot import save_figure

METHODS = {"weighted": "checkfree", "uniform": "uniform", "copy": "copy", "random": "random"}


def _curve(trainer: Trainer, after: int, every: int) -> list[float]:
    vals = [trainer.engine.evaluate(trainer.cfg.data.num_val_batches)]
    for _ in range(after // every):
        trainer.continue_for(every)
        vals.append(trainer.engine.evaluate(trainer.cfg.data.num_val_batches))
    return vals


def case_kind(lost: list[int], num_stages: int) -> str:
    """'single', 'first two' / 'last two' (an edge stage and its neighbour), 'adjacent' (other neighbours)
    or 'apart' (several stages, none next to another)."""
    if len(lost) == 1:
        return "single"
    if lost == [0, 1]:
        return "first two"
    if lost == [num_stages - 2, num_stages - 1]:
        return "last two"
    return "adjacent" if any(b - a == 1 for a, b in zip(lost, lost[1:])) else "apart"


def _parse_cases(cases: list[str] | None, num_stages: int) -> list[list[int]]:
    if not cases:
        middle = [[s] for s in range(1, num_stages - 1)]
        pairs = [[1, 2]] if num_stages >= 4 else []
        return middle + pairs + [[0, 1]]
    out = []
    for c in cases:
        try:
            lost = sorted({int(x) for x in c.split(",")})
        except ValueError:
            raise SystemExit(f"--cases {c!r}: expected stage indices joined by commas, e.g. 1 or 1,2") from None
        bad = [x for x in lost if not 0 <= x < num_stages]
        if bad or len(lost) == num_stages:
            raise SystemExit(f"--cases {c!r}: stages must be in 0..{num_stages - 1} and leave one alive")
        out.append(lost)
    return out


def _summary(rows: list[dict]) -> dict:
    finals = [x["final_val"] for x in rows]
    regain = [x["steps_to_regain"] for x in rows if x["steps_to_regain"] is not None]
    return {
        "spike_mean": statistics.mean(x["spike"] for x in rows),
        "spike_std": statistics.pstdev(x["spike"] for x in rows),
        "final_val_mean": statistics.mean(finals),
        "final_val_std": statistics.pstdev(finals),
        "final_ppl_mean": statistics.mean(math.exp(v) for v in finals),
        "regained_within_budget": len(regain),
        "cases": len(rows),
        "steps_to_regain_median": statistics.median(regain) if regain else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="stage sets to lose together, e.g. 1 2 1,2 0,1 (default: each middle stage, 1,2 and 0,1)",
    )
    ap.add_argument("--after-steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10, help="validation interval after the rebuild")
    ap.add_argument("--out", default="runs/bench/recovery_ablation.json")
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    tmp = Path(tempfile.mkdtemp(prefix="cf-ablation-"))
    rows = []
    for seed in ns.seeds:
        cfg = load_config(
            files,
            [
                *overrides,
                f"seed={seed}",
                "failures.mode=none",
                f"out_dir={tmp}",
                f"run_name=seed{seed}",
                "progress=false",
                "plot=false",
                "eval_every_steps=0",
            ],
        )
        L, train_steps = cfg.model.num_stages, cfg.num_steps  # continue_for raises cfg.num_steps as it goes
        cases = _parse_cases(ns.cases, L)
        trainer = Trainer(cfg)
        trainer.run()
        snapshot = copy.deepcopy(trainer.engine)
        base_state = copy.deepcopy(trainer.state)
        pre = trainer.engine.evaluate(cfg.data.num_val_batches)
        for lost in cases:
            kind = case_kind(lost, L)
            for name, strategy in METHODS.items():
                trainer.engine, trainer.state = copy.deepcopy(snapshot), copy.deepcopy(base_state)
                trainer.cfg.recovery.strategy = strategy
                trainer.recover(lost)
                curve = _curve(trainer, ns.after_steps, ns.every)
                regained = next((k * ns.every for k, v in enumerate(curve) if v <= pre), None)
                rows.append(
                    {
                        "seed": seed,
                        "lost": lost,
                        "kind": kind,
                        "method": name,
                        "pre_val": pre,
                        "spike": curve[0] - pre,
                        "steps_to_regain": regained,
                        "final_val": curve[-1],
                        "curve": curve,
                    }
                )
                print(
                    f"seed {seed} lost {','.join(map(str, lost)):5s} ({kind:9s}) {name:8s} spike "
                    f"{curve[0] - pre:+.3f} regained {regained if regained is not None else f'>{ns.after_steps}'} "
                    f"final {curve[-1]:.3f}",
                    flush=True,
                )
    kinds = list(dict.fromkeys(x["kind"] for x in rows))
    tables = {
        k: {m: _summary([x for x in rows if x["kind"] == k and x["method"] == m]) for m in METHODS} for k in kinds
    }
    single = tables.get("single")
    result = {
        "seeds": ns.seeds,
        "after_steps": ns.after_steps,
        "train_steps": train_steps,
        "cases": [x["lost"] for x in rows if x["seed"] == ns.seeds[0] and x["method"] == "weighted"],
        "tables": tables,
        "table": single,
        "order_by_final_val": sorted(METHODS, key=lambda n: single[n]["final_val_mean"]) if single else None,
        "paper_order_weighted_lt_copy_lt_random": single["weighted"]["final_val_mean"]
        < single["copy"]["final_val_mean"]
        < single["random"]["final_val_mean"]
        if single
        else None,
    }
    for k, t in tables.items():
        print(
            f"{k}: "
            + ", ".join(f"{m} spike {v['spike_mean']:+.3f} final {v['final_val_mean']:.3f}" for m, v in t.items())
        )
    report(result, ns.out)
    Path(ns.out).with_suffix(".rows.json").write_text(json.dumps(rows) + "\n")
    plot(rows, ns.every, Path(ns.out).with_suffix(".png"))


def plot(rows: list[dict], every: int, path: Path) -> None:
    """Mean validation loss after the rebuild, per method, one panel per case kind (own y scale: a
    first-two loss spikes an order of magnitude above the others)."""
    kinds = list(dict.fromkeys(x["kind"] for x in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for n, name in enumerate(METHODS):
            curves = [x["curve"] for x in rows if x["method"] == name and x["kind"] == kind]
            mean = [statistics.mean(c[k] for c in curves) for k in range(len(curves[0]))]
            ax.plot([k * every for k in range(len(mean))], mean, marker="o", ms=3, color=f"C{n}", label=name)
        ax.axhline(statistics.mean(x["pre_val"] for x in rows), color="k", ls=":", label="before the failure")
        ax.set_title(
            f"{kind} ({', '.join(sorted({','.join(map(str, x['lost'])) for x in rows if x['kind'] == kind}))})"
        )
        ax.set_xlabel("steps after the rebuild")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss (mean over seeds and cases)")
    axes[0][0].legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
