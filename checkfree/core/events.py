"""
Events
======

The one event schema of both executors and the launcher: every line of an ``events.jsonl`` is
``{"event": NAME, "time": UNIX_SECONDS, ...fields}`` where NAME is one of ``EVENTS`` and the fields
include at least that event's required ones. The same name means the same thing wherever it is written,
so plots and reports read engine and swarm runs alike. ``EventLog.emit`` refuses an unknown name or a
missing field, so the schema cannot drift silently. Swarm peers add ``peer``, ``stage_held`` and
``epoch`` to every event they write.

An ``EventLog`` may be given a tracker (a ``MetricLogger``): every event is also handed to its
``track_event``, which turns failures, recoveries and their durations into TensorBoard / W&B counters.

The table of events and fields is in docs/ARCHITECTURE.md (generated from ``EVENTS`` by
``schema_table``; a test keeps the two equal).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from checkfree.core.metrics import JsonLines


@dataclass(frozen=True)
class EventType:
    name: str
    required: tuple[str, ...]
    written_by: str  # engine, swarm, launcher, or a combination
    meaning: str


_REBUILT_FIELDS = (
    "stage",
    "step",
    "strategy",
    "method",
    "path",
    "sources",
    "weights",
    "source_norms",
    "edge",
    "edge_staleness_steps",
    "lr",
    "duration_s",
)

EVENTS: dict[str, EventType] = {
    e.name: e
    for e in (
        # the life of a stage: both executors
        EventType(
            "failure",
            ("stage", "step", "iteration"),
            "engine, launcher",
            "a stage was lost at a step (engine: injected, with phase; launcher: a peer killed or frozen, with "
            "peer, pid, signal, epoch, injected_by (peer: it died at its own drawn failure; launcher: killed from "
            "outside) and delay_iterations (how late the launcher injected it))",
        ),
        EventType(
            "chaos",
            ("kind", "peers", "signal"),
            "launcher",
            "swarm.chaos injected an event (kind, the peers it killed or started, the signal); each stage peer "
            "it hit also gets a failure event",
        ),
        EventType(
            "step_discarded",
            ("step", "reason"),
            "engine, swarm",
            "a step was run but not applied by any stage (a stage lost, or a non-finite gradient)",
        ),
        EventType(
            "step_skipped",
            ("step", "stages", "attempts"),
            "engine, swarm",
            "a step kept producing non-finite gradients and optim.skip_nonfinite_steps let the run skip it",
        ),
        EventType(
            "rebuilt",
            _REBUILT_FIELDS,
            "engine, swarm",
            "a lost stage was rebuilt (checkfree.core.rebuild): method, sources, weights, where its "
            "embedding/head came from and how old, its learning rate, how long it took",
        ),
        EventType(
            "rolled_back",
            ("to_step", "restore_s"),
            "engine, swarm",
            "every stage went back to the checkpoint of to_step (strategy checkpoint, hybrid beyond rebuild)",
        ),
        EventType(
            "checkpoint_save",
            ("step", "save_s"),
            "engine, swarm",
            "checkpoints of step written (background: started in the background; on_stop: a stop's save)",
        ),
        EventType(
            "checkpoint_failed",
            ("step", "error"),
            "engine, swarm",
            "a background checkpoint write of step failed (hybrid): that step is incomplete, training goes on",
        ),
        # the engine's run
        EventType("run_started", ("num_stages", "strategy"), "engine", "training starts"),
        EventType("run_finished", ("steps", "failures", "recoveries"), "engine", "training ended; the summary"),
        EventType(
            "run_resumed",
            ("step", "iteration"),
            "engine, swarm",
            "the run continued from the state saved at a step (resume=auto), after an interruption or on a new machine",
        ),
        EventType(
            "run_stopped",
            ("step", "signal"),
            "engine, swarm",
            "Ctrl-C or SIGTERM: the run stopped at a step boundary and saved what a resume needs",
        ),
        # a swarm peer
        EventType("peer_started", ("role", "pid"), "swarm", "a peer process is up and heartbeating"),
        EventType("became_spare", ("reason",), "swarm", "a peer that asked for a stage waits as a spare"),
        EventType("replaced", ("by_epoch",), "swarm", "this peer's stage was given to another peer; it leaves"),
        EventType(
            "standing_by",
            ("by_epoch", "step"),
            "swarm",
            "this peer's stage was given to another peer whose epoch has not committed a step yet: it stays a valid "
            "holder (and a possible source) until then, and takes the stage back if that epoch cannot form",
        ),
        EventType("leader_waiting", ("reason",), "swarm", "the leader cannot publish the next epoch yet"),
        EventType(
            "peer_counters",
            ("counters",),
            "swarm",
            "at a peer's exit: what reached its open ports (probes, knocks, connections shed or timed out, "
            "records and handshakes refused), to tell attacks from faults",
        ),
        EventType(
            "peer_excluded",
            ("excluded", "stage", "blamed_by", "voters", "reforms", "reason"),
            "swarm",
            "the leader declared a live peer lost: the other members blamed it for every re-formation at one step",
        ),
        EventType(
            "epoch_published",
            ("new_epoch", "roster", "step", "lost", "plans", "rollback_to", "reason"),
            "swarm",
            "the leader published a new epoch: roster, resume step, lost stages and their plans",
        ),
        EventType(
            "epoch_joined",
            ("joined_epoch", "stage", "step", "join_s", "rebuilt"),
            "swarm",
            "a peer joined an epoch's process group and is ready to train",
        ),
        EventType("step_aborted", ("step", "cause", "error"), "swarm", "a transport error or timeout broke the step"),
        EventType(
            "pending_applied",
            ("applied_step",),
            "swarm",
            "a step whose commit broke after another stage applied it was applied here too",
        ),
        EventType("shadow_refreshed", ("shadow_of", "step"), "swarm", "redundant: a shadow was sent anew"),
        EventType("resumed", ("step",), "swarm", "the first step committed after a new epoch formed"),
        EventType(
            "swarm_stopped",
            ("reason",),
            "swarm",
            "this peer stops because the swarm cannot go on (a stop record, or a fatal hand-over error)",
        ),
        EventType("done", ("step",), "swarm", "the run reached num_steps"),
        EventType(
            "left",
            ("reason",),
            "swarm",
            "this peer left: it holds no valid weights for the stage it was given (its hand-over broke off), "
            "a preemption notice's time ran out before a spare took its stage, or it stopped on a signal "
            "(SIGINT/SIGTERM) after saving its stage (the reason says at which step)",
        ),
        EventType(
            "preempted",
            ("reason", "step"),
            "swarm",
            "a preemption notice: this peer stops training after committed step ``step`` to hand its stage over",
        ),
        EventType("handed_over", ("to", "step", "stage"), "swarm", "a spare took this peer's exact state; it leaves"),
        # the local launcher
        EventType("peer_spawned", ("peer", "pid"), "launcher", "the launcher started a peer process"),
        EventType("peer_exited", ("peer", "returncode"), "launcher", "a peer process ended on its own with an error"),
        EventType("reaped", ("peer",), "launcher", "a frozen peer that was replaced was ended"),
    )
}


class EventTracker(Protocol):
    def track_event(self, event: dict) -> None: ...


class EventLog(JsonLines):
    """``events.jsonl``: one schema-checked event per line, flushed as written; each also handed to
    ``tracker`` (e.g. the run's ``MetricLogger``), if given."""

    def __init__(self, path: str | Path, tracker: EventTracker | None = None):
        super().__init__(path)
        self.tracker = tracker

    def emit(self, event: str, **fields) -> dict:
        """Write one event.

        Raises:
            ValueError: ``event`` is not in ``EVENTS`` or a required field is missing (a programming error
                that must not produce a log the plots and reports misread).
        """
        kind = EVENTS.get(event)
        if kind is None:
            raise ValueError(f"unknown event {event!r}; known events: {', '.join(EVENTS)}")
        missing = [f for f in kind.required if f not in fields]
        if missing:
            raise ValueError(f"event {event!r} is missing required fields {missing}")
        record = {"event": event, "time": time.time(), **fields}
        self.write(record)
        if self.tracker is not None:
            self.tracker.track_event(record)
        return record


def schema_table() -> str:
    """The schema as a markdown table (for docs/ARCHITECTURE.md)."""
    lines = ["| event | written by | required fields | meaning |", "|---|---|---|---|"]
    for e in EVENTS.values():
        lines.append(f"| `{e.name}` | {e.written_by} | {', '.join(e.required)} | {e.meaning} |")
    return "\n".join(lines)
