"""
Emulated hosts
==============

Every peer on a host of its own, on one machine: each host is a Linux network namespace with one
address, joined to the others by a bridge, so peers talk over real (virtual) Ethernet instead of
loopback, and a host can vanish without a TCP reset (its link set down), be cut off from part of the
swarm, or get a bandwidth limit (the ``tbf`` qdisc).

Layout, for a run with prefix ``P`` (unique per run, so runs and tests never share names):

- a bridge ``Pbr`` in the root namespace with the address ``NET.1/24``: the root namespace (the launcher,
  ``checkfree status``) is the host at ``.1``;
- host ``i``: namespace ``P-hI`` with loopback up and ``eth0`` at ``NET.(10+i)/24``, the other end of its
  veth pair (``PhI``) enslaved to the bridge.

The hosts have no default route: they reach the subnet and nothing else. ``NET`` is a free /24 in
10.0.0.0/8 picked per run. Needs root and iproute2 (``ip``, ``tc``); ``netem`` (delay, loss) is not
used (not every kernel has it): latency is not emulated.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field


class HostsUnavailable(RuntimeError):
    """Namespaces cannot be created here (not root, no iproute2, or the kernel refuses)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def unavailable() -> str | None:
    """Why emulated hosts cannot be made on this machine, or None when they can (tries one namespace)."""
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    name = f"cfprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace: {getattr(e, 'stderr', '') or e}".strip()
    _ip("netns", "del", name, check=False)
    return None


@dataclass
class Host:
    index: int
    netns: str
    address: str
    link: str  # the root-namespace end of its veth pair (on the bridge)

    def exec_prefix(self) -> list[str]:
        """Prepend to a command line to run it on this host."""
        return ["ip", "netns", "exec", self.netns]


@dataclass
class Hosts:
    """A set of emulated hosts on one bridge; ``close()`` removes every namespace and link it made."""

    prefix: str  # <= 6 characters: interface names are limited to 15
    rate_mbit: float = 0.0  # bandwidth limit of every host's link, each direction; 0: none
    hosts: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prefix.isalnum() or len(self.prefix) > 6:
            raise ValueError(f"hosts prefix {self.prefix!r} must be 1-6 letters or digits")
        if self.rate_mbit < 0:
            raise ValueError(f"host bandwidth limit {self.rate_mbit} Mbit/s must be >= 0 (0: none)")
        why = unavailable()
        if why is not None:
            raise HostsUnavailable(why)
        self._blackholes: list[tuple[Host, str]] = []  # (host, address it cannot reach): see ``partition``
        self.bridge = f"{self.prefix}br"
        self.net = _free_subnet(self.prefix)
        self.gateway = str(self.net.network_address + 1)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/{self.net.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except subprocess.CalledProcessError as e:
            self.close()
            raise HostsUnavailable(f"cannot create bridge {self.bridge}: {e.stderr.strip()}") from e

    def add(self) -> Host:
        """A new host on the bridge (its index is the next free one; addresses are never reused)."""
        i = len(self.hosts)
        if i + 10 >= self.net.num_addresses - 1:
            raise HostsUnavailable(f"no address left in {self.net} for host {i}")
        host = Host(i, f"{self.prefix}-h{i}", str(self.net.network_address + 10 + i), f"{self.prefix}h{i}")
        try:
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("link", "set", host.link, "master", self.bridge)
            _ip("link", "set", host.link, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{self.net.prefixlen}", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
        except subprocess.CalledProcessError as e:
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.link, check=False)
            raise HostsUnavailable(f"cannot create host {host.netns}: {e.stderr.strip()}") from e
        self.hosts.append(host)
        if self.rate_mbit:
            self.limit(host, self.rate_mbit)
        return host

    def limit(self, host: Host, rate_mbit: float) -> None:
        """Limit the host's link to ``rate_mbit`` in each direction (token bucket: ``tbf``)."""
        burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 100))  # ~10 ms at the rate, at least 32 KiB
        args = ["qdisc", "replace", "dev"]
        tbf = ["root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"]
        subprocess.run(["tc", *args, host.link, *tbf], capture_output=True, text=True, timeout=10, check=True)
        subprocess.run(
            ["ip", "netns", "exec", host.netns, "tc", *args, "eth0", *tbf],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )

    def cut(self, host: Host) -> None:
        """The host vanishes from the network: its link goes down, packets to it are dropped, no TCP reset
        is sent (what a reclaimed VM or a pulled cable looks like to the others)."""
        _ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.link, "up")

    def partition(self, side_a: list[Host], side_b: list[Host]) -> None:
        """Split the network: no packet passes between a host of ``side_a`` and one of ``side_b``, while each
        side's hosts still reach each other (a blackhole route to every host of the other side: connections
        fail, established ones stall, nothing is delivered). ``heal()`` joins the sides again."""
        for side, others in ((side_a, side_b), (side_b, side_a)):
            for host in side:
                for other in others:
                    _ip("-n", host.netns, "route", "add", "blackhole", f"{other.address}/32")
                    self._blackholes.append((host, other.address))

    def heal(self) -> None:
        """Undo every ``partition``."""
        for host, address in self._blackholes:
            _ip("-n", host.netns, "route", "del", "blackhole", f"{address}/32", check=False)
        self._blackholes = []

    def pids(self, host: Host) -> list[int]:
        out = _ip("netns", "pids", host.netns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def close(self) -> None:
        """Kill whatever still runs on the hosts, remove their namespaces and links, and the bridge."""
        for host in self.hosts:
            for pid in self.pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.link, check=False)  # gone with the namespace's end; this is for safety
        self.hosts = []
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _free_subnet(prefix: str) -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no interface of this machine uses, picked from the prefix (stable per run)."""
    used = _ip("-4", "-o", "addr", "show", check=False).stdout
    taken = [ipaddress.ip_interface(w).network for line in used.splitlines() for w in line.split() if "/" in w]
    seed = int(hashlib.sha256(prefix.encode()).hexdigest(), 16)
    for k in range(256 * 200):
        n = (seed + k) % (200 * 256)
        net = ipaddress.ip_network(f"10.{50 + n // 256}.{n % 256}.0/24")
        if not any(net.overlaps(t) for t in taken if isinstance(t, ipaddress.IPv4Network)):
            return net
    raise HostsUnavailable("no free /24 in 10.50.0.0-10.249.255.0")
