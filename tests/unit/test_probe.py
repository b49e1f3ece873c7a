"""The probe protocol on real loopback sockets: answers bound to the asker's nonce and signed by the peer
asked, and a server that keeps answering members while strangers hold hundreds of idle or trickling
connections to it, or flood it with knocks."""

import socket
import threading
import time

import pytest

from checkfree.swarm.probe import ASK, EPOCH, KNOCK, NONCE_BYTES, REPLY, ProbeClient, ProbeServer
from tests.helpers import admission


class Server:
    def __init__(self, **kw):
        self.admission = admission("peer")
        self.knocked, self.pushed = [], []
        sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.server = ProbeServer(sock, self.admission, lambda: self.knocked.append(1), self._epoch, **kw)
        self.server.served = self.admission.seal(b"probe", b"the record")
        self.port = self.server.port

    def _epoch(self, sealed):
        self.pushed.append(sealed)
        return sealed.startswith(b"good")


@pytest.fixture
def peer():
    s = Server()
    yield s
    s.server.close()


@pytest.fixture
def client():
    return ProbeClient(admission("asker"))


def test_an_answer_is_signed_by_the_peer_asked_and_carries_its_record(peer, client):
    assert client.ask("127.0.0.1", peer.port, peer.admission.peer_id) == ("alive", peer.server.served)
    assert client.probe("127.0.0.1", peer.port, "someone.else") == "frozen"  # another peer on its port
    gone = socket.create_server(("127.0.0.1", 0))
    port = gone.getsockname()[1]
    gone.close()
    assert client.probe("127.0.0.1", port) == "refused"
    assert client.probe("127.0.0.1", 0) == "silent"
    mute = socket.create_server(("127.0.0.1", 0))  # accepted by the kernel, never answered: a stopped process
    try:
        assert client.probe("127.0.0.1", mute.getsockname()[1], timeout_s=0.2) == "frozen"
    finally:
        mute.close()


def test_an_answer_from_another_swarm_or_a_replayed_one_proves_nothing(peer):
    stranger = ProbeClient(admission("x", token="cfj1_" + "B" * 43))
    assert stranger.probe("127.0.0.1", peer.port) == "frozen"  # sealed with a token it does not hold
    # capture one answer, then serve it from a port of our own: a dead peer's old answer replayed
    with socket.create_connection(("127.0.0.1", peer.port)) as conn:
        conn.sendall(ASK + b"n" * NONCE_BYTES)
        captured = b""
        while chunk := conn.recv(65536):
            captured += chunk
    assert captured.startswith(REPLY)
    fake = socket.create_server(("127.0.0.1", 0))

    def replay():
        for _ in range(2):
            c, _ = fake.accept()
            c.recv(64)
            c.sendall(captured)
            c.close()

    threading.Thread(target=replay, daemon=True).start()
    client = ProbeClient(admission("asker"))
    try:
        assert client.probe("127.0.0.1", fake.getsockname()[1]) == "frozen"
        assert client.probe("127.0.0.1", fake.getsockname()[1], peer.admission.peer_id) == "frozen"
    finally:
        fake.close()


def _hold(port, n, trickle):
    """``n`` connections that send nothing (or one byte every 0.3 s, never a whole request)."""
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    stop = threading.Event()

    def drip():
        while not stop.wait(0.3):
            for c in conns:
                try:
                    c.send(b"E")
                except OSError:
                    pass

    if trickle:
        threading.Thread(target=drip, daemon=True).start()
    return conns, stop


@pytest.mark.parametrize("n,trickle", [(8, False), (500, False), (500, True)])
def test_idle_or_trickling_strangers_do_not_delay_a_members_probe(peer, client, n, trickle):
    conns, stop = _hold(peer.port, n, trickle)
    try:
        worst = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            assert client.probe("127.0.0.1", peer.port, peer.admission.peer_id) == "alive"
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.05)
        assert worst < 0.5, worst  # within one probe timeout, every time
    finally:
        stop.set()
        for c in conns:
            c.close()
    assert peer.server.counts["timeouts"] >= min(n, 1)  # the strangers were dropped at their deadline


def test_past_max_conns_the_oldest_unfinished_connection_makes_room():
    s = Server(max_conns=50)
    client = ProbeClient(admission("asker"))
    conns, stop = _hold(s.port, 200, False)
    try:
        assert client.probe("127.0.0.1", s.port, s.admission.peer_id) == "alive"
        assert s.server.counts["shed"] >= 100
    finally:
        stop.set()
        for c in conns:
            c.close()
        s.server.close()


def test_a_knock_flood_is_rate_limited_but_a_pushed_epoch_always_wakes(peer):
    t0 = time.monotonic()
    for _ in range(300):
        with socket.create_connection(("127.0.0.1", peer.port)) as c:
            c.sendall(KNOCK + b"n" * NONCE_BYTES)
            c.recv(1)
    elapsed = time.monotonic() - t0
    assert peer.server.counts["knocks"] == 300
    assert len(peer.knocked) <= 20 + 10 * elapsed + 1  # the burst, then 10 a second
    assert peer.server.counts["knocks_limited"] >= 300 - len(peer.knocked)
    before = len(peer.knocked)
    body = b"good epoch"
    with socket.create_connection(("127.0.0.1", peer.port)) as c:
        c.sendall(EPOCH + b"n" * NONCE_BYTES + len(body).to_bytes(4, "big") + body)
        assert c.recv(1) == REPLY
    assert peer.pushed[-1] == body and len(peer.knocked) == before + 1
    with socket.create_connection(("127.0.0.1", peer.port)) as c:  # a refused record wakes nobody
        c.sendall(EPOCH + b"n" * NONCE_BYTES + (3).to_bytes(4, "big") + b"bad")
        c.recv(1)
    assert len(peer.knocked) == before + 1 and peer.server.counts["pushes_refused"] == 1


def test_knock_reaches_every_address_in_the_background(peer, client):
    client.knock([("127.0.0.1", peer.port)] * 3)
    deadline = time.monotonic() + 5
    while len(peer.knocked) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(peer.knocked) == 3
