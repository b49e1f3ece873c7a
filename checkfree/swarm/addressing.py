"""
Addressing
==========

Where a peer listens and what it tells others to dial, for every socket it opens: its DHT node (hivemind's
p2p daemon), its probe port, the rendezvous store it hosts as a leader, and its gloo device.

- ``membership.host``: the address every socket binds (``0.0.0.0``: every interface of the host).
- ``membership.announce_host``: the address the others dial, when it is not ``host`` (required with
  ``0.0.0.0``, which nobody can dial). The DHT announces it with its explicit port (hivemind refuses
  announce addresses without one).
- ``membership.port_range`` (``"LOW-HIGH"``): the DHT, probe and rendezvous ports are taken from it, so a
  firewall needs to open only that range (plus gloo's, see below).

gloo binds and announces one address (its device is created for the announced address, or for ``host``
when that is a concrete one): the data plane needs hosts that can reach each other's addresses directly
(a flat network, a VPN or overlay); it does not cross NAT. gloo takes its data-plane ports from the
kernel's ephemeral range (``net.ipv4.ip_local_port_range``); torch does not let them be chosen.
"""

from __future__ import annotations

import socket

from checkfree.swarm.config import WILDCARD


def dial_host(host: str, announce_host: str | None) -> str:
    """The address other peers dial to reach this one."""
    return announce_host or host


def data_host(host: str, announce_host: str | None) -> str:
    """The address gloo's device binds and announces (it cannot do one without the other)."""
    return announce_host if host in WILDCARD and announce_host else host


def listen(host: str, port_range: tuple[int, int] | None, backlog: int = 128) -> socket.socket:
    """A listening TCP socket bound to ``host``, at a free port of ``port_range`` (any port when None).
    Raises OSError naming the range when every port in it is taken."""
    if port_range is None:
        return socket.create_server((host, 0), backlog=backlog)
    low, high = port_range
    for port in range(low, high + 1):
        try:
            return socket.create_server((host, port), backlog=backlog)
        except OSError:
            continue
    raise OSError(f"no free port on {host} in membership.port_range={low}-{high}")


def free_port(host: str, port_range: tuple[int, int] | None) -> int:
    """A port that is free on ``host`` now, for a server that binds it itself (hivemind's p2p daemon): the
    small window until it does is acceptable (a clash makes the DHT fail to start, with an error)."""
    with listen(host, port_range) as s:
        return s.getsockname()[1]
