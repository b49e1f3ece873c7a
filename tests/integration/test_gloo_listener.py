"""gloo's listener under connections that are opened and closed without a word, with two ranks of an
``EpochGroup`` as real processes on loopback (``checkfree.swarm.limits``).

What was measured (torch 2.13 CPU, gloo's TCP transport): every connection opened and closed on a rank's gloo
listening port leaves one file descriptor open in that rank (exactly 1.00 per connection over 2,000, beside the
9 it held before), and destroying the group does not give them back (measured with a scratch script). The rank
goes on training: after 2,000 such connections its group still all-reduces. At the soft limit of open files
gloo's accept fails and the rank aborts (SIGABRT, ``listener.cc: accept: Too many open files``): with a soft
limit of 256 that took 247 connections (256 less the 9 descriptors in use), a few milliseconds of one client.

``raise_file_limit`` lifts the soft limit to the hard one at peer start (20,000 here, often 2^20 on servers),
so that it takes that many connections; it does not stop the leak. What still kills a rank: enough connections
to its gloo port over its life, from anyone who can reach the port (one process opens ~4,000 a second on
loopback, so 2^20 take minutes). Only keeping gloo's port out of strangers' reach (a firewall, an address only
the swarm's machines route to) or a gloo that closes the connections it drops would end it.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch.distributed as dist

from checkfree.swarm import limits
from checkfree.swarm.limits import raise_file_limit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists("/proc/self/net/tcp"), reason="reads sockets from Linux's /proc"),
]

# One rank of a 2-rank EpochGroup on loopback: it forms the group, prints its pid, then answers commands
# read from stdin ("ar": all-reduce its rank + 1; "quit").
RANK = """
import resource, sys
from datetime import timedelta
import torch, torch.distributed as dist
from checkfree.swarm.config import TransportConfig
from checkfree.swarm.limits import raise_file_limit
from checkfree.swarm.transport import EpochGroup

rank, port, soft = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort leaves no core file
before, after = raise_file_limit()
if soft:  # a lower limit than the peer would have, to reach it with few connections
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=30))
group = EpochGroup(store, 0, rank, [0, 1], TransportConfig(timeout_s=20.0), host="127.0.0.1")
print("ready", before, after, flush=True)
for line in sys.stdin:
    if line.strip() == "ar":
        print(group.all_reduce(torch.tensor([float(rank + 1)]), step=0).item(), flush=True)
    else:
        break
"""


class Ranks:
    """Two rank processes of one group over a store of this process (each ended by its pid on exit)."""

    def __init__(self, soft_limit_of_rank0: int = 0):
        self.store = dist.TCPStore(
            "127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30)
        )
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", RANK, str(r), str(self.store.port), str(soft_limit_of_rank0 if r == 0 else 0)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(2)
        ]

    def __enter__(self) -> Ranks:
        for p in self.procs:
            line = p.stdout.readline().split()
            assert line and line[0] == "ready", f"rank {p.pid} did not form its group"
            self.limits = (int(line[1]), int(line[2]))
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)

    def all_reduce(self) -> list[float]:
        for p in self.procs:
            p.stdin.write("ar\n")
            p.stdin.flush()
        return [float(p.stdout.readline()) for p in self.procs]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process ``pid`` listens on: its sockets (by inode) that /proc/net/tcp shows in LISTEN."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def knock(port: int, n: int, alive) -> int:
    """Open and close ``n`` connections to ``port`` (without a byte), while ``alive()``; how many were made."""
    for i in range(n):
        if not alive():
            return i
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return i
    return n


def test_a_rank_still_trains_after_2000_connections_to_its_gloo_port():
    with Ranks() as ranks:
        rank0 = ranks.procs[0]
        ports = listening_ports(rank0.pid)
        assert ports and ranks.store.port not in ports
        held = fds(rank0.pid)
        made = sum(knock(port, 2000, lambda: rank0.poll() is None) for port in ports)
        assert made == 2000 * len(ports)
        assert ranks.all_reduce() == [3.0, 3.0]
        leaked = fds(rank0.pid) - held
        assert rank0.poll() is None
    assert ranks.limits[1] >= ranks.limits[0]
    # gloo keeps every such connection's descriptor: 1.00 a connection measured (see the module's doc)
    assert leaked <= 1.05 * made, f"{leaked} descriptors for {made} connections"


def test_the_leak_still_aborts_a_rank_at_its_file_limit():
    """The bound, shown at a small limit: the rank dies when the connections' descriptors reach its soft limit
    of open files; raise_file_limit only moves that number. Counted by connections made, not by sampling the
    rank's descriptors: a loaded rank takes the kernel's completed connections in bursts (a CI run sampled
    128 descriptors just before the rank, at 256, aborted)."""
    with Ranks(soft_limit_of_rank0=256) as ranks:
        rank0 = ranks.procs[0]
        held = fds(rank0.pid)
        port = listening_ports(rank0.pid)[0]
        made = knock(port, 1000, lambda: rank0.poll() is None)
        rank0.wait(10)
        err = rank0.stderr.read()
        assert rank0.returncode == -signal.SIGABRT, (rank0.returncode, held, made, err[-500:])
    assert "Too many open files" in err, err[-500:]
    assert made >= 256 - held, (held, made)  # it held out until its descriptors could reach the limit


def test_raise_file_limit_lifts_the_soft_limit_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_file_limit() == (min(256, hard), hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert raise_file_limit() == (hard, hard)  # already there: nothing to do
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_raise_file_limit_caps_an_unlimited_hard_limit_and_never_raises(monkeypatch, caplog):
    calls = []

    def setrlimit(_, limits_):
        calls.append(limits_[0])
        if limits_[0] > 1 << 16:  # a kernel whose nr_open is 65536
            raise ValueError("not allowed to raise maximum limit")

    fake = type("R", (), {"RLIMIT_NOFILE": 7, "RLIM_INFINITY": -1, "setrlimit": staticmethod(setrlimit)})
    fake.getrlimit = staticmethod(lambda _: (1024, -1))
    monkeypatch.setattr(limits, "resource", fake)
    assert raise_file_limit() == (1024, 1 << 16)
    assert calls == [1 << 20, 1 << 19, 1 << 18, 1 << 17, 1 << 16]

    def refuse(*_):
        raise OSError("operation not permitted")

    fake.setrlimit = staticmethod(refuse)
    fake.getrlimit = staticmethod(lambda _: (1024, 4096))
    with caplog.at_level(logging.WARNING, logger="checkfree.swarm.limits"):
        assert raise_file_limit() == (1024, 1024)
    assert "cannot raise the limit of open files" in caplog.text
