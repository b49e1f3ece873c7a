"""
Status line
===========

The one line ``checkfree swarm`` rewrites while the swarm runs, made by a pure function of what the
launcher reads from the DHT (member records and the newest epoch record) and what it counted itself.
It reads left to right in the order an operator asks: what is the swarm doing and what is it waiting
for, how far is it, how many failures and recoveries, what reached the peers that no fault explains (the
non-zero ``checkfree.swarm.probe.ATTACK_COUNTERS`` summed over the peers; absent when all are 0), who holds
which stage::

    [   42s] running | step 14/60 loss 5.21 tok/s 1234 | failures 1 recoveries 1 | spares 0 | 0:s0-01 1:s1-02 ...
    [ 2m10s] running | step 51/60 loss 4.02 | failures 0 recoveries 0 | attacks shed=40 gate_refused=3 | ...
    [ 1m01s] stage lost: waiting for a spare for stages [2] (0 available) | step 14/60 loss 5.21 | ...
    [    3s] starting: 3 of 5 peers up | failures 0 recoveries 0 | spares 0 | 0:s0-01 1:s1-02

It fits the terminal by shortening the holders list (then dropping throughput, then spares, then the
attacks), never by cutting the state or what the swarm waits for. Peer ids (``NAME.HASH``) are shown
by their NAME.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from checkfree.cli.status import attack_text, attack_totals

MAX_WIDTH = 150  # a wider line is hard to read at a glance, even on a wide terminal


def terminal_width() -> int:
    """The width to fit: the terminal's (80 when not a terminal) less one column, so that a line never
    triggers the terminal's wrap (a wrapped line breaks the carriage-return rewrite), at most MAX_WIDTH."""
    return min(shutil.get_terminal_size((80, 24)).columns - 1, MAX_WIDTH)


def short_names(peer_ids) -> dict[str, str]:
    """Each peer id's NAME (the part before the last dot); NAME plus the first 4 characters of its HASH
    where two peers share a NAME (peers started without --peer-id may)."""
    ids = sorted(set(peer_ids))
    names = {pid: pid.rpartition(".")[0] or pid for pid in ids}
    shared = Counter(names.values())
    return {pid: (f"{name}.{pid.rpartition('.')[2][:4]}" if shared[name] > 1 else name) for pid, name in names.items()}


def _elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1000:.1f}k" if tokens_per_s >= 10_000 else f"{tokens_per_s:.0f}"


def roster_loss(members: Mapping, current) -> float | None:
    """The newest finite training loss a holder of the current roster reports (the last stage's, which
    computes it), or None."""
    roster = current.roster if current is not None else []
    losses = [members[p].loss for p in roster if p in members and members[p].loss is not None]
    finite = [x for x in losses if math.isfinite(x)]
    return finite[-1] if finite else None


def swarm_state(members: Mapping, current, num_started: int) -> tuple[str, str]:
    """(what the swarm does, what it waits for: "" when nothing) from the records alone."""
    # a peer's note says what it waits for (the leader's: why it publishes no epoch yet)
    waits = sorted({r.note.removeprefix("waiting for ") for r in members.values() if r.note.startswith("waiting")})
    other_notes = sorted({r.note for r in members.values() if r.note and not r.note.startswith("waiting")})
    if current is None:
        return f"starting: {len(members)} of {num_started} peers up", "; ".join(waits)
    if current.stop:
        return f"stopped: {current.stop}", ""
    if current.finished or any(r.state == "done" for r in members.values()):
        return "finished", ""
    names = short_names(current.roster)
    gone = [f"stage {s} (holder {names[pid]} gone)" for s, pid in enumerate(current.roster) if pid not in members]
    holders = [members[pid] for pid in current.roster if pid in members]
    joining = [r for r in holders if r.epoch < current.epoch or r.state in ("joining", "recovering", "waiting")]
    if gone:
        state = "stage lost"
    elif any(r.state == "leaving" for r in holders):
        state = "handing over"
    elif joining:
        state = f"recovering (epoch {current.epoch})" if current.lost else f"forming epoch {current.epoch}"
    else:
        state = "running"
    waiting = waits or gone or ([f"{len(joining)} of {len(current.roster)} holders to join"] if joining else [])
    return (f"{state}, {'; '.join(other_notes)}" if other_notes and state != "running" else state), "; ".join(waiting)


def status_line(
    members: Mapping,
    current,
    elapsed_s: float,
    num_steps: int,
    num_started: int,
    failures: int,
    recoveries: int,
    width: int | None = None,
    last_loss: float | None = None,
    attacks: Mapping[str, int] | None = None,
) -> str:
    """The live status line of a swarm.

    Args:
        members: peer id -> ``MemberRecord`` (or anything with its attributes), as read from the DHT.
        current: the newest ``EpochRecord`` (or None before the first epoch).
        elapsed_s: seconds since the launcher started.
        num_steps: the run's ``num_steps``.
        num_started: peer processes the launcher started so far.
        failures, recoveries: the launcher's counts.
        width: the most characters the line may take (default: ``terminal_width()``).
        last_loss: the loss to show when no holder reports one any more (the run's end): the caller keeps
            the last ``roster_loss`` it saw (``LiveStatus`` does).
        attacks: the swarm's attack counts to show (default: ``attack_totals`` of the members' records; a
            peer gone from the DHT takes its counts with it, so ``LiveStatus`` keeps each peer's last ones).

    Returns:
        The line, no wider than ``width`` unless the state and what the swarm waits for alone are wider.
    """
    width = terminal_width() if width is None else width
    state, waiting = swarm_state(members, current, num_started)
    head = f"[{_elapsed(elapsed_s):>6}] {state}" + (f": waiting for {waiting}" if waiting else "")
    progress, rate = [], ""
    if current is not None:
        roster = current.roster
        steps = [members[p].step for p in roster if p in members]
        loss = roster_loss(members, current)
        loss = last_loss if loss is None else loss
        progress.append(f"step {max(steps, default=current.step)}/{num_steps}")
        if loss is not None:
            progress.append(f"loss {loss:.2f}")
        rates = [members[p].tokens_per_s for p in roster if p in members and members[p].tokens_per_s]
        rate = f"tok/s {_rate(min(rates))}" if rates else ""
    counts = f"failures {failures} recoveries {recoveries}"
    spares = f"spares {sum(1 for r in members.values() if r.state == 'spare')}"
    attacks = attack_totals(r.counters for r in members.values()) if attacks is None else attacks
    attacked = f"attacks {attack_text(attacks)}" if attacks else ""
    holders = _holders(members, current)
    # the parts that may go, least needed first: holders (shortened one at a time), then throughput, then
    # spares, then the attacks
    for parts in (
        [head, " ".join([*progress, rate]).strip(), counts, attacked, spares],
        [head, " ".join(progress), counts, attacked, spares],
        [head, " ".join(progress), counts, attacked],
        [head, " ".join(progress), counts],
    ):
        fixed = " | ".join(p for p in parts if p)
        fitted = _fit_holders(holders, width - len(fixed) - 3)
        if fitted is not None:
            return f"{fixed} | {fitted}" if fitted else fixed
    return fixed


def _holders(members: Mapping, current) -> list[str]:
    """``stage:name`` per roster member (``!`` marks one gone from the DHT); before the first epoch, the
    stage each peer asks for."""
    if current is None:
        names = short_names(members)
        asked = sorted((r.stage, pid) for pid, r in members.items() if r.stage >= 0)
        return [f"{s}:{names[pid]}" for s, pid in asked]
    names = short_names(current.roster)
    return [f"{s}:{names[pid]}{'' if pid in members else '!'}" for s, pid in enumerate(current.roster)]


def _fit_holders(holders: list[str], room: int) -> str | None:
    """The holders in ``room`` characters: all, else the first ones and ``+N`` more, else ``N stages``;
    None when not even that fits."""
    text = " ".join(holders)
    if len(text) <= room:
        return text
    for keep in range(len(holders) - 1, 0, -1):
        text = " ".join(holders[:keep]) + f" +{len(holders) - keep}"
        if len(text) <= room:
            return text
    text = f"{len(holders)} stages"
    return text if len(text) <= room else None


@dataclass
class LiveStatus:
    """``status_line`` with the memory a line needs across calls: the last finite loss, so that the line
    keeps it once the holders have exited at the end of the run, and each peer's last counters, so that the
    attacks a peer counted stay in the total once it is gone from the DHT."""

    num_steps: int
    last_loss: float | None = None
    counters: dict[str, Mapping[str, int]] = field(default_factory=dict)  # peer id -> its last counters

    def __call__(
        self,
        members: Mapping,
        current,
        elapsed_s: float,
        num_started: int,
        failures: int,
        recoveries: int,
        width: int | None = None,
    ) -> str:
        """The line, padded with spaces to ``width`` (it overwrites a longer previous line)."""
        width = terminal_width() if width is None else width
        loss = roster_loss(members, current)
        self.last_loss = loss if loss is not None else self.last_loss
        self.counters |= {pid: r.counters for pid, r in members.items() if r.counters}
        attacks = attack_totals(self.counters.values())
        line = status_line(
            members,
            current,
            elapsed_s,
            self.num_steps,
            num_started,
            failures,
            recoveries,
            width,
            self.last_loss,
            attacks=attacks,
        )
        return line.ljust(width)
