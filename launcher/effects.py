"""
Chaos effects
=============

The benign kinds of ``swarm.chaos`` carried out: what ``launcher.chaos`` draws (an ``Action``), the local
launcher hands to ``Effects``, which runs each effect in a thread of its own so that it never holds up the
launcher's loop. ``ProbeFlood`` holds hundreds of idle or trickling connections at a live stage peer's probe port
and knocks on it hundreds of times a second; ``Starve`` stops live stage peers with SIGSTOP pulses shorter than
``membership.hang_s`` and runs busy loops beside them. Neither fails anything: no stage may be lost to them
(``launcher.attacks.healthy_evictions`` finds any that was).
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from checkfree.swarm.config import ChaosConfig
from checkfree.swarm.limits import raise_file_limit
from checkfree.swarm.probe import ASK, KNOCK, NONCE_BYTES, REPLY

if TYPE_CHECKING:
    from launcher.chaos import Action

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
