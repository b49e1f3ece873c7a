"""
Peer states
===========

The states a swarm peer goes through, and the only changes between them that the protocol allows. Every
change of a peer's state goes through ``transition`` (``PeerStatus.move``): an edge that is not in
``TRANSITIONS`` is a bug, and raises instead of heartbeating a state nobody plans for. The diagram in
docs/ARCHITECTURE.md is generated from this table (``diagram``; a test checks that they agree).
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from enum import Enum


class PeerState(str, Enum):
    """A peer's state, as heartbeated in its ``MemberRecord`` (the values are the wire format)."""

    WAITING = "waiting"  # a stage peer before its first epoch (it asked for a stage)
    SPARE = "spare"  # holds no stage; waits to be given one
    JOINING = "joining"  # named by an epoch: forming its group, handing weights over
    RUNNING = "running"  # training in an epoch
    RECOVERING = "recovering"  # its epoch broke; waits for the next one
    LEAVING = "leaving"  # stops on a signal or a preemption notice (may serve its stage's state meanwhile)
    DONE = "done"  # ran the last step

    def __str__(self) -> str:
        return self.value


S = PeerState

# state -> {next state: why}; the only edges a peer takes
TRANSITIONS: dict[PeerState, dict[PeerState, str]] = {
    S.WAITING: {S.JOINING: "an epoch names it", S.SPARE: "no stage for it in the epoch", S.LEAVING: "signal"},
    S.SPARE: {S.JOINING: "an epoch gives it a stage", S.LEAVING: "signal"},
    S.JOINING: {
        S.RUNNING: "group formed, hand-over done",
        S.RECOVERING: "epoch broke while joining",
        S.LEAVING: "signal or notice",
    },
    S.RUNNING: {
        S.RECOVERING: "transport error, member lost, newer epoch",
        S.DONE: "step == num_steps",
        S.LEAVING: "signal or notice",
    },
    S.RECOVERING: {
        S.JOINING: "the next epoch names it",
        S.SPARE: "no stage for it in the next epoch",
        S.LEAVING: "signal",
    },
    S.LEAVING: {S.LEAVING: "hand-over not taken: save and stop"},
    S.DONE: {},
}


class IllegalTransition(RuntimeError):
    """A change of state the protocol does not allow (a bug, named with both states)."""


def transition(old: PeerState | str, new: PeerState | str) -> PeerState:
    """``new``, if the protocol allows a peer in state ``old`` to move there; else ``IllegalTransition``."""
    old, new = PeerState(old), PeerState(new)
    if new not in TRANSITIONS[old]:
        allowed = ", ".join(s.value for s in TRANSITIONS[old]) or "none (final)"
        raise IllegalTransition(f"peer state {old.value} -> {new.value} is not allowed (from {old.value}: {allowed})")
    return new


def diagram() -> str:
    """The transition table as a Mermaid state diagram (docs/ARCHITECTURE.md embeds it verbatim)."""
    lines = ["stateDiagram-v2", "    [*] --> waiting: started with --stage", "    [*] --> spare: started as a spare"]
    for old, edges in TRANSITIONS.items():
        for new, why in edges.items():
            lines.append(f"    {old.value} --> {new.value}: {why}")
    lines += ["    done --> [*]", "    leaving --> [*]"]
    return "\n".join(lines) + "\n"


@dataclass
class PeerStatus:
    """What a peer reports in its heartbeat about its progress. Its state changes only through ``move``."""

    epoch: int = -1
    step: int = 0  # next step to run (= committed steps)
    iteration: int = 0  # step attempts the swarm made before the next one (the epoch's, plus this peer's since)
    loss: float | None = None
    tokens_per_s: float | None = None
    initial: InitVar[PeerState | str] = PeerState.WAITING

    def __post_init__(self, initial: PeerState | str) -> None:
        self._state = PeerState(initial)

    @property
    def state(self) -> PeerState:
        return self._state

    def move(self, new: PeerState | str) -> PeerState:
        """Change state along an edge of ``TRANSITIONS`` (``IllegalTransition`` otherwise)."""
        self._state = transition(self._state, new)
        return self._state
