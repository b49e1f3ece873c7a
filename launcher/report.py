"""
Swarm report
============

After a swarm run: merge every peer's events and metrics into the run directory (``events.jsonl``
sorted by time, ``metrics.jsonl`` by step), check that no step was skipped or applied twice, and list
every stage loss with its recovery (``recoveries``).

A stage loss is what the peers saw, not what the launcher did: every stage in the ``lost`` list of a
published epoch is one loss, whether the launcher injected it, something outside killed the peer, it
crashed, or its host vanished. A loss the launcher injected is paired with its ``failure`` event (the
kill time is then known); a launcher ``failure`` that no published epoch lists (the run ended or the
swarm stopped first) still gets a row, so nothing injected drops out of the report. Timings, in seconds:

- detect_s: from the kill to detection, the first peer noticing (a transport error or timeout aborting
  its step) or the leader publishing the next epoch, whichever came first. None for a loss the launcher
  did not inject: its true time is unknown (no peer logs its own death);
- decide_s: from detection to the leader publishing the epoch that replaces the lost peer;
- rebuild_s: from detection to the replacement peer having rebuilt the stage (waiting for the spare,
  rendezvous of the new epoch and the weight transfer included);
- resume_s: from the rebuild to the first step committed in the new epoch.

Phases of the same recovery, end to end (issue #9's breakdown): ``detect_s``, ``decide_s``, then
``rendezvous_s`` (from the publish until the new peer's transfer started: the new group forming),
``transfer_s`` (the transfer of weights and the rebuild), ``resume_s``; ``kill_to_commit_s`` is the sum,
from the kill to the first step committed after the recovery (injected losses only).

Under the checkpoint strategy the rebuild is the new peer's rollback (``rolled_back``).

Attacks are told from faults in ``attacks`` (see ``attacks``): what reached the peers' open ports (the sums
of their ``peer_counters``) and the *healthy evictions*, peers whose stage was given away (``replaced``)
although no failure was injected on them: a peer that was answering, declared lost. In a run nobody
attacked, the healthy evictions and the counters of ``checkfree.swarm.probe.ATTACK_COUNTERS`` are 0.
"""

from __future__ import annotations

import json
import signal
import statistics
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from checkfree import __version__


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


def recoveries(events: list[dict]) -> list[dict]:
    """One row per stage loss: each stage lost in a published epoch, then each launcher ``failure`` that no
    published epoch lists; with its recovery and timings (None where they never came or are unknown).

    Args:
        events: the merged events of the launcher and every peer, sorted by time.

    Returns:
        Rows in the order the losses were published (a failure never published: at its kill time). A row:
        ``epoch`` (the new epoch, None if never published), ``stage``, ``lost_peer`` (the stage's holder in
        the previous published epoch; ``killed_peer`` is the same), ``injected`` (paired with a launcher
        ``failure``), ``signal`` (the launcher's; for another loss the signal that ended a process the
        launcher spawned, from ``peer_exited``, else None), ``loss_time`` (the kill time; for a loss not
        injected, an estimate: the first step aborted in the old epoch after it was published, else the
        publish time), ``kill_step`` and ``iteration`` (the launcher's, injected only), ``new_peer``,
        ``method``, ``path``, ``sources``, ``weights`` (from ``rebuilt``, or the new peer's ``rolled_back``
        under the checkpoint strategy; None if the epoch broke off first: a later epoch lists the stage
        again, in a row of its own), ``completed`` (the new epoch resumed training), the timings of the
        module docstring, ``transfer_and_rebuild_s`` and ``detected_by`` (the aborting error, or
        "heartbeat" when the leader published first).
    """
    failures = [e for e in events if e["event"] == "failure"]
    exited = {e["peer"]: e["returncode"] for e in events if e["event"] == "peer_exited"}
    paired: set[int] = set()  # indices into failures
    keyed: list[tuple[float, dict]] = []
    prev = None
    for pub in _published(events):
        for stage in pub["lost"]:
            lost_peer = prev["roster"][stage] if prev else None
            n = _pair(failures, paired, lost_peer, stage, pub["time"])
            kill = failures[n] if n is not None else None
            if kill is not None:
                paired.add(n)
                lost_peer = kill["peer"]  # the same peer, or the only clue where the previous roster is unknown
            row = _loss_row(events, pub, prev, stage, lost_peer, kill)
            if kill is None:
                row["signal"] = _signal(exited.get(lost_peer))
            keyed.append((pub["time"], row))
        prev = pub
    for n, kill in enumerate(failures):
        if n not in paired:
            keyed.append((kill["time"], _unpublished_row(events, kill)))
    return [row for _, row in sorted(keyed, key=lambda kr: kr[0])]  # stable: a published epoch's lost order


def _published(events: list[dict]) -> list[dict]:
    """The leader's ``epoch_published`` events, one per new epoch (the first where one was logged twice)."""
    first: dict[int, dict] = {}
    for e in events:
        if e["event"] == "epoch_published":
            first.setdefault(e["new_epoch"], e)
    return [first[k] for k in sorted(first)]


def _pair(failures: list[dict], paired: set[int], lost_peer: str | None, stage: int, before: float) -> int | None:
    """The launcher failure of this loss, among the unpaired kills before the publish: the kill of
    ``lost_peer``; where the previous roster is unknown (its epoch_published is missing), the latest kill
    of ``stage``. (A peer listed lost may live on and take its stage again, so a later kill of it belongs
    to a later loss.)"""
    if lost_peer is not None:
        found = [n for n, f in enumerate(failures) if f["peer"] == lost_peer]
    else:
        found = [n for n, f in enumerate(failures) if f["stage"] == stage]
    found = [n for n in found if n not in paired and failures[n]["time"] <= before]
    return found[-1] if found else None


def _first_abort(events: list[dict], epoch: int, since: float) -> dict | None:
    """The first ``step_aborted`` of a peer in ``epoch`` at or after ``since``."""
    found = (e for e in events if e["event"] == "step_aborted" and e["epoch"] == epoch and e["time"] >= since)
    return next(found, None)


def _loss_row(
    events: list[dict], pub: dict, prev: dict | None, stage: int, lost_peer: str | None, kill: dict | None
) -> dict:
    new_epoch = pub["new_epoch"]
    old_epoch = new_epoch - 1  # the leader publishes current + 1; a stop record is never epoch_published
    since = prev["time"] if prev else float("-inf")
    if kill is not None:
        loss_t = kill["time"]
    else:
        first = _first_abort(events, old_epoch, since)
        loss_t = first["time"] if first else pub["time"]
    aborted = _first_abort(events, old_epoch, max(since, loss_t))
    if aborted is not None and aborted["time"] > pub["time"]:
        aborted = None  # the leader saw it first
    detect_t = aborted["time"] if aborted else pub["time"]
    rebuilt = _rebuilt(events, pub, stage)
    resumed = next((e for e in events if e["event"] == "resumed" and e["epoch"] == new_epoch), None)
    return {
        **_base_row(stage, lost_peer, kill),
        "epoch": new_epoch,
        "loss_time": loss_t,
        "new_peer": rebuilt["peer"] if rebuilt else None,
        "method": rebuilt["method"] if rebuilt else None,
        "path": rebuilt["path"] if rebuilt else None,
        "sources": rebuilt["sources"] if rebuilt else None,
        "weights": rebuilt["weights"] if rebuilt else None,
        "completed": resumed is not None,
        "detect_s": detect_t - kill["time"] if kill else None,
        "decide_s": pub["time"] - detect_t,
        "rebuild_s": rebuilt["time"] - detect_t if rebuilt else None,
        "transfer_and_rebuild_s": rebuilt["duration_s"] if rebuilt else None,
        "rendezvous_s": rebuilt["time"] - rebuilt["duration_s"] - pub["time"] if rebuilt else None,
        "transfer_s": rebuilt["duration_s"] if rebuilt else None,
        "resume_s": resumed["time"] - rebuilt["time"] if resumed and rebuilt else None,
        "kill_to_commit_s": resumed["time"] - kill["time"] if resumed and kill else None,
        "detected_by": aborted["error"] if aborted else "heartbeat",
    }


def _rebuilt(events: list[dict], pub: dict, stage: int) -> dict | None:
    """The new peer's ``rebuilt`` of ``stage`` in the published epoch, or under the checkpoint strategy
    (the whole swarm rolls back) its ``rolled_back``, dressed as a rebuild."""
    epoch = pub["new_epoch"]
    rebuilt = next((e for e in events if e["event"] == "rebuilt" and e["stage"] == stage and e["epoch"] == epoch), None)
    if rebuilt is not None or pub["rollback_to"] is None:
        return rebuilt
    new_peer = pub["roster"][stage]
    rolled = next(
        (e for e in events if e["event"] == "rolled_back" and e["peer"] == new_peer and e["epoch"] == epoch), None
    )
    if rolled is None:
        return None
    return {
        **rolled,
        "method": "checkpoint",
        "path": f"rollback to step {rolled['to_step']}",
        "sources": [],
        "weights": [],
        "duration_s": rolled["restore_s"],
    }


def _unpublished_row(events: list[dict], kill: dict) -> dict:
    """A launcher kill that no published epoch lists: detected at most."""
    aborted = _first_abort(events, kill["epoch"], kill["time"])
    return {
        **_base_row(kill["stage"], kill["peer"], kill),
        "epoch": None,
        "loss_time": kill["time"],
        **dict.fromkeys(("new_peer", "method", "path", "sources", "weights"), None),
        "completed": False,
        "detect_s": aborted["time"] - kill["time"] if aborted else None,
        **dict.fromkeys(
            ("decide_s", "rebuild_s", "transfer_and_rebuild_s", "rendezvous_s", "transfer_s", "resume_s"), None
        ),
        "kill_to_commit_s": None,
        "detected_by": aborted["error"] if aborted else None,
    }


def _base_row(stage: int, lost_peer: str | None, kill: dict | None) -> dict:
    return {
        "stage": stage,
        "lost_peer": lost_peer,
        "killed_peer": lost_peer,  # the name before losses not injected were reported
        "injected": kill is not None,
        "signal": kill["signal"] if kill else None,
        "kill_step": kill["step"] if kill else None,
        "iteration": kill["iteration"] if kill else None,
    }


def _signal(returncode: int | None) -> str | None:
    """The signal that ended a process (a negative return code), by name."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return None


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "max": max(values), "n": len(values)}


def recovery_table(rows: list[dict]) -> str:
    """The rows as a text table; ``*`` marks a loss the launcher injected, ``-`` a value that never came."""
    lines = ["epoch  stage  signal    method           detect_s  decide_s  rebuild_s  resume_s  new_peer"]
    fmt = lambda v: f"{v:8.2f}" if v is not None else "       -"
    for r in rows:
        lines.append(
            f"{'-' if r['epoch'] is None else r['epoch']:>5}  {r['stage']:5d}  {r['signal'] or '-':7s}"
            f"{'*' if r['injected'] else ' '}  {str(r['method']):16s} {fmt(r['detect_s'])}  {fmt(r['decide_s'])}  "
            f"{fmt(r['rebuild_s']):>9}  {fmt(r['resume_s'])}  {r['new_peer'] or '-'}"
        )
    return "\n".join(lines)


def completed_recoveries(rows: list[dict]) -> int:
    """The recoveries of ``recoveries``' rows: the losses whose new peer resumed training (what summary.json
    and the launcher's status line both count)."""
    return sum(1 for r in rows if r["completed"] and r["new_peer"])


def count_recoveries(run_dir: str | Path) -> int:
    """``completed_recoveries`` of a run directory's events as they are now (the run may go on)."""
    return completed_recoveries(recoveries(_events(Path(run_dir))))


def counter_totals(events: list[dict]) -> tuple[dict[str, int], int, int]:
    """(per-key sums of each peer process's last ``peer_counters``, processes that wrote counters, processes
    that wrote none).

    A process is a peer id from its ``peer_started`` (or its first event) to the next ``peer_started`` of
    the same id: a restarted peer counts again from 0. Peers are those the launcher spawned and those that
    wrote events of their own (a swarm peer's carry ``stage_held``). One killed by SIGKILL, frozen, or still
    running writes no counters; its last heartbeat's are not on disk.
    """
    lives: dict[str, list[dict]] = {}  # peer id -> its processes: {"started": bool, "counters": dict | None}
    for e in events:
        if e["event"] == "peer_spawned":
            lives.setdefault(e["peer"], [{"started": False, "counters": None}])
        elif "stage_held" in e:  # written by the peer itself
            runs = lives.setdefault(e["peer"], [{"started": False, "counters": None}])
            if e["event"] == "peer_started":
                if runs[-1]["started"]:
                    runs.append({"started": False, "counters": None})
                runs[-1]["started"] = True
            elif e["event"] == "peer_counters":
                runs[-1]["counters"] = e["counters"]
    counts = [run["counters"] for runs in lives.values() for run in runs]
    totals: Counter[str] = Counter()
    for c in counts:
        if c is not None:
            totals.update(c)
    with_counters = sum(c is not None for c in counts)
    return dict(sorted(totals.items())), with_counters, len(counts) - with_counters


def healthy_evictions(events: list[dict]) -> list[dict]:
    """The peers that emitted ``replaced`` (a live peer learning its stage went to another) although no
    failure was injected on them before it: no launcher ``failure`` (killed, frozen or cut off by the
    launcher, by chaos, or at its own drawn failure with ``swarm.inject=peer``) and no ``chaos`` event
    naming it but a benign one (``benign``: a probe flood, a starvation; it fails nothing, so no stage may be
    lost to it). Every such fault is final (the peer never serves again), so any one before the ``replaced``
    explains it; one after it does not (chaos may hit a peer that is leaving).

    Returns:
        One row per ``replaced`` event, in time order: ``peer``, ``by_epoch`` (the epoch that gave its stage
        away), ``stage`` (the stage it held), ``excluded`` (the leader excluded it on its neighbours' blame,
        ``peer_excluded``: answering probes while its data plane failed them) and ``benign_chaos`` (the
        benign chaos kinds that named it before, in order: what it was under).
    """
    faults: dict[str, list[float]] = {}
    benign: dict[str, list[tuple[float, str]]] = {}
    for e in events:
        if e["event"] == "failure" and e.get("peer") is not None:
            faults.setdefault(e["peer"], []).append(e["time"])
        elif e["event"] == "chaos":
            for pid in e["peers"]:
                if e.get("benign"):
                    benign.setdefault(pid, []).append((e["time"], e["kind"]))
                else:
                    faults.setdefault(pid, []).append(e["time"])
    excluded = {e["excluded"] for e in events if e["event"] == "peer_excluded"}
    return [
        {
            "peer": e["peer"],
            "by_epoch": e["by_epoch"],
            "stage": e.get("stage_held"),
            "excluded": e["peer"] in excluded,
            "benign_chaos": [kind for t, kind in benign.get(e["peer"], []) if t <= e["time"]],
        }
        for e in events
        if e["event"] == "replaced" and not any(t <= e["time"] for t in faults.get(e["peer"], []))
    ]


def attacks(events: list[dict]) -> dict:
    """summary.json's ``attacks``: what reached the peers' open ports and the evictions no fault explains.

    Returns:
        ``counters`` (``counter_totals``' sums: probe port, ``records_foreign``, ``revived`` and ``gate_*``
        counts), ``peers_with_counters``, ``peers_without_counters`` (peer processes that wrote no
        ``peer_counters``: killed, frozen, or not ended), ``num_healthy_evictions`` and
        ``healthy_evictions`` (``healthy_evictions``' rows).
    """
    totals, with_counters, without = counter_totals(events)
    healthy = healthy_evictions(events)
    return {
        "counters": totals,
        "peers_with_counters": with_counters,
        "peers_without_counters": without,
        "num_healthy_evictions": len(healthy),
        "healthy_evictions": healthy,
    }


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
        "attacks": attacks(events),
    }
