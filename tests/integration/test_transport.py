"""Ranks as threads in one process, each with its own gloo group over a shared TCPStore: the real
transport code path at ~0.1 s a test."""

import threading

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
        ((2, 4), (2, 3), "shape (2, 4)"),  # longer, within a framed message's room for twice the payload
        ((2, 2), (2, 3), "shape (2, 2)"),  # shorter: gloo delivers it into the larger buffer
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

    _, err = run_ranks(2, fn, timeout_s=0.5)
    assert isinstance(err, PeerProtocolError) and message in str(err)


def test_a_state_far_larger_than_expected_is_refused_by_its_header_before_its_payload_is_read():
    """Weights and states send their header first: the receiver refuses a tensor of any size without taking it
    (a framed step message only has room for twice the expected payload; see the transport's doc)."""

    refused = threading.Event()

    def fn(g):
        if g.rank == 0:
            g.send(torch.zeros(2, 300), 1, step=5, mb=0, hop=1, kind="state")
            refused.wait(30)  # stay connected until the header is read: a sender gone first is a lost stage
            return None
        try:
            return g.recv(0, step=5, mb=0, hop=1, kind="state", shape=(2, 3))
        finally:
            refused.set()

    _, err = run_ranks(2, fn, timeout_s=5.0)
    assert isinstance(err, PeerProtocolError) and "shape (2, 300)" in str(err)


@pytest.mark.parametrize("kind", ["state", "grad"])
def test_non_finite_weights_are_refused_and_non_finite_gradients_delivered(kind):
    def fn(g):
        if g.rank == 0:
            g.send(torch.tensor([1.0, float("nan")]), 1, step=1, mb=0, hop=1, kind=kind)
            g.wait_sends()
            return None
        got = g.recv(0, step=1, mb=0, hop=1, kind=kind, shape=(2,))
        return got, g.nonfinite_received

    _, got = run_ranks(2, fn)
    if kind == "state":
        assert isinstance(got, PeerProtocolError) and "non-finite state" in str(got)
    else:  # the step's commit discards it on every stage
        assert got[0][0] == 1.0 and got[0][1] != got[0][1] and got[1] == 1


def test_silent_peer_times_out_as_stage_lost():
    def fn(g):
        if g.rank == 1:
            return g.recv(0, step=3, mb=0, hop=1, kind="act", shape=(2,))  # rank 0 never sends
        return None

    _, err = run_ranks(2, fn, timeout_s=0.5)
    assert isinstance(err, StageLostError) and err.stage == 0 and err.step == 3


def test_abort_releases_a_wait_on_a_frozen_peer_at_once():
    """A peer that neither answers nor closes its connections (a SIGSTOPped process): an abort from another
    thread (the heartbeat thread's, when the frozen peer's heartbeat expires) releases the waiting rank long
    before transport.timeout_s, its error says why, and a rank waiting on the aborted one is released too."""
    import threading
    import time

    released = threading.Event()

    def fn(g):
        t0 = time.monotonic()
        if g.rank == 0:
            released.wait(10)  # frozen: holds its connections open, sends nothing
            return None
        if g.rank == 1:
            aborts = []
            timer = threading.Timer(0.3, lambda: aborts.extend([g.abort("stage 0's heartbeat expired"), g.abort("x")]))
            timer.start()
            try:
                g.recv(0, step=3, mb=0, hop=1, kind="act", shape=(2,))
            except StageLostError as e:
                timer.join()
                return e, time.monotonic() - t0, aborts
            finally:
                released.set()
        try:
            g.recv(1, step=3, mb=0, hop=2, kind="act", shape=(2,))
        except StageLostError as e:
            return e, time.monotonic() - t0

    _, (err, waited_s, aborts), (err2, waited2_s) = run_ranks(3, fn, timeout_s=20)
    assert isinstance(err, StageLostError) and "aborted: stage 0's heartbeat expired" in str(err)
    assert aborts == [True, False]  # aborted once
    assert isinstance(err2, StageLostError)
    assert waited_s < 5 and waited2_s < 5  # not the 20 s timeout
