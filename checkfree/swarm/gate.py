"""
Gate
====

The rendezvous store of an epoch admits the members of that epoch only. torch's ``TCPStore`` has no
authentication, so the leader runs it on loopback and puts a ``Gate`` on the announced address: every
connection first proves that it comes from a member of the epoch's roster (a record sealed with the join
token and signed by a roster member's key over a fresh challenge, see ``admission``), and the gate proves
in return that it is the epoch's leader; only then are the bytes relayed to the store. A member reaches the
store through a ``Tunnel``, a relay on its own loopback that does the client's side of that handshake.

The store carries the ranks' gloo addresses, so a process that cannot pass the gate cannot join the
epoch's process group, and so never receives a weight of a rebuild. Every socket operation has a timeout;
a relay ends when either side closes, or when its gate or tunnel is closed.

Anyone who reaches the gate's port can open connections to it without a token, so an ``Acceptor`` (the
gate, a tunnel, a leaving peer's ``preemption.HandoffServer``) is bounded:

- at most ``MAX_HANDSHAKES`` handshakes run at once, at most ``MAX_HANDSHAKES_PER_HOST`` of them from one
  address; a connection over either cap is closed at once, before a byte is read or written ("shed"), and
  never waits in a queue;
- a handshake has one deadline for the whole exchange (``HANDSHAKE_TIMEOUT_S``, not a limit per read), so
  a client that trickles its bytes holds its thread that long at most;
- admitted connections (members) are served outside the handshake cap, up to ``max_sessions`` at once (the
  gate: 4 per member of the roster + 8, two threads each); an admitted connection over that is closed;
- refusals are logged once a minute per kind, with how many were left out since the last line
  (``ThrottledLog``), and every outcome is counted in ``Acceptor.counts`` for the peer to report.

A gate closes a connection it sheds before sending its challenge, so a client can tell "busy" from
"refused": ``dial`` (a tunnel's way to the gate) tries again, with growing pauses, until its own deadline.
"""

from __future__ import annotations

import errno
import logging
import random
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

from checkfree.swarm.admission import Admission

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 3.0  # the whole handshake, from accept to the last byte (a member's takes milliseconds)
MAX_HANDSHAKE_BYTES = 1 << 12
MAX_HANDSHAKES = 32  # handshakes in flight in one acceptor (one thread each)
MAX_HANDSHAKES_PER_HOST = 8  # ... from one address, so a flood from one host leaves room for the members
MAX_SESSIONS = 64  # admitted connections served at once, where a subclass does not say
DIAL_TIMEOUT_S = 4 * HANDSHAKE_TIMEOUT_S  # how long a tunnel keeps trying a gate that sheds its connections
LOG_EVERY_S = 60.0  # one line per kind of refusal in this time at most
# the outcomes an acceptor counts (see Acceptor.counts)
COUNTS = ("conns", "shed", "timeouts", "refused", "admitted", "sessions_shed", "session_errors", "accept_errors")
# accept() failures that pass (out of descriptors or memory, a connection reset before it was taken)
_TRANSIENT_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
_CHALLENGE = b"gate-challenge|"
_ANSWER = b"gate-answer|"


class GateRefused(ConnectionError):
    """The other side of a gate handshake is not who it must be (the message says why)."""


class HandshakeTimeout(GateRefused):
    """The handshake's deadline passed before the other side said all it had to."""


class GateBusy(GateRefused):
    """The gate closed the connection before its challenge: it sheds connections over its caps (or is closing)."""


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise HandshakeTimeout("the handshake's deadline passed")
    return left


def _send(conn: socket.socket, data: bytes, deadline: float) -> None:
    conn.settimeout(_left(deadline))
    try:
        conn.sendall(struct.pack("!I", len(data)) + data)
    except TimeoutError as e:
        raise HandshakeTimeout("the handshake's deadline passed while sending") from e


def _recv(conn: socket.socket, deadline: float) -> bytes:
    head = _recv_exact(conn, 4, deadline)
    n = struct.unpack("!I", head)[0]
    if n > MAX_HANDSHAKE_BYTES:
        raise GateRefused(f"handshake message of {n} bytes (at most {MAX_HANDSHAKE_BYTES})")
    return _recv_exact(conn, n, deadline)


def _recv_exact(conn: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes, each read waiting only for what is left of the handshake's ``deadline`` (monotonic)."""
    buf = b""
    while len(buf) < n:
        conn.settimeout(_left(deadline))
        try:
            chunk = conn.recv(n - len(buf))
        except TimeoutError as e:
            raise HandshakeTimeout(f"the handshake's deadline passed with {len(buf)} of {n} bytes read") from e
        if not chunk:
            raise GateRefused("closed during the handshake")
        buf += chunk
    return buf


def _relay(a: socket.socket, b: socket.socket, closed: threading.Event) -> None:
    """Copy bytes both ways until both sides have closed (or ``closed`` is set), then close both."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while not closed.is_set():
                try:
                    data = src.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    for s in (a, b):
        s.settimeout(2.0)  # recv wakes to check ``closed``; a send stalled this long counts as a dead side
    back = threading.Thread(target=pump, args=(b, a), name="relay-back", daemon=True)
    try:
        back.start()
    except RuntimeError:  # no thread left to start: the relay cannot run
        a.close()
        b.close()
        raise
    pump(a, b)
    back.join()
    for s in (a, b):
        s.close()


class ThrottledLog:
    """Warnings of an acceptor, at most one line per kind every ``every_s``; the next line of a kind says how
    many were left out before it (a flood of refusals must not flood the log). Thread-safe."""

    def __init__(self, name: str, every_s: float = LOG_EVERY_S):
        self.name, self.every_s = name, every_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> bool:
        """Log ``message`` unless a line of ``kind`` was logged in the last ``every_s``; whether it was."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self.every_s) < self.every_s:
                self._left_out[kind] = self._left_out.get(kind, 0) + 1
                return False
            self._last[kind] = now
            left_out = self._left_out.pop(kind, 0)
        more = f" ({left_out} more of kind {kind!r} since the last such line, not logged)" if left_out else ""
        logger.warning("[%s] %s%s", self.name, message, more)
        return True


class _Closing(RuntimeError):
    """The acceptor was closed before a thread for a connection could start."""


class Acceptor:
    """A listening socket whose connections each pass a bounded handshake (``admit_connection``) and, once
    admitted, are served (``serve``) in the thread that admitted them, until ``close()``.

    Threads: the accept loop, and one per connection in its handshake (at most ``max_handshakes``, at most
    ``max_handshakes_per_host`` from one address) or its session (at most ``max_sessions``, plus what
    ``serve`` starts). ``counts`` (see ``COUNTS``) and the numbers in flight are shared by them under
    ``_lock``; read them with ``counters()``.
    """

    handshake_timeout_s = HANDSHAKE_TIMEOUT_S
    max_handshakes = MAX_HANDSHAKES
    max_handshakes_per_host = MAX_HANDSHAKES_PER_HOST

    def __init__(self, sock: socket.socket, name: str, max_sessions: int = MAX_SESSIONS):
        self.sock, self.name, self.max_sessions = sock, name, max_sessions
        self.closed = threading.Event()
        self.counts = dict.fromkeys(COUNTS, 0)
        self.log = ThrottledLog(name)
        self._lock = threading.Lock()
        self._handshakes: dict[str, int] = {}  # address -> handshakes in flight from it
        self._sessions = 0
        self._threads: set[threading.Thread] = set()  # the accept loop and the connections' threads, while alive
        sock.settimeout(0.5)
        self._spawn(self._accept, (), name)

    def _spawn(self, target: Callable, args: tuple, name: str) -> None:
        """Start a daemon thread that ``close`` waits for (raises RuntimeError when no thread can start)."""

        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=name, daemon=True)
        # added and started under the lock: ``close`` never sees a thread it cannot join yet (it did, and raised
        # "cannot join thread before it is started", when a connection arrived as the acceptor closed); none is
        # started once ``close`` has begun (``closed`` is set before it gathers the threads it waits for)
        with self._lock:
            if self.closed.is_set():
                raise _Closing(f"{self.name} is closed")
            self._threads.add(thread)
            try:
                thread.start()
            except RuntimeError:
                self._threads.discard(thread)
                raise

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def counters(self) -> dict[str, int]:
        """A copy of ``counts``, with the handshakes and sessions in flight now."""
        with self._lock:
            return {**self.counts, "handshaking": sum(self._handshakes.values()), "sessions": self._sessions}

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.closed.is_set() or e.errno not in _TRANSIENT_ACCEPT:
                    return  # the socket was closed
                self._count("accept_errors")
                self.log("accept_errors", f"cannot accept a connection: {e}")
                self.closed.wait(0.1)  # out of descriptors: the handshakes in flight end and free some
                continue
            self._start(conn, addr[0])

    def _start(self, conn: socket.socket, host: str) -> None:
        """Start the handshake of ``conn`` in a thread of its own, or close it at once when over a cap."""
        with self._lock:
            self.counts["conns"] += 1
            in_flight, mine = sum(self._handshakes.values()), self._handshakes.get(host, 0)
            room = in_flight < self.max_handshakes and mine < self.max_handshakes_per_host
            if room:
                self._handshakes[host] = mine + 1
        if room:
            try:
                self._spawn(self._serve, (conn, host), f"{self.name}-conn")
                return
            except _Closing:  # accepted as close() began: nobody would wait for its thread
                self._handshake_done(host)
                conn.close()
                return
            except RuntimeError:  # no thread left to start: shed it like one over the cap
                self._handshake_done(host)
        self._drop(
            conn,
            "shed",
            f"closed a connection from {host} at once: {in_flight} handshakes in flight, {mine} from that "
            f"address (at most {self.max_handshakes}, {self.max_handshakes_per_host} from one address)",
        )

    def _handshake_done(self, host: str) -> None:
        with self._lock:
            left = self._handshakes.pop(host) - 1
            if left:
                self._handshakes[host] = left

    def _serve(self, conn: socket.socket, host: str) -> None:
        """The thread of one connection: its handshake (within the cap), then its session (within the other)."""
        try:
            deadline = time.monotonic() + self.handshake_timeout_s
            try:
                admitted = self.admit_connection(conn, deadline)
            finally:
                self._handshake_done(host)
        except HandshakeTimeout as e:
            self._drop(conn, "timeouts", f"dropped a connection from {host}: {e} ({self.handshake_timeout_s} s)")
            return
        except Exception as e:  # whatever a stranger sent: the connection is refused, never left open
            self._drop(conn, "refused", f"did not admit a connection from {host}: {e}")
            return
        with self._lock:
            self.counts["admitted"] += 1
            room = self._sessions < self.max_sessions
            self._sessions += room
        if not room:
            self.discard(admitted)
            self._drop(conn, "sessions_shed", f"closed an admitted connection from {host}: {self.max_sessions} open")
            return
        try:
            self.serve(conn, admitted)
        except Exception as e:
            self._drop(conn, "session_errors", f"a session with {host} failed: {e}")
        finally:
            conn.close()
            with self._lock:
                self._sessions -= 1

    def _drop(self, conn: socket.socket, kind: str, message: str) -> None:
        self._count(kind)
        conn.close()
        self.log(kind, message)

    def admit_connection(self, conn: socket.socket, deadline: float) -> object:
        """The server's side of the handshake, done before the monotonic ``deadline``; what ``serve`` needs.

        Raises:
            GateRefused (HandshakeTimeout: the deadline passed) or OSError: the connection is not admitted.
        """
        raise NotImplementedError

    def serve(self, conn: socket.socket, admitted: object) -> None:
        """Serve an admitted connection (closed after it returns)."""
        raise NotImplementedError

    def discard(self, admitted: object) -> None:
        """Release what ``admit_connection`` returned for a connection that is not served."""

    def close(self, wait_s: float = 0.0) -> None:
        """Stop accepting; wait up to ``wait_s`` for the accept loop and the connections' threads (each sees
        ``closed`` within its socket's timeout, 0.5-2 s). Wait before the process exits: a daemon thread still
        logging while the interpreter shuts down can abort it (SIGABRT)."""
        self.closed.set()
        try:
            self.sock.close()
        except OSError:
            pass
        deadline = time.monotonic() + wait_s
        with self._lock:
            threads = [t for t in self._threads if t is not threading.current_thread()]
        for t in threads:
            t.join(timeout=max(deadline - time.monotonic(), 0.0))


class _Relays(Acceptor):
    """Each admitted connection is relayed to the socket ``admit_connection`` returns."""

    def serve(self, conn: socket.socket, upstream: socket.socket) -> None:
        _relay(conn, upstream, self.closed)

    def discard(self, upstream: socket.socket) -> None:
        upstream.close()


class Gate(_Relays):
    """On the leader: admits members of ``roster`` to the store listening on ``127.0.0.1:store_port``."""

    def __init__(self, sock: socket.socket, store_port: int, admission: Admission, roster: list[str], epoch: int):
        self.store_port, self.admission, self.roster, self.epoch = store_port, admission, set(roster), epoch
        # a member opens a connection or two to the store; the rest is room for reconnects
        super().__init__(sock, f"gate-{epoch}", max_sessions=4 * len(self.roster) + 8)

    def admit_connection(self, conn: socket.socket, deadline: float) -> socket.socket:
        admit(conn, self.admission, lambda who: who in self.roster, f"the rendezvous of epoch {self.epoch}", deadline)
        return socket.create_connection(("127.0.0.1", self.store_port), timeout=HANDSHAKE_TIMEOUT_S)


class Tunnel(_Relays):
    """On a member: a loopback port that relays to the gate at ``host:port`` after proving membership and
    checking that the gate is run by ``leader``."""

    handshake_timeout_s = DIAL_TIMEOUT_S  # the connection from the store client waits while ``dial`` tries again
    max_handshakes_per_host = MAX_HANDSHAKES  # every client is a store client of this process, on loopback

    def __init__(self, host: str, port: int, admission: Admission, leader: str, epoch: int):
        self.target, self.admission, self.leader, self.epoch = (host, port), admission, leader, epoch
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        super().__init__(sock, f"tunnel-{epoch}")

    def admit_connection(self, conn: socket.socket, deadline: float) -> socket.socket:
        up, signer = dial(*self.target, self.admission, deadline - time.monotonic())
        if signer != self.leader:
            up.close()
            raise GateRefused(f"the rendezvous of epoch {self.epoch} is run by {signer!r}, not {self.leader!r}")
        return up


def admit(
    conn: socket.socket, admission: Admission, allowed: Callable[[str], bool], what: str, deadline: float | None = None
) -> str:
    """The server's side of the handshake on connection ``conn``: challenge the client, check that it holds
    the join token and that ``allowed(its id)``, prove this peer's own id in return; the client's id.

    Args:
        deadline: monotonic time by which the whole handshake is done (default: ``HANDSHAKE_TIMEOUT_S`` from now).

    Raises:
        GateRefused: the client is not admitted (``HandshakeTimeout``: it did not answer by ``deadline``).
    """
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S if deadline is None else deadline
    nonce = secrets.token_bytes(32)
    _send(conn, nonce, deadline)
    try:
        signer, theirs = admission.open(_CHALLENGE + nonce, _recv(conn, deadline))
    except ValueError as e:
        raise GateRefused(f"refused a connection to {what}: {e}") from e
    if not allowed(signer):
        raise GateRefused(f"refused {signer!r} at {what}: not a member it admits")
    _send(conn, admission.seal(_ANSWER + theirs, b""), deadline)
    return signer


def prove(up: socket.socket, admission: Admission, timeout_s: float) -> str:
    """The client's side of the handshake on connection ``up``, all of it within ``timeout_s``: the id of the
    gate's signer.

    Raises:
        GateRefused: the gate refused us or did not prove itself (``GateBusy``: it closed the connection
            before its challenge; ``HandshakeTimeout``: the time ran out).
    """
    deadline = time.monotonic() + timeout_s
    up.settimeout(_left(deadline))
    try:
        first = up.recv(1, socket.MSG_PEEK)
    except TimeoutError as e:
        raise HandshakeTimeout("no challenge from the gate in time") from e
    except ConnectionResetError as e:
        raise GateBusy("the gate reset the connection before its challenge") from e
    if not first:
        raise GateBusy("the gate closed the connection before its challenge")
    nonce = _recv(up, deadline)
    mine = secrets.token_bytes(32)
    _send(up, admission.seal(_CHALLENGE + nonce, mine), deadline)
    try:
        signer, _ = admission.open(_ANSWER + mine, _recv(up, deadline))
    except ValueError as e:
        raise GateRefused(f"the rendezvous gate did not prove itself: {e}") from e
    return signer


def dial(host: str, port: int, admission: Admission, timeout_s: float = DIAL_TIMEOUT_S) -> tuple[socket.socket, str]:
    """A connection through the gate at ``host:port`` and the id of the gate's signer, trying again while the
    gate is busy (``GateBusy``) until ``timeout_s`` has passed; each try's handshake takes at most
    ``HANDSHAKE_TIMEOUT_S``. The caller owns the socket (its timeout is cleared).

    Raises:
        GateRefused or OSError: the gate refused us, is unreachable, or was still busy at the end.
    """
    deadline = time.monotonic() + timeout_s
    pause_s = 0.05
    while True:
        left = _left(deadline)
        up = socket.create_connection((host, port), timeout=min(left, HANDSHAKE_TIMEOUT_S))
        try:
            signer = prove(up, admission, min(_left(deadline), HANDSHAKE_TIMEOUT_S))
            up.settimeout(None)
            return up, signer
        except GateBusy:
            up.close()
            if deadline - time.monotonic() <= pause_s:
                raise
        except BaseException:
            up.close()
            raise
        time.sleep(pause_s * random.uniform(0.5, 1.5))  # jitter: members shed together do not come back together
        pause_s = min(2 * pause_s, 1.0)


def handshake(host: str, port: int, admission: Admission, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str:
    """Pass a gate's handshake and close (for tests and diagnosis): the id of the gate's signer."""
    with socket.create_connection((host, port), timeout=timeout_s) as up:
        return prove(up, admission, timeout_s)
