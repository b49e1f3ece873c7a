"""
Probe
=====

Both ends of the probe protocol. Every peer listens on a probe port while its process lives: a refused
connection tells the others at once that the process is gone, and an answer tells them it lives and what
it reports (its last heartbeat record, sealed). The protocol, one request per connection:

- the client sends one request byte and a fresh nonce (``NONCE_BYTES``): ``?`` read the record, ``!`` knock
  (read it, and wake the peer: something changed), ``E`` a knock that carries an epoch record just published
  (then its length and the sealed record);
- the peer answers ``REPLY`` and an answer sealed over the client's nonce (``Admission.seal``): its signed
  record. An answer is good for that one nonce only, so a dead peer's old answer replayed from its port
  (or any port) proves nothing, and a client checks that the peer it asked is the one that signed.

The server (``ProbeServer``) answers every client concurrently from one selector thread, each connection
within a deadline, and drops the oldest unfinished connection once ``max_conns`` are open: idle or
trickling clients (a port scanner, an attacker without the token) cannot delay the answer to a member's
probe, which is what keeps a healthy stage from looking frozen. Plain knocks are rate-limited (each
makes the peer run a watch round); a pushed epoch is checked first and always wakes it.
"""

from __future__ import annotations

import logging
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

from checkfree.swarm.admission import Admission

logger = logging.getLogger(__name__)

ASK = b"?"  # read the record
KNOCK = b"!"  # read it, and wake the peer
EPOCH = b"E"  # a knock that carries a sealed epoch record
REPLY = b"k"
NONCE_BYTES = 16
MAX_RECORD_BYTES = 1 << 16
PROBE_TIMEOUT_S = 0.5  # a probe not answered in this time is "frozen" (a live process answers in milliseconds)
NO_ANSWER = ("silent", "frozen")  # the answers that say the peer cannot serve now
_ANSWER_CONTEXT = b"probe-answer|"
_MAX_ANSWER_BYTES = MAX_RECORD_BYTES + 4096


def answer_context(nonce: bytes) -> bytes:
    return _ANSWER_CONTEXT + nonce


class ProbeClient:
    """The client's side: asks a peer's probe port, checking the answer against this swarm's token."""

    def __init__(self, admission: Admission):
        self.admission = admission

    def ask(
        self, host: str, port: int, peer_id: str | None = None, timeout_s: float = PROBE_TIMEOUT_S
    ) -> tuple[str, bytes | None]:
        """(answer, the sealed member record served, or None). The answer is ``refused`` (the host answers,
        nothing listens: the process is gone), ``alive`` (a valid answer to this probe's nonce, signed by
        ``peer_id`` when given, within ``timeout_s``), ``frozen`` (the host accepted the connection but no
        valid answer came: stopped, stuck, or someone else on its port) or ``silent`` (no connection: a
        vanished host, a partition, or no address known). ``silent`` is the only answer that leaves open
        that the peer lives on the other side of a partition."""
        return self._exchange(host, port, ASK, b"", peer_id, timeout_s)

    def probe(self, host: str, port: int, peer_id: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> str:
        return self.ask(host, port, peer_id, timeout_s)[0]

    def knock(self, addresses: list[tuple[str, int]], epoch: bytes | None = None) -> None:
        """Wake the peers at these probe addresses, in a background thread: a peer waiting for an epoch reads
        the swarm at once instead of at its next poll, and a training peer runs its watch round at once.
        ``epoch``: the sealed epoch record just published, which the members join without a DHT round trip."""
        kind, body = (KNOCK, b"") if epoch is None else (EPOCH, struct.pack("!I", len(epoch)) + epoch)

        def run() -> None:
            for host, port in addresses:
                self._exchange(host, port, kind, body, None, 0.2)

        if addresses:
            threading.Thread(target=run, name="knock", daemon=True).start()

    def _exchange(
        self, host: str, port: int, kind: bytes, body: bytes, peer_id: str | None, timeout_s: float
    ) -> tuple[str, bytes | None]:
        if not port:
            return "silent", None
        deadline = time.monotonic() + timeout_s
        try:
            conn = socket.create_connection((host, port), timeout=timeout_s)
        except ConnectionRefusedError:
            return "refused", None
        except OSError:
            return "silent", None
        nonce = secrets.token_bytes(NONCE_BYTES)
        buf = b""
        try:
            conn.sendall(kind + nonce + body)
            while len(buf) <= _MAX_ANSWER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                conn.settimeout(left)
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError:
            pass
        finally:
            conn.close()
        if not buf.startswith(REPLY) or len(buf) > _MAX_ANSWER_BYTES:
            return "frozen", None
        try:
            signer, record = self.admission.open(answer_context(nonce), buf[len(REPLY) :])
        except ValueError:
            return "frozen", None  # not an answer to this probe: a replay, a stranger, a cut-off reply
        if peer_id is not None and signer != peer_id:
            return "frozen", None  # someone else answers on its port
        return "alive", record or None


class TokenBucket:
    """At most ``rate`` events a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens, self._at = burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class _Conn:
    __slots__ = ("sock", "deadline", "inbox", "outbox", "opened")

    def __init__(self, sock: socket.socket, deadline: float, opened: float):
        self.sock, self.deadline, self.opened = sock, deadline, opened
        self.inbox, self.outbox = b"", b""


COUNTERS = ("conns", "asks", "knocks", "knocks_limited", "pushes", "pushes_refused", "shed", "timeouts", "errors")

# the counters of a peer's record (``MemberRecord.counters``) that a fault leaves at 0 and an attack or an
# overload does not: connections shed or timed out at its probe port or its gate, knocks over the rate
# limit, pushed epochs and gate handshakes refused, DHT records sealed with another join token
ATTACK_COUNTERS = (
    "shed",
    "timeouts",
    "knocks_limited",
    "pushes_refused",
    "records_foreign",
    "gate_refused",
    "gate_shed",
)


class ProbeServer:
    """The peer's side: serves ``served`` (its sealed record) on ``sock`` until ``close``.

    ``on_knock()`` runs (in the server's thread) for every knock the rate limit lets through and every valid
    pushed epoch; ``on_epoch(sealed)`` checks a pushed epoch record and returns whether it was accepted."""

    def __init__(
        self,
        sock: socket.socket,
        admission: Admission,
        on_knock: Callable[[], None],
        on_epoch: Callable[[bytes], bool],
        deadline_s: float = PROBE_TIMEOUT_S,
        max_conns: int = 1024,
        knocks_per_s: float = 10.0,
        knock_burst: float = 20.0,
    ):
        self.sock, self.admission, self.on_knock, self.on_epoch = sock, admission, on_knock, on_epoch
        self.deadline_s, self.max_conns = deadline_s, max_conns
        self.knocks = TokenBucket(knocks_per_s, knock_burst)
        self.served = b""  # the sealed record answered with (set by the peer at every watch round)
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._closed = threading.Event()
        self._logged = -1e9
        self._sel = selectors.DefaultSelector()
        sock.setblocking(False)
        self._sel.register(sock, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="probe", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- the selector loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        conns: dict[socket.socket, _Conn] = {}
        try:
            while not self._closed.is_set():
                for key, events in self._sel.select(timeout=0.1):
                    try:
                        if key.data is None:
                            self._accept(conns)
                        elif events & selectors.EVENT_READ and not key.data.outbox:
                            self._read(conns, key.data)
                        elif events & selectors.EVENT_WRITE:
                            self._write(conns, key.data)
                    except Exception:  # one bad connection must never take the probe port down with it
                        self.counts["errors"] += 1
                        if time.monotonic() - self._logged > 60:
                            self._logged = time.monotonic()
                            logger.exception("probe server: a connection failed (%d so far)", self.counts["errors"])
                        if key.data is not None:
                            self._drop(conns, key.data)
                now = time.monotonic()
                for c in [c for c in conns.values() if c.deadline < now]:
                    self.counts["timeouts"] += 1
                    self._drop(conns, c)
        finally:
            for c in list(conns.values()):
                self._drop(conns, c)
            self._sel.close()

    def _accept(self, conns: dict[socket.socket, _Conn]) -> None:
        for _ in range(64):  # a burst at a time; the rest at the next select
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the backlog keeps them until fds free up
            self.counts["conns"] += 1
            if len(conns) >= self.max_conns:  # the oldest unfinished client makes room (members finish in ms)
                self.counts["shed"] += 1
                self._drop(conns, min(conns.values(), key=lambda c: c.opened))
            sock.setblocking(False)
            now = time.monotonic()
            c = _Conn(sock, now + self.deadline_s, now)
            conns[sock] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _read(self, conns: dict[socket.socket, _Conn], c: _Conn) -> None:
        try:
            chunk = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conns, c)
            return
        c.inbox += chunk
        head = 1 + NONCE_BYTES
        if len(c.inbox) < head:
            return
        kind, nonce = c.inbox[:1], c.inbox[1:head]
        if kind == EPOCH:
            if len(c.inbox) < head + 4:
                return
            n = struct.unpack("!I", c.inbox[head : head + 4])[0]
            if n > MAX_RECORD_BYTES:
                self.counts["pushes_refused"] += 1
                self._drop(conns, c)
                return
            if len(c.inbox) < head + 4 + n:
                c.deadline = max(c.deadline, c.opened + 2 * self.deadline_s)  # a record takes a little longer
                return
            self.counts["pushes"] += 1
            if self.on_epoch(c.inbox[head + 4 : head + 4 + n]):
                self.on_knock()
            else:
                self.counts["pushes_refused"] += 1
        elif kind == KNOCK:
            self.counts["knocks"] += 1
            if self.knocks.take():
                self.on_knock()
            else:
                self.counts["knocks_limited"] += 1
        elif kind == ASK:
            self.counts["asks"] += 1
        else:
            self._drop(conns, c)
            return
        c.outbox = REPLY + self.admission.seal(answer_context(nonce), self.served)
        self._sel.modify(c.sock, selectors.EVENT_WRITE, c)
        self._write(conns, c)

    def _write(self, conns: dict[socket.socket, _Conn], c: _Conn) -> None:
        try:
            sent = c.sock.send(c.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conns, c)
            return
        c.outbox = c.outbox[sent:]
        if not c.outbox:
            self._drop(conns, c)

    def _drop(self, conns: dict[socket.socket, _Conn], c: _Conn) -> None:
        conns.pop(c.sock, None)
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
