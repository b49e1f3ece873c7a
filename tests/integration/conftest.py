"""
Integration fixtures
====================

Shared by the tests of this folder: a rendezvous store behind its gate.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from checkfree.swarm.addressing import listen
from checkfree.swarm.gate import Gate
from tests.helpers import admission


@pytest.fixture
def gated():
    """A real TCPStore on loopback behind the ``Gate`` of epoch 7 run by ``leader`` for the roster ``leader
    member``; ``bystander`` holds the join token but is not in the roster. Yields (store, gate, leader, member,
    bystander)."""
    leader, member, bystander = admission("leader"), admission("member"), admission("bystander")
    inner = listen("127.0.0.1", None)
    store = dist.TCPStore(
        "127.0.0.1",
        inner.getsockname()[1],
        2,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=10),
        master_listen_fd=inner.detach(),
    )
    gate = Gate(listen("127.0.0.1", None), store.port, leader, [leader.peer_id, member.peer_id], epoch=7)
    yield store, gate, leader, member, bystander
    gate.close()
