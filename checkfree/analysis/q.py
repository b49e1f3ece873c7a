"""
q: the steps one lost stage costs
=================================

The reading of ``scripts/measure_q.py``'s paired runs (the script trains them; this module only reads):
per seed, a failure-free reference and one arm per (rebuild method, stage lost), every arm forked from the
reference at step F and trained for the same horizon on the same batches. From their validation curves
(``(committed steps, loss)`` after F, read by ``checkfree.analysis.runs``):

- **q** to a target: the arm's steps to the best loss the reference had reached k steps after F, minus the
  reference's, both on best-so-far curves (``runs.steps_to_target``), so one noisy evaluation cannot decide
  a crossing; an arm that never gets there is counted as not reached, never dropped;
- the **jump** of the validation loss right after the rebuild and the **gap** at the end of the horizon;
- the **lag at the end**: how long before the arm's last evaluation the reference had reached the arm's
  final best loss (``lag_at_end``), which needs no target.

Per (method, stage) cell: 95% percentile bootstraps over seeds (``stats.bootstrap``) and markdown tables
(``tables.markdown_table``). ``summarise`` works from the per-seed rows alone, so a saved result's table can
be recomputed from its JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from checkfree.analysis.runs import read_metrics, steps_to_target, val_curve
from checkfree.analysis.stats import bootstrap, fmt_interval
from checkfree.analysis.tables import markdown_table

Curve = list[tuple[int, float]]  # (committed steps, validation loss) after the loss, in step order

# method -> (trained with the swap, config overrides)
METHODS: dict[str, tuple[bool, list[str]]] = {
    "weighted": (False, ["recovery.strategy=checkfree"]),
    "uniform": (False, ["recovery.strategy=uniform"]),
    "copy": (False, ["recovery.strategy=copy"]),
    "random": (False, ["recovery.strategy=random"]),
    "plus": (True, ["recovery.strategy=checkfree_plus", "recovery.partner_rule=average"]),
    "partner_copy": (True, ["recovery.strategy=checkfree_plus", "recovery.partner_rule=copy"]),
}
# keys the reference run fixes for every arm forked from it (its engine tracks the norms so)
_REFERENCE_KEYS = ("recovery.norm_scope=", "recovery.norm_ema_beta=")
_REBUILT_KEYS = ("method", "sources", "weights", "path", "edge")


def parse_methods(names: Sequence[str]) -> dict[str, tuple[bool, list[str]]]:
    """Built-in method names, or ``name=base+key=value,key=value`` (an ablation on a built-in method).

    Raises:
        ValueError: a name that is neither, or an ablation of a key the reference run fixes.
    """
    out = {}
    for spec in names:
        if spec in METHODS:
            out[spec] = METHODS[spec]
            continue
        name, _, rest = spec.partition("=")
        base, _, extra = rest.partition("+")
        if base not in METHODS or not name:
            raise ValueError(f"--methods: {spec!r} is neither one of {', '.join(METHODS)} nor NAME=BASE+key=value,...")
        swap, overrides = METHODS[base]
        extra_kv = [kv for kv in extra.split(",") if kv]
        fixed = [kv for kv in extra_kv if kv.startswith(_REFERENCE_KEYS)]
        if fixed:
            raise ValueError(
                f"--methods {spec!r}: {fixed} is fixed by the reference run the arms fork from (its engine tracks "
                "its norms so); measure it with a reference of its own (a separate run with the key set for all)"
            )
        out[name] = (swap, [*overrides, *extra_kv])
    return out


def stage_label(stage: int, num_stages: int) -> str:
    """How the tables name a stage position: first, last, partner (next to an edge) or middle."""
    if stage == 0:
        return "first"
    if stage == num_stages - 1:
        return "last"
    if stage in (1, num_stages - 2):
        return f"partner({stage})"
    return f"middle({stage})"


def lag_at_end(ref: Curve, curve: Curve) -> int | None:
    """Steps the arm is behind its reference at the end of the horizon: how long before the arm's last
    evaluation the reference had first reached the arm's final best-so-far loss (negative: the arm got to the
    reference's final best first, so it is ahead). None: the arm ends worse than the reference was right
    after the loss, so it is behind by more than the horizon (a censored value, counted apart). Unlike q, it
    needs no target, so it measures a lag where the arm never reaches one."""
    end = curve[-1][0]
    arm_best, ref_best = min(v for _, v in curve), min(v for _, v in ref)
    if arm_best <= ref_best:
        return -(end - steps_to_target(curve, ref_best)[0])
    if ref[0][1] < arm_best:  # the reference was past it already at its first evaluation after the loss
        return None
    return end - steps_to_target(ref, arm_best)[0]


def rebuilt_events(events_path: str | Path) -> list[dict]:
    """The ``rebuilt`` events of an arm's events.jsonl, with the fields the result keeps."""
    lines = Path(events_path).read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [{k: e.get(k) for k in _REBUILT_KEYS} for e in events if e["event"] == "rebuilt"]


def from_disk(
    runs_dir: str | Path, seeds: Sequence[int], methods: dict, stages: Sequence[int], fail_at: int, horizon: int
) -> list[dict]:
    """The results of finished runs, read back from ``runs_dir`` (every reference and arm keeps its
    metrics.jsonl, in ``s<seed>/ref-<family>`` and ``s<seed>/<method>-stage<stage>``): an interrupted
    measurement is analysed with what it finished; an arm counts only if it trained to the end of the
    horizon."""
    results = []
    end = fail_at + horizon

    def curve(d: Path) -> Curve | None:
        if not (d / "metrics.jsonl").is_file():
            return None
        c = [(p.steps, p.loss) for p in val_curve(read_metrics(d)) if p.steps > fail_at]
        return c if c and c[-1][0] >= end else None

    for seed in seeds:
        d = Path(runs_dir) / f"s{seed}"
        res = {"seed": seed, "refs": {}, "arms": []}
        for family in ("plain", "swap"):
            ref = curve(d / f"ref-{family}")
            if ref is not None:
                res["refs"][family] = ref
        for name, (swap, _) in methods.items():
            family = "swap" if swap else "plain"
            for stage in stages:
                arm_dir = d / f"{name}-stage{stage}"
                c = curve(arm_dir)
                if c is None or family not in res["refs"]:
                    continue
                rebuilt = rebuilt_events(arm_dir / "events.jsonl")
                res["arms"].append({"method": name, "stage": stage, "family": family, "curve": c, "rebuilt": rebuilt})
        if res["arms"]:
            results.append(res)
    return results


def arm_row(seed: int, arm: dict, ref: Curve, fail_at: int, target_after: Sequence[int]) -> dict:
    """One arm's per-seed values against its reference: jump, gap and lag at the end, q to each target."""
    ref_at = dict(ref)
    curve = arm["curve"]
    first = min(s for s, _ in curve)
    row = {
        "seed": seed,
        "method": arm["method"],
        "stage": arm["stage"],
        "family": arm["family"],
        "jump": dict(curve)[first] - ref_at[first],  # val loss right after the rebuild, over the reference's
        "gap_end": curve[-1][1] - ref_at[curve[-1][0]],
        "lag_end": lag_at_end(ref, curve),
        "rebuilt": arm["rebuilt"],
    }
    for k in target_after:
        target = min(v for s, v in ref if s <= fail_at + k)  # best the reference had reached by F + k
        ref_got, arm_got = steps_to_target(ref, target), steps_to_target(curve, target)
        row[f"q@{k}"] = None if arm_got is None else arm_got[0] - ref_got[0]
        row[f"reached@{k}"] = arm_got is not None
    return row


def summarise(
    rows: Sequence[dict], methods: Sequence[str], stages: Sequence[int], num_stages: int, target_after: Sequence[int]
) -> dict[str, dict]:
    """{"method/stage": cell} over seeds: bootstrap intervals of the jump, the gap and the lag at the end
    (arms behind by more than the horizon counted apart), and of q to each target over the seeds that
    reached it (counted)."""
    table = {}
    for name in methods:
        for stage in stages:
            r = [x for x in rows if x["method"] == name and x["stage"] == stage]
            if not r:
                continue
            cell = {
                "label": stage_label(stage, num_stages),
                "jump": bootstrap([x["jump"] for x in r]).as_dict(),
                "gap_end": bootstrap([x["gap_end"] for x in r]).as_dict(),
                "lag_end": bootstrap([x["lag_end"] for x in r if x["lag_end"] is not None]).as_dict(),
                "lag_beyond_horizon": sum(x["lag_end"] is None for x in r),
                "seeds": len(r),
            }
            for k in target_after:
                reached = [x[f"q@{k}"] for x in r if x[f"reached@{k}"]]
                cell[f"q@{k}"] = bootstrap(reached).as_dict()
                cell[f"reached@{k}"] = len(reached)
            table[f"{name}/{stage}"] = cell
    return table


def analyse(
    results: Sequence[dict],
    methods: Sequence[str],
    stages: Sequence[int],
    num_stages: int,
    fail_at: int,
    target_after: Sequence[int],
) -> dict:
    """``{"rows": per seed and arm (arm_row), "table": per method and stage (summarise)}`` of ``results``:
    ``[{"seed", "refs": {family: curve}, "arms": [{"method", "stage", "family", "curve", "rebuilt"}]}]``."""
    rows = [
        arm_row(res["seed"], arm, res["refs"][arm["family"]], fail_at, target_after)
        for res in results
        for arm in res["arms"]
    ]
    return {"rows": rows, "table": summarise(rows, methods, stages, num_stages, target_after)}


def markdown(
    analysis: dict, methods: Sequence[str], stages: Sequence[int], target_after: Sequence[int], header: str
) -> str:
    """``header``, a blank line and the table of ``analysis["table"]``, one row per method and stage."""
    table = []
    for name in methods:
        for stage in stages:
            c = analysis["table"].get(f"{name}/{stage}")
            if c is None:
                continue
            qs = [
                cell
                for k in target_after
                for cell in (fmt_interval(c[f"q@{k}"], 1), f"{c[f'reached@{k}']}/{c['seeds']}")
            ]
            lag = (
                [fmt_interval(c["lag_end"], 1), f"{c['lag_beyond_horizon']}/{c['seeds']}"]
                if "lag_end" in c
                else ["-", "-"]
            )
            table.append([name, c["label"], fmt_interval(c["jump"], 3), *qs, fmt_interval(c["gap_end"], 3), *lag])
    headers = ["method", "stage", "jump of val loss"]
    headers += [h for k in target_after for h in (f"q (target F+{k})", "reached")]
    headers += ["gap at the end", "steps behind at the end", "behind by more than the horizon"]
    return f"{header}\n\n" + markdown_table(headers, table)


def scan_markdown(
    rows: Sequence[dict],
    methods: Sequence[str],
    stages: Sequence[int],
    num_stages: int,
    scan: Sequence[int],
    scan_train: int,
    header: str,
) -> str:
    """The regime scan's table: per loss step F, method and stage, the reference's validation loss, the
    jump right after the rebuild and the gap ``scan_train`` steps later (bootstrap over seeds)."""
    table = []
    for point in sorted(scan):
        for name in methods:
            for stage in stages:
                r = [x for x in rows if x["fail_at"] == point and x["method"] == name and x["stage"] == stage]
                if not r:
                    continue
                ref = sum(x["ref_val"] for x in r) / len(r)
                jump = bootstrap([x["jump"] for x in r]).fmt(3)
                later = bootstrap([x["gap_later"] for x in r]).fmt(3)
                table.append([point, f"{ref:.3f}", name, stage_label(stage, num_stages), jump, later])
    headers = ["step F", "reference val", "method", "stage", "jump right after", f"gap {scan_train} steps later"]
    return f"{header}\n\n" + markdown_table(headers, table)
