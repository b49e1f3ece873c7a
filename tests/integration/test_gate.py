"""The rendezvous gate: a real TCPStore on loopback behind a Gate; members reach it through Tunnels."""

import socket
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from checkfree.swarm.addressing import listen
from checkfree.swarm.admission import new_token
from checkfree.swarm.gate import Gate, GateRefused, Tunnel, handshake
from tests.helpers import admission

pytestmark = pytest.mark.integration


@pytest.fixture
def gated():
    leader, member, bystander = admission("leader"), admission("member"), admission("bystander")
    inner = listen("127.0.0.1", None)
    store = dist.TCPStore(
        "127.0.0.1",
        inner.getsockname()[1],
        2,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=5),
        master_listen_fd=inner.detach(),
    )
    gate = Gate(listen("127.0.0.1", None), store.port, leader, [leader.peer_id, member.peer_id], epoch=7)
    yield store, gate, leader, member, bystander
    gate.close()


def client(port: int, timeout_s: float = 3.0) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=timeout_s))


def test_a_member_reaches_the_store_through_its_tunnel(gated):
    store, gate, leader, member, _ = gated
    tunnel = Tunnel("127.0.0.1", gate.port, member, leader.peer_id, epoch=7)
    try:
        c = client(tunnel.port)
        c.set("from-member", b"hello")
        assert store.get("from-member") == b"hello"
        store.set("from-leader", b"weights-address")
        assert c.get("from-leader") == b"weights-address"
        assert handshake("127.0.0.1", gate.port, member) == leader.peer_id
    finally:
        tunnel.close()


@pytest.mark.parametrize("who", ["bystander", "outsider"])
def test_others_are_refused_before_reaching_the_store(gated, who, caplog):
    """A holder of the token outside the epoch's roster, and a process without the token, are refused at the
    handshake; their store client never gets through."""
    store, gate, leader, _, bystander = gated
    other = bystander if who == "bystander" else admission("outsider", token=new_token())
    with pytest.raises(GateRefused):
        handshake("127.0.0.1", gate.port, other)
    tunnel = Tunnel("127.0.0.1", gate.port, other, leader.peer_id, epoch=7)
    try:
        with pytest.raises(Exception):  # noqa: B017 - torch raises DistStoreError or RuntimeError by version
            client(tunnel.port, timeout_s=1.0).set("planted", b"x")
    finally:
        tunnel.close()
    assert not store.check(["planted"])
    assert "refused" in caplog.text


def test_a_raw_store_client_and_garbage_are_refused(gated):
    store, gate, *_ = gated
    with pytest.raises(Exception):  # noqa: B017
        client(gate.port, timeout_s=1.0).set("planted", b"x")
    with socket.create_connection(("127.0.0.1", gate.port), timeout=2) as s:
        s.recv(64)
        s.sendall(b"\xff\xff\xff\xff" + b"x" * 100)  # a length far over the handshake's bound
        s.settimeout(2)
        try:
            assert s.recv(1) == b""  # the gate closed the connection ...
        except ConnectionResetError:
            pass  # ... with our bytes unread (a reset)
    assert not store.check(["planted"])


def test_a_member_refuses_a_gate_run_by_someone_else(gated):
    """A tunnel checks that the gate is the epoch's leader: an impostor at the store's address is not trusted."""
    store, gate, leader, member, bystander = gated
    impostor = Gate(listen("127.0.0.1", None), store.port, bystander, [member.peer_id], epoch=7)
    tunnel = Tunnel("127.0.0.1", impostor.port, member, leader.peer_id, epoch=7)
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017
            client(tunnel.port, timeout_s=1.0).set("k", b"v")
        assert time.monotonic() - t0 < 10
    finally:
        tunnel.close()
        impostor.close()
