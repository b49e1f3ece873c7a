"""
Recoveries
==========

Every stage loss of a swarm run with its recovery, from the merged events (``recoveries``), and the table
``checkfree swarm`` prints of them (``recovery_table``).

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
"""

from __future__ import annotations

import signal


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
    for pub in published_epochs(events):
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


def published_epochs(events: list[dict]) -> list[dict]:
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
