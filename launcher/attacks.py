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

from collections import Counter


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
