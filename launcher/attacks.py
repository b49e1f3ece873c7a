"""
Attacks
=======

Attacks told from faults in a swarm run's merged events (summary.json's ``attacks``): what reached the peers'
open ports (the sums of their ``peer_counters``, ``counter_totals``) and the *healthy evictions*, peers whose
stage was given away although no failure was injected on them: a peer that was answering, declared lost
(``healthy_evictions``). In a run nobody attacked, both the healthy evictions and the counters of
``checkfree.swarm.probe.ATTACK_COUNTERS`` are 0.
"""

from __future__ import annotations

import math
from collections import Counter

from checkfree.swarm.config import BENIGN_CHAOS_KINDS
from launcher.recoveries import published_epochs


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


# the launcher logs a kill just after sending it: the leader may publish the loss in between
KILL_LOG_LAG_S = 0.5


def healthy_evictions(events: list[dict], hang_s: float, grace_s: float = 5.0) -> list[dict]:
    """Peers evicted though no fault explains it. An eviction is either of:

    - ``lost``: a published epoch (after the first) lists the stage of the previous epoch's holder and gives it
      to another peer, while a benign chaos kind hit the holder or up to ``hang_s`` + ``grace_s`` after (a
      loss nothing hit is the peer's own crash; one whose holder keeps the stage, a live holder without valid
      weights rebuilding it again after its rebuild broke off, is no eviction);
    - ``replaced``: the peer logged that its stage was given to another (a live peer learning it).

    A fault before the eviction explains it: a launcher ``failure`` (killed, frozen or cut off by the launcher,
    by chaos, or at its own drawn failure with ``swarm.inject=peer``) or a ``chaos`` event naming the peer that
    is not benign (a probe flood, a starvation: they fail nothing, so no stage may be lost to them). Every such
    fault is final (the peer never serves again); one after the eviction explains nothing (chaos may hit a peer
    that is leaving), except up to ``KILL_LOG_LAG_S`` after a ``lost`` (a peer cannot log ``replaced`` once a
    kill or a hang reached it).

    Args:
        events: the run's merged events (``RUN_DIR/events.jsonl``: the launcher's and every peer's), by time.
        hang_s: the swarm's ``membership.hang_s``.
        grace_s: how much longer than ``hang_s`` after a benign hit a loss is still put down to it.

    Returns:
        One row a peer, its first eviction, in time order: ``peer``, ``how`` (``lost`` or ``replaced``),
        ``stage`` (the stage it held), ``epoch`` (the epoch that gave the stage away; ``by_epoch`` repeats it
        under summary.json's first name for it), ``time``, ``excluded`` (the leader excluded it on its
        neighbours' blame, ``peer_excluded``: answering probes while its data plane failed them),
        ``benign_chaos`` (the kinds of the benign chaos events that named it before, in order: what it was
        under) and ``hits`` (those of them recent enough to have caused it: kind, start, end).
    """
    first_fault, hits = _faults_and_hits(events)
    recent = lambda pid, t: [h for h in hits.get(pid, []) if h["start"] <= t <= h["end"] + hang_s + grace_s]
    excluded = {e["excluded"] for e in events if e["event"] == "peer_excluded"}
    found = [row for row in _lost(events, first_fault) if recent(row["peer"], row["time"])]
    found += [
        {"peer": e["peer"], "how": "replaced", "stage": e.get("stage_held"), "epoch": e["by_epoch"], "time": e["time"]}
        for e in events
        if e["event"] == "replaced" and first_fault.get(e["peer"], math.inf) > e["time"]
    ]
    out: dict[str, dict] = {}
    for row in sorted(found, key=lambda r: r["time"]):
        peer, t = row["peer"], row["time"]
        out.setdefault(
            peer,
            {
                **row,
                "by_epoch": row["epoch"],
                "excluded": peer in excluded,
                "benign_chaos": [h["kind"] for h in hits.get(peer, []) if h["start"] <= t],
                "hits": recent(peer, t),
            },
        )
    return list(out.values())


def _faults_and_hits(events: list[dict]) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """(each peer's first fault time, the benign chaos events that named each peer: kind, start, end)."""
    first_fault: dict[str, float] = {}
    hits: dict[str, list[dict]] = {}
    for e in events:
        if e["event"] == "failure" and e.get("peer"):
            first_fault[e["peer"]] = min(first_fault.get(e["peer"], math.inf), e["time"])
        elif e["event"] == "chaos" and (e.get("benign") or e["kind"] in BENIGN_CHAOS_KINDS):
            for pid in e["peers"]:
                end = e["time"] + e.get("duration_s", 0.0)
                hits.setdefault(pid, []).append({"kind": e["kind"], "start": e["time"], "end": end})
        elif e["event"] == "chaos" and e["kind"] != "spare_arrival":
            for pid in e["peers"]:
                first_fault[pid] = min(first_fault.get(pid, math.inf), e["time"])
    return first_fault, hits


def _lost(events: list[dict], first_fault: dict[str, float]) -> list[dict]:
    """The holders of the stages each published epoch lists lost and gives to another peer, no fault before."""
    published = published_epochs(events)
    out = []
    for prev, pub in zip(published, published[1:]):
        for stage in pub["lost"]:
            holder = prev["roster"][stage] if stage < len(prev["roster"]) else None
            if holder is None or holder == pub["roster"][stage]:  # it keeps the stage: it was not declared lost
                continue
            if first_fault.get(holder, math.inf) > pub["time"] + KILL_LOG_LAG_S:
                out.append(
                    {"peer": holder, "how": "lost", "stage": stage, "epoch": pub["new_epoch"], "time": pub["time"]}
                )
    return out


def attacks(events: list[dict], hang_s: float) -> dict:
    """summary.json's ``attacks``: what reached the peers' open ports and the evictions no fault explains.

    Args:
        events: the run's merged events, by time.
        hang_s: the swarm's ``membership.hang_s`` (``healthy_evictions``).

    Returns:
        ``counters`` (``counter_totals``' sums: probe port, ``records_foreign``, ``revived`` and ``gate_*``
        counts), ``peers_with_counters``, ``peers_without_counters`` (peer processes that wrote no
        ``peer_counters``: killed, frozen, or not ended), ``num_healthy_evictions`` and
        ``healthy_evictions`` (``healthy_evictions``' rows).
    """
    totals, with_counters, without = counter_totals(events)
    healthy = healthy_evictions(events, hang_s)
    return {
        "counters": totals,
        "peers_with_counters": with_counters,
        "peers_without_counters": without,
        "num_healthy_evictions": len(healthy),
        "healthy_evictions": healthy,
    }
