"""
Chaos
=====

``swarm.chaos``: the local launcher's injector of failures that land at any moment, recoveries included
(see ``checkfree.swarm.config.CHAOS_KINDS``). From its seed it draws, event after event, a kind, a gap and
its choices, so a seed replays the same sequence of decisions; where they land depends on the swarm.

Immediate kinds act at once on the live peers (a kill, a burst of 2 .. L-1 stage peers, a wave that takes
half of all peers, a hang, a spare killed, a spare started). Triggered kinds arm and watch the peers'
event logs (``peers/*/events.jsonl``, read incrementally) for the moment they wait for: the next epoch
published (its leader, a source of its plan, the spare it names) or the next stage rebuilt; then they
act; drawn while the swarm is healthy, they first kill one stage peer (a ``kill`` event of its own) so
that the moment they wait for comes. Chaos never kills the last live stage peer whose weights are valid,
so that a per-stage strategy always has something to rebuild from (losing every stage at once is tested
on its own).

Benign kinds stress the swarm without failing anything, and no stage may be lost to them
(``launcher.attacks.healthy_evictions`` finds any that was): ``probe_flood`` floods a live stage peer's probe port,
``starve`` stops live stage peers with SIGSTOP pulses shorter than ``membership.hang_s`` beside busy loops. Chaos
draws them from the seed as any other; the launcher carries them out in the background (``launcher.effects``).
"""

from __future__ import annotations

import json
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

from checkfree.swarm.config import BENIGN_CHAOS_KINDS, ChaosConfig
from checkfree.swarm.records import EpochRecord, MemberRecord

# re-exported: the local launcher runs Effects, tests/process/test_starvation.py reads the other two
from launcher.attacks import healthy_evictions as healthy_evictions
from launcher.effects import BUSY_LOOP as BUSY_LOOP
from launcher.effects import Effects as Effects

TRIGGERED = ("leader_after_publish", "source_during_transfer", "spare_during_join", "rebuilt_before_first_step")
BENIGN = BENIGN_CHAOS_KINDS


@dataclass
class Action:
    """What the launcher does for one chaos event: signal these peers (or start spares)."""

    kind: str
    victims: list[str] = field(default_factory=list)
    sig: signal.Signals | None = signal.SIGKILL  # None: no signal (a probe flood)
    spares: int = 0  # spares to start now
    # the epoch the victims serve in, when newer than the launcher's last DHT read (a triggered kill lands
    # within ms of a publish): (epoch, roster, step)
    epoch: tuple[int, list[str], int] | None = None
    # benign kinds: the probe port flooded (host, port); the pulses (stopped_s, running_s) and busy loops' seconds
    # of a starvation; how long the effect lasts from when it starts
    target: tuple[str, int] | None = None
    pulses: list[tuple[float, float]] = field(default_factory=list)
    busy_s: float = 0.0
    duration_s: float = 0.0

    @property
    def benign(self) -> bool:
        return self.kind in BENIGN


class EventTail:
    """New lines of every peer's events.jsonl since the last read."""

    def __init__(self, peers_dir: Path):
        self.dir, self.offsets = peers_dir, {}

    def read(self) -> list[dict]:
        out = []
        for f in sorted(self.dir.glob("*/events.jsonl")):
            try:
                with open(f, "rb") as fh:
                    fh.seek(self.offsets.get(f, 0))
                    data = fh.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
            self.offsets[f] = self.offsets.get(f, 0) + len(complete)
            out += [json.loads(line) for line in complete.splitlines() if line.strip()]
        return sorted(out, key=lambda e: e["time"])


class Chaos:
    def __init__(self, cfg: ChaosConfig, num_stages: int, peers_dir: Path, hang_s: float = 1.5):
        """``hang_s``: the swarm's ``membership.hang_s`` (a starve pulse lasts less)."""
        self.cfg, self.num_stages, self.hang_s = cfg, num_stages, hang_s
        self.under: dict[tuple[str, str], float] = {}  # (benign kind, peer) -> when its effect on the peer ends
        self.rng = random.Random(cfg.seed)
        self.tail = EventTail(peers_dir)
        self.injected = 0
        self.next_at: float | None = None  # monotonic time of the next event
        self.armed: tuple[str, float] | None = None  # (triggered kind, deadline)
        self.dropped = 0  # triggered kinds that never fired
        self.published: tuple[int, list[str], int] | None = None  # newest epoch seen in the events

    @property
    def done(self) -> bool:
        return self.injected >= self.cfg.events

    def poll(
        self, now: float, members: dict[str, MemberRecord], current: EpochRecord | None, live: set[str]
    ) -> Action | None:
        """The action due now, if any. ``live``: peers whose process runs (not frozen)."""
        seen = self.tail.read()
        for e in seen:
            if e["event"] == "epoch_published" and not e.get("stop"):
                if self.published is None or e["new_epoch"] > self.published[0]:
                    self.published = (e["new_epoch"], e["roster"], e["step"])
        if self.done or current is None:
            return None
        if self.armed is not None:
            kind, deadline = self.armed
            victim = self._trigger(kind, seen, live)
            if victim is not None and self._may_kill([victim], members, current, live):
                self.armed = None
                newer = self.published if self.published and self.published[0] > current.epoch else None
                return self._fired(Action(kind, [victim], epoch=newer), now)
            if now > deadline:
                self.armed, self.dropped = None, self.dropped + 1
                self.next_at = now + self._gap()
            return None
        if self.next_at is None:
            self.next_at = now + self._gap()
        if now < self.next_at:
            return None
        kind = self.rng.choice(self.cfg.kinds)
        if kind in TRIGGERED:
            self.armed = (kind, now + self.cfg.trigger_timeout_s)
            if not self._recovering(members, current):
                # the moment waited for comes with a recovery: start one (a kill, counted as its own event)
                action = self._immediate("kill", members, current, live)
                if action is not None:
                    return self._fired(action, now)
            return None
        if kind in BENIGN:
            action = self._benign(kind, members, current, live, now)
        else:
            action = self._immediate(kind, members, current, live)
        if action is None:  # nothing to act on now (no spare to kill, nothing safe to kill): draw again later
            self.next_at = now + self._gap()
            return None
        return self._fired(action, now)

    def _fired(self, action: Action, now: float) -> Action:
        self.injected += 1
        self.next_at = now + self._gap()
        return action

    def _gap(self) -> float:
        return max(0.2, self.rng.expovariate(1.0 / self.cfg.mean_gap_s))

    # ---- kinds ---------------------------------------------------------------------------------------
    def _holders(self, current: EpochRecord, live: set[str]) -> list[str]:
        return [pid for pid in current.roster if pid in live]

    @staticmethod
    def _recovering(members: dict[str, MemberRecord], current: EpochRecord) -> bool:
        return not all(
            pid in members and members[pid].state == "running" and members[pid].epoch == current.epoch
            for pid in current.roster
        )

    @staticmethod
    def _valid(members: dict[str, MemberRecord], current: EpochRecord, live: set[str]) -> list[str]:
        """Stage peers that hold weights and whose process runs (a killed peer's record lingers a TTL)."""
        return [pid for pid in current.roster if pid in live and pid in members and members[pid].lineage.kind != "none"]

    def _may_kill(
        self, victims: list[str], members: dict[str, MemberRecord], current: EpochRecord, live: set[str]
    ) -> bool:
        """At least one live stage peer with valid weights survives the kill."""
        return any(pid not in victims for pid in self._valid(members, current, live))

    def _immediate(
        self, kind: str, members: dict[str, MemberRecord], current: EpochRecord, live: set[str]
    ) -> Action | None:
        spares = sorted(pid for pid, r in members.items() if r.state == "spare" and pid in live)
        # one stage peer with valid weights is kept out of reach (a per-stage strategy needs a source)
        valid = self._valid(members, current, live)
        keep = self.rng.choice(valid) if valid else None
        holders = [pid for pid in self._holders(current, live) if pid != keep]
        if kind == "spare_arrival":
            return Action(kind, spares=1)
        if kind == "spare_kill":
            return Action(kind, [self.rng.choice(spares)]) if spares else None
        if kind in ("kill", "hang"):
            victims = [self.rng.choice(holders)] if holders else []
        elif kind == "burst":
            if len(holders) < 2:
                return None
            k = self.rng.randint(2, max(2, min(len(holders), self.num_stages - 1)))
            victims = self.rng.sample(holders, k)
        else:  # wave: half of every live peer
            everyone = sorted(set(holders) | set(spares))
            victims = self.rng.sample(everyone, max(1, len(everyone) // 2)) if everyone else []
        if not victims or not self._may_kill(victims, members, current, live):
            return None
        return Action(kind, victims, signal.SIGSTOP if kind == "hang" else signal.SIGKILL)

    def _benign(
        self, kind: str, members: dict[str, MemberRecord], current: EpochRecord, live: set[str], now: float
    ) -> Action | None:
        """A flood of one live stage peer's probe port, or a starvation of one or more live stage peers; never of
        a peer still under the same kind (two starvations at once could add up to a hang)."""
        ready = [pid for pid in self._holders(current, live) if self.under.get((kind, pid), -1.0) <= now]
        if kind == "probe_flood":
            ready = [pid for pid in ready if pid in members and members[pid].probe_port]
            if not ready:
                return None
            victim = self.rng.choice(ready)
            address = (members[victim].host, members[victim].probe_port)
            action = Action(kind, [victim], sig=None, target=address, duration_s=self.cfg.flood_s)
        else:
            if not ready:
                return None
            victims = self.rng.sample(ready, self.rng.randint(1, len(ready)))
            lo, hi = self.cfg.pulse_min_frac, self.cfg.pulse_max_frac
            pulses = [(self.rng.uniform(lo, hi) * self.hang_s, self.hang_s) for _ in range(self.cfg.num_pulses)]
            duration = max(sum(stop + run for stop, run in pulses), self.cfg.busy_s)
            action = Action(
                kind, victims, sig=signal.SIGSTOP, pulses=pulses, busy_s=self.cfg.busy_s, duration_s=duration
            )
        for pid in action.victims:
            self.under[(kind, pid)] = now + action.duration_s
        return action

    def _trigger(self, kind: str, seen: list[dict], live: set[str]) -> str | None:
        for e in seen:
            victim = None
            if kind != "rebuilt_before_first_step" and e["event"] == "epoch_published" and not e.get("stop"):
                roster = e["roster"]
                if kind == "leader_after_publish":
                    victim = e["peer"]
                elif kind == "source_during_transfer":
                    sources = sorted({s for p in e["plans"] for s in p["sources"]})
                    victim = roster[self.rng.choice(sources)] if sources else None
                elif kind == "spare_during_join" and e["lost"]:
                    victim = roster[self.rng.choice(e["lost"])]
            elif kind == "rebuilt_before_first_step" and e["event"] == "rebuilt":
                victim = e["peer"]
            if victim is not None and victim in live:
                return victim
        return None
