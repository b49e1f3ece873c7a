"""Ranks as threads in one process, each with its own gloo group over a shared TCPStore: the real
transport code path at ~0.1 s a test."""

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from checkfree.swarm.config import TransportConfig
from checkfree.swarm.transport import EpochGroup, PeerProtocolError, StageLostError


def run_ranks(world: int, fn, timeout_s: float = 2.0, epoch: int = 0):
    """Run ``fn(group)`` on ``world`` thread ranks (rank r = stage r); returns results or exceptions."""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    results: list = [None] * world
    cfg = TransportConfig(timeout_s=timeout_s)

    def target(rank):
        try:  # each rank its own store client, as separate processes would have
            client = dist.TCPStore("127.0.0.1", store.port, world, is_master=False, timeout=timedelta(seconds=10))
            group = EpochGroup(client, epoch, rank, list(range(world)), cfg, run_tag=7)
            results[rank] = fn(group)
        except Exception as e:  # noqa: BLE001 - handed back to the test
            results[rank] = e

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a rank hung past every timeout"
    return results


def test_send_recv_and_all_reduce():
    def fn(g):
        if g.rank == 0:
            g.send(torch.arange(6.0).view(2, 3), 1, step=4, mb=1, hop=2, kind="act")
            g.wait_sends()
            got = None
        else:
            got = g.recv(0, step=4, mb=1, hop=2, kind="act", shape=(2, 3))
        total = g.all_reduce(torch.tensor([float(g.rank + 1)]), step=4)
        return got, total.item()

    (r0, r1) = run_ranks(2, fn)
    assert torch.equal(r1[0], torch.arange(6.0).view(2, 3))
    assert r0[1] == r1[1] == 3.0


@pytest.mark.parametrize("sent,expected,message", [
    ((2, 4), (2, 3), "shape (2, 4)"),
    ((2, 3), (2, 3), "step 5"),
])
def test_wrong_tensor_from_a_peer_is_refused(sent, expected, message):
    def fn(g):
        if g.rank == 0:
            g.send(torch.zeros(sent), 1, step=5, mb=0, hop=1, kind="act")
            g.wait_sends()
            return None
        step = 5 if sent != expected else 6
        return g.recv(0, step=step, mb=0, hop=1, kind="act", shape=expected)

    _, err = run_ranks(2, fn, timeout_s=0.5)  # the sender's payload is never taken: it times out
    assert isinstance(err, PeerProtocolError) and message in str(err)


def test_non_finite_tensor_is_refused():
    def fn(g):
        if g.rank == 0:
            g.send(torch.tensor([1.0, float("nan")]), 1, step=1, mb=0, hop=1, kind="grad")
            g.wait_sends()
            return None
        return g.recv(0, step=1, mb=0, hop=1, kind="grad", shape=(2,))

    _, err = run_ranks(2, fn)
    assert isinstance(err, PeerProtocolError) and "non-finite grad" in str(err)


def test_silent_peer_times_out_as_stage_lost():
    def fn(g):
        if g.rank == 1:
            return g.recv(0, step=3, mb=0, hop=1, kind="act", shape=(2,))  # rank 0 never sends
        return None

    _, err = run_ranks(2, fn, timeout_s=0.5)
    assert isinstance(err, StageLostError) and err.stage == 0 and err.step == 3
