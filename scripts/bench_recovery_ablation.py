"""Recovery quality ablation (the paper's Fig. 2): how good is a rebuilt stage?

For each seed, trains one model without failures, then from that same snapshot loses one stage at a
time and rebuilds it with each method (gradient-weighted average, uniform average, copy of a
neighbour, random re-initialisation), and trains on. Reports, per method, over seeds and stages:
the validation-loss spike right after the rebuild, the steps until the pre-failure validation loss is
regained, and the validation loss / perplexity after ``--after-steps``. Prints a table, saves JSON
and a plot.

    python scripts/bench_recovery_ablation.py [configs/bench.yaml] [key=value ...] [--seeds 0 1 2]
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
from checkfree.metrics import report
from checkfree.trainer import Trainer

METHODS = {"weighted": "checkfree", "uniform": "uniform", "copy": "copy", "random": "random"}


def _curve(trainer: Trainer, after: int, every: int) -> list[float]:
    vals = [trainer.engine.evaluate(trainer.cfg.data.num_val_batches)]
    for _ in range(after // every):
        trainer.continue_for(every)
        vals.append(trainer.engine.evaluate(trainer.cfg.data.num_val_batches))
    return vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stages", type=int, nargs="+", default=None, help="stages to lose (default: the middle ones)")
    ap.add_argument("--after-steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10, help="validation interval after the rebuild")
    ap.add_argument("--out", default="runs/bench/recovery_ablation.json")
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    tmp = Path(tempfile.mkdtemp(prefix="cf-ablation-"))
    rows = []
    for seed in ns.seeds:
        cfg = load_config(files, [*overrides, f"seed={seed}", "failures.mode=none", f"out_dir={tmp}",
                                  f"run_name=seed{seed}", "progress=false", "plot=false", "eval_every_steps=0"])
        trainer = Trainer(cfg)
        trainer.run()
        snapshot = copy.deepcopy(trainer.engine)
        base_state = copy.deepcopy(trainer.state)
        pre = trainer.engine.evaluate(cfg.data.num_val_batches)
        L = cfg.model.num_stages
        for stage in ns.stages or list(range(1, L - 1)):
            for name, strategy in METHODS.items():
                trainer.engine, trainer.state = copy.deepcopy(snapshot), copy.deepcopy(base_state)
                trainer.cfg.recovery.strategy = strategy
                trainer.recover([stage])
                curve = _curve(trainer, ns.after_steps, ns.every)
                regained = next((k * ns.every for k, v in enumerate(curve) if v <= pre), None)
                rows.append({"seed": seed, "stage": stage, "method": name, "pre_val": pre, "spike": curve[0] - pre,
                             "steps_to_regain": regained, "final_val": curve[-1], "curve": curve})
                print(f"seed {seed} stage {stage} {name:8s} spike {curve[0] - pre:+.3f} regained "
                      f"{regained if regained is not None else f'>{ns.after_steps}'} final {curve[-1]:.3f}", flush=True)
    table = {}
    for name in METHODS:
        r = [x for x in rows if x["method"] == name]
        finals = [x["final_val"] for x in r]
        regain = [x["steps_to_regain"] for x in r]
        table[name] = {
            "spike_mean": statistics.mean(x["spike"] for x in r),
            "spike_std": statistics.pstdev(x["spike"] for x in r),
            "final_val_mean": statistics.mean(finals), "final_val_std": statistics.pstdev(finals),
            "final_ppl_mean": statistics.mean(math.exp(v) for v in finals),
            "regained_within_budget": sum(v is not None for v in regain), "cases": len(r),
            "steps_to_regain_median": statistics.median(v for v in regain if v is not None) if any(
                v is not None for v in regain) else None,
        }
    order = sorted(METHODS, key=lambda n: table[n]["final_val_mean"])
    result = {"seeds": ns.seeds, "after_steps": ns.after_steps, "train_steps": cfg.num_steps, "table": table,
              "order_by_final_val": order,
              "paper_order_weighted_lt_copy_lt_random": table["weighted"]["final_val_mean"]
              < table["copy"]["final_val_mean"] < table["random"]["final_val_mean"], "rows": rows}
    report({k: v for k, v in result.items() if k != "rows"}, ns.out)
    Path(ns.out).with_suffix(".rows.json").write_text(json.dumps(rows) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, name in enumerate(METHODS):
        curves = [x["curve"] for x in rows if x["method"] == name]
        mean = [statistics.mean(c[k] for c in curves) for k in range(len(curves[0]))]
        ax.plot([k * ns.every for k in range(len(mean))], mean, marker="o", ms=3, color=f"C{n}", label=name)
    ax.axhline(statistics.mean(x["pre_val"] for x in rows), color="k", ls=":", label="before the failure")
    ax.set_xlabel("steps after the rebuild")
    ax.set_ylabel("validation loss (mean over seeds and stages)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(ns.out).with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
