"""
Swarm report
============

After a swarm run: merge every peer's events and metrics into the run directory (``events.jsonl``
sorted by time, ``metrics.jsonl`` by step), check that no step was skipped or applied twice (``timeline``),
and sum it up in summary.json (``merge_run``): every stage loss with its recovery (``launcher.recoveries``)
and the attacks told from faults (``launcher.attacks``).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from checkfree import __version__
from launcher.attacks import attacks
from launcher.recoveries import completed_recoveries, recoveries
from launcher.recoveries import recovery_table as recovery_table  # re-exported: checkfree swarm prints it


def _read_lines(path: Path) -> list[dict]:
    """A JSON-lines file, without a line that does not parse: the last line of a file still being written,
    or of a peer killed while writing it."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _events(run_dir: Path) -> list[dict]:
    events = []
    for f in [run_dir / "launcher-events.jsonl", *sorted((run_dir / "peers").glob("*/events.jsonl"))]:
        if f.is_file():
            events += _read_lines(f)
    return sorted(events, key=lambda e: e["time"])


def _metrics(run_dir: Path) -> list[dict]:
    """One row per (epoch, step) committed: every stage logs each commit; validation rows are merged in.
    A step in two epochs was applied twice (or redone after a rollback)."""
    by_commit: dict[tuple[int, int], dict] = {}
    vals: dict[tuple[int, int], float] = {}
    for f in sorted((run_dir / "peers").glob("*/metrics.jsonl")):
        for r in _read_lines(f):
            key = (r["epoch"], r["step"])
            if "loss/val" in r:
                vals[key] = r["loss/val"]
            else:
                by_commit.setdefault(key, r)  # every stage's record of one commit has the same loss
    for key, v in vals.items():
        if key in by_commit:
            by_commit[key]["loss/val"] = v
    return sorted(by_commit.values(), key=lambda r: (r["time/wall"], r["step"]))


class Timeline(NamedTuple):
    repeated: list[int]
    redone: list[int]
    skipped: list[int]
    lost: list[int]


def committers(run_dir: Path) -> dict[tuple[int, int], set[str]]:
    """The peers that applied each (epoch, step): a peer's metrics rows are written as it commits."""
    out: dict[tuple[int, int], set[str]] = {}
    for f in sorted((run_dir / "peers").glob("*/metrics.jsonl")):
        for r in _read_lines(f):
            if "loss/val" not in r:
                out.setdefault((r["epoch"], r["step"]), set()).add(f.parent.name)
    return out


def _lost_with_their_peers(m: dict, events: list[dict], applied_by: dict[tuple[int, int], set[str]] | None) -> bool:
    """A commit whose every applier was gone when a later epoch resumed at or before its step: the weights
    that held it were lost with those peers (the survivors had not applied it), so the swarm redid it. A
    commit that one of its appliers carried into such an epoch is no such case: that peer would apply the
    step twice."""
    if applied_by is None:
        return False
    peers = applied_by.get((m["epoch"], m["step"]), set())
    return any(
        e["event"] == "epoch_published"
        and e["new_epoch"] > m["epoch"]
        and e.get("roster")
        and e.get("step", m["step"] + 1) <= m["step"]
        and not peers & set(e["roster"])
        for e in events
    )


def timeline(
    metrics: list[dict], events: list[dict], applied_by: dict[tuple[int, int], set[str]] | None = None
) -> Timeline:
    """(repeated, redone, skipped, lost) steps of the run's final timeline.

    A swarm-wide rollback (a published epoch E with ``rollback_to`` r) abandons every commit of a step >= r
    made in an epoch before E: those steps are *redone*, by design. A rollback that broke off half-way,
    after which the swarm went on past every step committed before E, abandons nothing. Given who applied
    each commit (``applied_by``), a commit whose appliers were all lost before a later epoch resumed at or
    before its step is *lost* with them and redone, by design (see ``_lost_with_their_peers``). The commits
    not abandoned form the final timeline, on which every step must appear exactly once: a step on it twice
    was applied twice (*repeated*), one missing from it was never applied (*skipped*), both bugs."""
    rollbacks = []
    for e in events:
        if e["event"] == "epoch_published" and e.get("rollback_to") is not None:
            epoch = e["new_epoch"]
            before = [m["step"] for m in metrics if m["epoch"] < epoch]
            later = [m["step"] for m in metrics if m["epoch"] >= epoch]
            went_on = before and later and min(later) > max(before)
            rollbacks.append((epoch, min(later) if went_on else e["rollback_to"]))
    kept: list[int] = []
    redone: set[int] = set()
    lost: set[int] = set()
    for m in metrics:
        if any(m["epoch"] < epoch and m["step"] >= to for epoch, to in rollbacks):
            redone.add(m["step"])
        elif _lost_with_their_peers(m, events, applied_by):
            lost.add(m["step"])
        else:
            kept.append(m["step"])
    counts = Counter(kept)
    repeated = sorted(s for s, n in counts.items() if n > 1)
    skipped = sorted(set(range(max(kept, default=-1) + 1)) - set(kept))
    return Timeline(repeated, sorted(redone), skipped, sorted(lost))


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "max": max(values), "n": len(values)}


def count_recoveries(run_dir: str | Path) -> int:
    """``completed_recoveries`` of a run directory's events as they are now (the run may go on)."""
    return completed_recoveries(recoveries(_events(Path(run_dir))))


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
    repeated, redone, skipped, lost = timeline(metrics, events, committers(run_dir))
    rows = recoveries(events)
    with open(run_dir / "recoveries.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    rollback = cfg.recovery.strategy == "checkpoint"
    return {
        "checkfree_version": __version__,
        "steps": len(set(steps)),
        "repeated_steps": repeated,
        "redone_steps": redone,
        "skipped_steps": skipped,
        "lost_steps": lost,  # applied only by peers lost before the swarm went on; redone
        "rollback_strategy": rollback,
        "first_train_loss": metrics[0]["loss/train"] if metrics else None,
        "final_train_loss": metrics[-1]["loss/train"] if metrics else None,
        "final_val_loss": next((m["loss/val"] for m in reversed(metrics) if "loss/val" in m), None),
        "failures": len(rows),  # stage losses, and launcher kills no published epoch lists
        "recoveries": completed_recoveries(rows),
        "injected_failures": sum(1 for e in events if e["event"] == "failure"),
        "stage_losses": sum(1 for r in rows if r["epoch"] is not None),
        "detect_s": _stats([r["detect_s"] for r in rows]),
        "decide_s": _stats([r["decide_s"] for r in rows]),
        "rebuild_s": _stats([r["rebuild_s"] for r in rows]),
        "resume_s": _stats([r["resume_s"] for r in rows]),
        "rendezvous_s": _stats([r["rendezvous_s"] for r in rows]),
        "transfer_s": _stats([r["transfer_s"] for r in rows]),
        "kill_to_commit_s": _stats([r["kill_to_commit_s"] for r in rows]),
        "mean_tokens_per_s": statistics.mean(m["throughput/tokens_per_s"] for m in metrics) if metrics else None,
        "recovery_rows": rows,
        "attacks": attacks(events, cfg.membership.hang_s),
    }
