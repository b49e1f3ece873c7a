"""Ranks as threads in one process, each with its own gloo group over a shared TCPStore: the real
transport code path at ~0.1 s a test."""

import pytest
import torch

from checkfree.swarm.transport import PeerProtocolError, StageLostError
from tests.helpers import run_ranks


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


@pytest.mark.parametrize(
    "sent,expected,message",
    [
        ((2, 4), (2, 3), "shape (2, 4)"),
        ((2, 3), (2, 3), "step 5"),
    ],
)
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
