"""
Swarm report
============

After a swarm run: merge every peer's events and metrics into the run directory (``events.jsonl``
sorted by time, ``metrics.jsonl`` by step), check that no step was skipped or applied twice, and pair
each injected failure with its recovery to measure detect / rebuild / resume seconds:

- detect_s: from the kill to the first peer noticing (a transport error or timeout aborting its step);
- rebuild_s: from detection to the replacement peer having rebuilt the stage (waiting for the spare,
  rendezvous of the new epoch and the weight transfer included);
- resume_s: from the rebuild to the first step committed in the new epoch.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from checkfree import __version__
from checkfree.core.metrics import read_jsonl


def _events(run_dir: Path) -> list[dict]:
    events = []
    for f in [run_dir / "launcher-events.jsonl", *sorted((run_dir / "peers").glob("*/events.jsonl"))]:
        if f.is_file():
            events += read_jsonl(f)
    return sorted(events, key=lambda e: e["time"])


def _metrics(run_dir: Path) -> list[dict]:
    """One row per (epoch, step) committed: every stage logs each commit; validation rows are merged in.
    A step in two epochs was applied twice (or redone after a rollback)."""
    by_commit: dict[tuple[int, int], dict] = {}
    vals: dict[tuple[int, int], float] = {}
    for f in sorted((run_dir / "peers").glob("*/metrics.jsonl")):
        for r in read_jsonl(f):
            key = (r["epoch"], r["step"])
            if "loss/val" in r:
                vals[key] = r["loss/val"]
            else:
                by_commit.setdefault(key, r)  # every stage's record of one commit has the same loss
    for key, v in vals.items():
        if key in by_commit:
            by_commit[key]["loss/val"] = v
    return sorted(by_commit.values(), key=lambda r: (r["time/wall"], r["step"]))


def recoveries(events: list[dict]) -> list[dict]:
    """One row per kill: the recovery that followed it, with its timings (None where it never came)."""
    rows = []
    kills = [e for e in events if e["event"] == "failure"]
    for n, k in enumerate(kills):
        # kills of one launcher poll (several stages lost in the same step) share one recovery window
        until = next(
            (
                later["time"]
                for later in kills[n + 1 :]
                if (later.get("epoch"), later.get("step")) != (k.get("epoch"), k.get("step"))
            ),
            float("inf"),
        )
        after = [e for e in events if k["time"] < e["time"] < until]
        aborted = next((e for e in after if e["event"] == "step_aborted"), None)
        published = next(
            (e for e in after if e["event"] == "epoch_published" and k["stage"] in e.get("lost", [])), None
        )
        rebuilt = resumed = None
        if published:
            epoch = published["new_epoch"]
            rebuilt = next(
                (e for e in after if e["event"] == "rebuilt" and e["stage"] == k["stage"] and e["epoch"] == epoch), None
            )
            if rebuilt is None and published.get("rollback_to") is not None:  # checkpoint: the whole swarm rolls back
                new_peer = published["roster"][k["stage"]]
                rebuilt = next(
                    (
                        {
                            **e,
                            "method": "checkpoint",
                            "path": f"rollback to step {e['to_step']}",
                            "sources": [],
                            "weights": [],
                            "duration_s": e.get("restore_s"),
                        }
                        for e in after
                        if e["event"] == "rolled_back" and e["peer"] == new_peer and e["epoch"] == epoch
                    ),
                    None,
                )
            resumed = next((e for e in after if e["event"] == "resumed" and e["epoch"] == epoch), None)
        detect_t = min((e["time"] for e in (aborted, published) if e), default=None)
        rows.append(
            {
                "stage": k["stage"],
                "signal": k["signal"],
                "killed_peer": k["peer"],
                "kill_step": k["step"],
                "new_peer": rebuilt["peer"] if rebuilt else None,
                "method": rebuilt["method"] if rebuilt else None,
                "path": rebuilt["path"] if rebuilt else None,
                "sources": rebuilt["sources"] if rebuilt else None,
                "weights": rebuilt["weights"] if rebuilt else None,
                "detect_s": detect_t - k["time"] if detect_t else None,
                "rebuild_s": rebuilt["time"] - detect_t if rebuilt and detect_t else None,
                "transfer_and_rebuild_s": rebuilt["duration_s"] if rebuilt else None,
                "resume_s": resumed["time"] - rebuilt["time"] if resumed and rebuilt else None,
                "detected_by": (aborted or {}).get("error") or ("heartbeat" if published else None),
            }
        )
    return rows


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "max": max(values), "n": len(values)}


def recovery_table(rows: list[dict]) -> str:
    lines = ["stage  signal   method            detect_s  rebuild_s  resume_s  new_peer"]
    for r in rows:
        fmt = lambda v: f"{v:8.2f}" if v is not None else "       -"
        lines.append(
            f"{r['stage']:5d}  {r['signal']:7s}  {str(r['method']):16s} {fmt(r['detect_s'])}  "
            f"{fmt(r['rebuild_s'])}  {fmt(r['resume_s'])}  {r['new_peer']}"
        )
    return "\n".join(lines)


def merge_run(run_dir: str | Path, cfg) -> dict:
    run_dir = Path(run_dir)
    events = _events(run_dir)
    with open(run_dir / "events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
    metrics = _metrics(run_dir)
    t0 = min((e["time"] for e in events), default=0.0)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for m in metrics:
            f.write(json.dumps({**m, "time/train_s": m["time/wall"] - t0}) + "\n")
    steps = [m["step"] for m in metrics]
    rows = recoveries(events)
    with open(run_dir / "recoveries.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    rollback = cfg.recovery.strategy == "checkpoint"
    return {
        "checkfree_version": __version__,
        "steps": len(set(steps)),
        "repeated_steps": sorted({s for s in steps if steps.count(s) > 1}),
        "skipped_steps": sorted(set(range(max(steps, default=-1) + 1)) - set(steps)),
        "rollback_strategy": rollback,
        "first_train_loss": metrics[0]["loss/train"] if metrics else None,
        "final_train_loss": metrics[-1]["loss/train"] if metrics else None,
        "final_val_loss": next((m["loss/val"] for m in reversed(metrics) if "loss/val" in m), None),
        "failures": len(rows),
        "recoveries": sum(1 for r in rows if r["new_peer"]),
        "detect_s": _stats([r["detect_s"] for r in rows]),
        "rebuild_s": _stats([r["rebuild_s"] for r in rows]),
        "resume_s": _stats([r["resume_s"] for r in rows]),
        "mean_tokens_per_s": statistics.mean(m["throughput/tokens_per_s"] for m in metrics) if metrics else None,
        "recovery_rows": rows,
    }
