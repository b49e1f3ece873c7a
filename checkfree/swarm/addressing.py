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

- ``membership.interface``: an interface (eth0, ens5, wg0, tailscale0) whose IPv4 address replaces
  ``host`` (and ``announce_host``, unless ``nat``): the VPC's private address or a VPN's.
- ``membership.nat``: ``announce_host`` is an address behind NAT (a cloud VM's public address, on no
  interface of the VM): the DHT and probes announce it, while every socket binds this host's own address
  and gloo announces that one (``host``, or the first address of an interface that is up when ``host`` is
  the wildcard). The peers must still reach each other's own addresses for the data plane.

gloo binds and announces one address (its device is created for the announced address, or for ``host``
when that is a concrete one): the data plane needs hosts that can reach each other's addresses directly
(a flat network, a VPN or overlay); it does not cross NAT. An address gloo would bind that is on no
interface of this host fails deep inside gloo ("Cannot resolve ... to a (local) address"), so
``on_this_host`` refuses it at start, saying what to set. gloo takes its data-plane ports from the kernel's
ephemeral range (``net.ipv4.ip_local_port_range``); torch does not let them be chosen: pin that range on
the hosts and open it (the SkyPilot task does).
"""

from __future__ import annotations

import dataclasses
import socket

from checkfree.swarm.config import WILDCARD, MembershipConfig


class AddressError(ValueError):
    """An address this peer would bind or announce that is not on any interface of this host."""


def local_addresses() -> dict[str, list[str]]:
    """interface -> its IPv4 addresses, for the interfaces that are up (loopback included)."""
    import psutil

    stats = psutil.net_if_stats()
    out: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        v4 = [a.address for a in addrs if a.family == socket.AF_INET]
        if v4:
            out[name] = v4
    return out


def _listing(addresses: dict[str, list[str]]) -> str:
    return ", ".join(f"{name} {' '.join(a)}" for name, a in sorted(addresses.items())) or "none"


def on_this_host(m: MembershipConfig, addresses: dict[str, list[str]] | None = None) -> MembershipConfig:
    """``m`` made concrete for this host (``interface`` resolved; under ``nat`` a wildcard ``host`` becomes
    this host's first address), after checking that every address this peer binds, and every address it
    announces (but the NAT's), is on one of its interfaces (``addresses``: default ``local_addresses()``).

    Raises:
        AddressError: an interface that does not exist, or an address on no interface; the message lists
            this host's interfaces and says what to set.
    """
    addresses = local_addresses() if addresses is None else addresses
    mine = {a for v in addresses.values() for a in v}
    if m.interface is not None:
        if not addresses.get(m.interface):
            raise AddressError(
                f"membership.interface={m.interface!r} is not an interface of this host with an IPv4 address that "
                f"is up (this host has: {_listing(addresses)})"
            )
        m = dataclasses.replace(m, host=addresses[m.interface][0], announce_host=m.announce_host if m.nat else None)
    elif m.nat and m.host in WILDCARD:
        own = [a for name, v in sorted(addresses.items()) for a in v if not a.startswith("127.")]
        if not own:
            raise AddressError(f"membership.nat=true but this host has no address but loopback ({_listing(addresses)})")
        m = dataclasses.replace(m, host=own[0])
    fix = (
        "inside one VPC or VPN announce the private or VPN address (membership.announce_host=ADDRESS, or "
        "membership.interface=NAME); behind NAT set membership.nat=true (the data plane then uses this host's "
        "own address, which the other peers must reach)"
    )
    if m.host not in WILDCARD and m.host not in mine:
        raise AddressError(
            f"membership.host={m.host} is on no interface of this host (it has: {_listing(addresses)}): every "
            f"socket binds it; {fix}"
        )
    gloo = data_host(m.host, m.announce_host)
    if gloo not in mine or (m.announce_host and not m.nat and m.announce_host not in mine):
        raise AddressError(
            f"membership.announce_host={m.announce_host} is on no interface of this host (it has: "
            f"{_listing(addresses)}): gloo binds the address it announces, and an address behind NAT needs "
            f"membership.nat=true (as on a cloud VM, whose public address the VM itself does not hold); {fix}"
        )
    return m


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
