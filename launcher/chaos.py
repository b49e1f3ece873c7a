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
(``launcher.attacks.healthy_evictions`` finds any that was): ``probe_flood`` holds hundreds of idle or trickling
connections at a live stage peer's probe port and knocks on it hundreds of times a second (``ProbeFlood``);
``starve`` stops live stage peers with SIGSTOP pulses shorter than ``membership.hang_s`` and runs busy loops beside
them (``Starve``). Both run in threads of the launcher (``Effects``), so that they never hold up its loop; their
choices are drawn from the seed as any other.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import random
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from checkfree.swarm.config import BENIGN_CHAOS_KINDS, ChaosConfig
from checkfree.swarm.limits import raise_file_limit
from checkfree.swarm.probe import ASK, KNOCK, NONCE_BYTES, REPLY
from checkfree.swarm.records import EpochRecord, MemberRecord
from launcher.attacks import healthy_evictions as healthy_evictions  # re-exported: tests/process/test_starvation.py

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


# ---- benign kinds, carried out ---------------------------------------------------------------------------
BUSY_LOOP = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass"


def floodable(host: str, nets: list[ipaddress.IPv4Network] = ()) -> bool:
    """Whether chaos may flood ``host``: a loopback address, or one inside the emulated hosts' networks."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or any(address in net for net in nets)


class _Effect:
    """A benign effect in a thread of its own, ``_run``, which ends by itself or soon after ``stop``."""

    def __init__(self, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> _Effect:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError


class _FloodConn:
    __slots__ = ("sock", "knock", "trickle", "sent", "opened")

    def __init__(self, sock: socket.socket, knock: bool, trickle: bool, opened: float):
        self.sock, self.knock, self.trickle, self.sent, self.opened = sock, knock, trickle, 0, opened


class ProbeFlood(_Effect):
    """One probe flood, in a thread of its own: for ``duration_s`` it holds ``num_conns`` connections open at a
    probe port, half idle and half trickling a request that never completes (those the peer drops are opened
    anew), and knocks ``knocks_per_s`` times a second (connect, ``!`` and a random nonce, read, close): what an
    attacker without the token can do from the same network. It closes every socket when it ends. ``counts`` is
    written by its thread only (read it after ``join``)."""

    TRICKLE_EVERY_S = 0.1  # a trickling connection sends one more byte of its request this often
    KNOCK_TIMEOUT_S = 1.0  # a knock not answered by then is closed
    MAX_KNOCKS_IN_FLIGHT = 64  # knocks due beyond these are skipped (counted), not queued
    OPEN_PER_ROUND = 100  # new connections a round at most
    REFUSED_BACKOFF_S = 0.1  # a refused port (the peer is gone) is not dialled again for this long

    def __init__(
        self,
        address: tuple[str, int],
        num_conns: int,
        knocks_per_s: float,
        duration_s: float,
        nets: list[ipaddress.IPv4Network] = (),
    ):
        if not floodable(address[0], nets):
            raise ValueError(f"chaos floods loopback or emulated hosts only, not {address[0]}")
        self.address, self.num_conns, self.knocks_per_s, self.duration_s = address, num_conns, knocks_per_s, duration_s
        self.counts = dict.fromkeys(
            ("opened", "dropped", "refused", "knocks", "answered", "knocks_skipped", "max_open", "open"), 0
        )
        super().__init__("probe-flood")

    def _run(self) -> None:
        sel, conns = selectors.DefaultSelector(), {}
        start = time.monotonic()
        scheduled, next_trickle, backoff = 0, start, start
        try:
            while not self._stop.is_set() and (now := time.monotonic()) < start + self.duration_s:
                held = len(conns) - sum(c.knock for c in conns.values())
                for _ in range(min(self.num_conns - held, self.OPEN_PER_ROUND) if now >= backoff else 0):
                    if not self._open(sel, conns, False, now):
                        backoff = now + self.REFUSED_BACKOFF_S
                        break
                due = int((now - start) * self.knocks_per_s) - scheduled
                scheduled += due
                room = self.MAX_KNOCKS_IN_FLIGHT - sum(c.knock for c in conns.values())
                self.counts["knocks_skipped"] += max(0, due - max(room, 0))
                for _ in range(min(due, room)):
                    self._open(sel, conns, True, now)
                self.counts["max_open"] = max(self.counts["max_open"], len(conns))
                for key, events in sel.select(timeout=0.01):
                    self._ready(sel, conns, key.data, events)
                if now >= next_trickle:
                    next_trickle = now + self.TRICKLE_EVERY_S
                    for c in [c for c in conns.values() if c.trickle and c.sent < NONCE_BYTES]:
                        self._send(sel, conns, c, (ASK + secrets.token_bytes(NONCE_BYTES))[c.sent : c.sent + 1])
                for c in [c for c in conns.values() if c.knock and now - c.opened > self.KNOCK_TIMEOUT_S]:
                    self._close(sel, conns, c)
        finally:
            for c in list(conns.values()):
                self._close(sel, conns, c)
            sel.close()
            self.counts["open"] = len(conns)

    def _open(self, sel: selectors.BaseSelector, conns: dict, knock: bool, now: float) -> bool:
        """One more connection; False when the port refused it (or no descriptor is left)."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            return False
        sock.setblocking(False)
        err = sock.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            self.counts["refused"] += 1
            return False
        c = _FloodConn(sock, knock, not knock and self.counts["opened"] % 2 == 1, now)
        conns[sock] = c
        self.counts["opened"] += 1
        self.counts["knocks"] += knock
        sel.register(sock, selectors.EVENT_WRITE if knock else selectors.EVENT_READ, c)
        return True

    def _ready(self, sel: selectors.BaseSelector, conns: dict, c: _FloodConn, events: int) -> None:
        if c.knock and events & selectors.EVENT_WRITE:  # connected (or failed): send the knock, wait for the answer
            if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.counts["refused"] += 1
                self._close(sel, conns, c)
                return
            sel.modify(c.sock, selectors.EVENT_READ, c)
            self._send(sel, conns, c, KNOCK + secrets.token_bytes(NONCE_BYTES))
            return
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionRefusedError:  # the peer's port is closed: it is gone
            self.counts["refused"] += 1
            self._close(sel, conns, c)
            return
        except OSError:
            data = b""
        if c.knock:
            self.counts["answered"] += data.startswith(REPLY)
            self._close(sel, conns, c)
        elif not data:
            self.counts["dropped"] += 1
            self._close(sel, conns, c)

    def _send(self, sel: selectors.BaseSelector, conns: dict, c: _FloodConn, data: bytes) -> None:
        try:
            c.sent += c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(sel, conns, c)

    @staticmethod
    def _close(sel: selectors.BaseSelector, conns: dict, c: _FloodConn) -> None:
        if conns.pop(c.sock, None) is None:
            return
        sel.unregister(c.sock)
        c.sock.close()


class Starve(_Effect):
    """One starvation, in a thread of its own: SIGSTOP / SIGCONT pulses on peers' processes (``pulses``: each
    (stopped_s, running_s)), and a busy loop beside each peer for ``busy_s`` (a process of its own session, as
    another tenant's would be; it ends by itself after busy_s should the launcher die first, and is ended by PID).
    Every signal goes through ``Effects.signal``, which never stops or continues a peer chaos hung or killed.
    ``stopped_s`` (each pulse as it really lasted) and ``busy_pids`` are written by its thread only."""

    def __init__(
        self, effects: Effects, procs: list[subprocess.Popen], pulses: list[tuple[float, float]], busy_s: float
    ):
        self.effects, self.procs, self.pulses, self.busy_s = effects, procs, pulses, busy_s
        self.stopped_s: list[float] = []
        self.busy_pids: list[int] = []
        super().__init__("starve")

    def _run(self) -> None:
        busy: list[subprocess.Popen] = []
        stopped: list[subprocess.Popen] = []
        busy_end = time.monotonic() + self.busy_s
        try:
            for _ in self.procs if self.busy_s > 0 else ():
                busy.append(
                    subprocess.Popen(
                        [sys.executable, "-c", BUSY_LOOP.format(s=self.busy_s)],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
                self.busy_pids.append(busy[-1].pid)
            for stop_s, run_s in self.pulses:
                stopped = [p for p in self.procs if self.effects.signal(p, signal.SIGSTOP)]
                t0 = time.monotonic()
                interrupted = self._stop.wait(stop_s)
                for p in stopped:
                    self.effects.signal(p, signal.SIGCONT)
                if stopped:
                    self.stopped_s.append(time.monotonic() - t0)
                stopped = []
                if interrupted or self._stop.wait(run_s):
                    break
            self._stop.wait(max(0.0, busy_end - time.monotonic()))
        finally:
            for p in stopped:
                self.effects.signal(p, signal.SIGCONT)
            for b in busy:
                b.kill()
                b.wait(timeout=10)


class Effects:
    """The benign chaos under way, each effect in a thread of its own. ``lock`` guards ``held`` (the pids of peers
    chaos hung or killed) and every signal a pulse sends, so that a hang landing during a pulse stays a hang."""

    def __init__(self, cfg: ChaosConfig):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.held: set[int] = set()
        self.running: list[_Effect] = []

    def hold(self, proc: subprocess.Popen) -> None:
        """Chaos hangs or kills this peer: pulses leave it alone from now on."""
        with self.lock:
            self.held.add(proc.pid)

    def signal(self, proc: subprocess.Popen, sig: signal.Signals) -> bool:
        """Send ``sig`` to a peer not held; whether it was sent (``send_signal`` skips a process already reaped)."""
        with self.lock:
            if proc.pid in self.held or proc.poll() is not None:
                return False
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                return False
            return True

    def start(
        self, action: Action, procs: list[subprocess.Popen], nets: list[ipaddress.IPv4Network] = ()
    ) -> ProbeFlood | Starve:
        """Carry out a benign action in the background; raises ValueError for a target chaos may not flood."""
        if action.kind == "probe_flood":
            raise_file_limit()  # the flood's connections are this process's descriptors
            c = self.cfg
            effect = ProbeFlood(action.target, c.num_flood_conns, c.flood_knocks_per_s, action.duration_s, nets)
        else:
            effect = Starve(self, procs, action.pulses, action.busy_s)
        self.running = [e for e in self.running if e.alive] + [effect.start()]
        return effect

    def close(self, timeout_s: float = 10.0) -> None:
        """End every effect under way: floods close their sockets, pulses continue their peers, busy loops end."""
        for e in self.running:
            e.stop()
        deadline = time.monotonic() + timeout_s
        for e in self.running:
            e.join(max(0.1, deadline - time.monotonic()))
        self.running = []
