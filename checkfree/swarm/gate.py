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
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import threading

from checkfree.swarm.admission import Admission

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 3.0
MAX_HANDSHAKE_BYTES = 1 << 12
_CHALLENGE = b"gate-challenge|"
_ANSWER = b"gate-answer|"


class GateRefused(ConnectionError):
    """The other side of a gate handshake is not who it must be (the message says why)."""


def _send(conn: socket.socket, data: bytes) -> None:
    conn.sendall(struct.pack("!I", len(data)) + data)


def _recv(conn: socket.socket) -> bytes:
    head = _recv_exact(conn, 4)
    n = struct.unpack("!I", head)[0]
    if n > MAX_HANDSHAKE_BYTES:
        raise GateRefused(f"handshake message of {n} bytes (at most {MAX_HANDSHAKE_BYTES})")
    return _recv_exact(conn, n)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
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
    back.start()
    pump(a, b)
    back.join()
    for s in (a, b):
        s.close()


class Acceptor:
    """A listening socket whose accepted connections are each handed to ``on_connection`` in a thread of their
    own until ``close()`` (the gate, its tunnels, a preempted peer's hand-over server)."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock, self.name = sock, name
        self.closed = threading.Event()
        sock.settimeout(0.5)
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self.on_connection, args=(conn,), name=f"{self.name}-conn", daemon=True).start()

    def on_connection(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.closed.set()
        try:
            self.sock.close()
        except OSError:
            pass


class _Relays(Acceptor):
    """Each accepted connection, once ``handle`` admits it, is relayed to the socket ``handle`` returns."""

    def on_connection(self, conn: socket.socket) -> None:
        try:
            upstream = self.handle(conn)
        except (OSError, GateRefused) as e:
            logger.warning("[%s] %s", self.name, e)
            conn.close()
            return
        _relay(conn, upstream, self.closed)

    def handle(self, conn: socket.socket) -> socket.socket:
        raise NotImplementedError


class Gate(_Relays):
    """On the leader: admits members of ``roster`` to the store listening on ``127.0.0.1:store_port``."""

    def __init__(self, sock: socket.socket, store_port: int, admission: Admission, roster: list[str], epoch: int):
        self.store_port, self.admission, self.roster, self.epoch = store_port, admission, set(roster), epoch
        super().__init__(sock, f"gate-{epoch}")

    def handle(self, conn: socket.socket) -> socket.socket:
        admit(conn, self.admission, lambda who: who in self.roster, f"the rendezvous of epoch {self.epoch}")
        upstream = socket.create_connection(("127.0.0.1", self.store_port), timeout=HANDSHAKE_TIMEOUT_S)
        conn.settimeout(None)
        return upstream


class Tunnel(_Relays):
    """On a member: a loopback port that relays to the gate at ``host:port`` after proving membership and
    checking that the gate is run by ``leader``."""

    def __init__(self, host: str, port: int, admission: Admission, leader: str, epoch: int):
        self.target, self.admission, self.leader, self.epoch = (host, port), admission, leader, epoch
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        super().__init__(sock, f"tunnel-{epoch}")

    def handle(self, conn: socket.socket) -> socket.socket:
        up = socket.create_connection(self.target, timeout=HANDSHAKE_TIMEOUT_S)
        try:
            signer = prove(up, self.admission, HANDSHAKE_TIMEOUT_S)
            if signer != self.leader:
                raise GateRefused(f"the rendezvous of epoch {self.epoch} is run by {signer!r}, not {self.leader!r}")
            up.settimeout(None)
            return up
        except BaseException:
            up.close()
            raise


def admit(conn: socket.socket, admission: Admission, allowed, what: str) -> str:
    """The server's side of the handshake on connection ``conn``: challenge the client, check that it holds
    the join token and that ``allowed(its id)``, prove this peer's own id in return; the client's id."""
    conn.settimeout(HANDSHAKE_TIMEOUT_S)
    nonce = secrets.token_bytes(32)
    _send(conn, nonce)
    try:
        signer, theirs = admission.open(_CHALLENGE + nonce, _recv(conn))
    except ValueError as e:
        raise GateRefused(f"refused a connection to {what}: {e}") from e
    if not allowed(signer):
        raise GateRefused(f"refused {signer!r} at {what}: not a member it admits")
    _send(conn, admission.seal(_ANSWER + theirs, b""))
    return signer


def prove(up: socket.socket, admission: Admission, timeout_s: float) -> str:
    """The client's side of the handshake on connection ``up``: the id of the gate's signer."""
    up.settimeout(timeout_s)
    nonce = _recv(up)
    mine = secrets.token_bytes(32)
    _send(up, admission.seal(_CHALLENGE + nonce, mine))
    try:
        signer, _ = admission.open(_ANSWER + mine, _recv(up))
    except ValueError as e:
        raise GateRefused(f"the rendezvous gate did not prove itself: {e}") from e
    return signer


def handshake(host: str, port: int, admission: Admission, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str:
    """Pass a gate's handshake and close (for tests and diagnosis): the id of the gate's signer."""
    with socket.create_connection((host, port), timeout=timeout_s) as up:
        return prove(up, admission, timeout_s)
