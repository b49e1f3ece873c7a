"""Addressing across hosts: bind addresses, announced addresses and port ranges (checkfree/swarm/addressing.py)."""

import socket

import pytest

from checkfree.swarm.addressing import AddressError, data_host, dial_host, free_port, listen, on_this_host
from checkfree.swarm.config import MembershipConfig, SwarmConfig, check_hosts, parse_port_range


def test_port_ranges_are_parsed_and_bad_ones_named():
    assert parse_port_range(None) is None and parse_port_range("") is None
    assert parse_port_range("29400-29499") == (29400, 29499)
    for bad in ("29400", "a-b", "29499-29400", "80-90", "60000-70000"):
        with pytest.raises(ValueError, match=f"membership.port_range='{bad}'"):
            parse_port_range(bad)


def test_wildcard_host_needs_an_announced_address_and_hosts_must_be_ipv4():
    check_hosts("127.0.0.1", None)
    check_hosts("0.0.0.0", "10.1.2.3")
    with pytest.raises(ValueError, match="membership.host='0.0.0.0'.*announce_host"):
        check_hosts("0.0.0.0", None)
    with pytest.raises(ValueError, match="membership.host='myhost'.*IPv4"):
        check_hosts("myhost", None)
    with pytest.raises(ValueError, match="membership.announce_host='::1'.*IPv4"):
        check_hosts("127.0.0.1", "::1")
    with pytest.raises(ValueError, match="announce_host"):
        MembershipConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="port_range"):
        MembershipConfig(port_range="1-2")


def test_what_others_dial_and_what_gloo_binds():
    assert dial_host("127.0.0.1", None) == "127.0.0.1" and dial_host("0.0.0.0", "10.0.0.5") == "10.0.0.5"
    assert dial_host("10.0.0.5", "203.0.113.7") == "203.0.113.7"  # NAT: the others dial the public address
    assert data_host("0.0.0.0", "10.0.0.5") == "10.0.0.5"  # gloo binds what it announces
    assert data_host("10.0.0.5", "203.0.113.7") == "10.0.0.5"


def test_listening_sockets_take_a_free_port_in_the_range_and_say_when_none_is_left():
    with listen("127.0.0.1", None) as any_port:
        assert any_port.getsockname()[0] == "127.0.0.1"
    base = free_port("127.0.0.1", None)
    low, high = (base, base) if base <= 65000 else (1024, 1024)
    with listen("127.0.0.1", (low, high)) as first:
        assert first.getsockname()[1] == low
        with pytest.raises(OSError, match=f"no free port on 127.0.0.1 in membership.port_range={low}-{high}"):
            listen("127.0.0.1", (low, high))
        with socket.create_connection(("127.0.0.1", low), timeout=2):
            pass  # it really listens


def test_hosts_mode_and_vanishing_are_checked():
    with pytest.raises(ValueError, match="swarm.hosts='docker'"):
        SwarmConfig(hosts="docker")
    with pytest.raises(ValueError, match="vanish_fraction=0.5 needs swarm.hosts=netns"):
        SwarmConfig(vanish_fraction=0.5)
    with pytest.raises(ValueError, match="host_rate_mbit"):
        SwarmConfig(hosts="netns", host_rate_mbit=-1)


# ---- addresses on this host's interfaces (as on a cloud VM, whose public address is on no interface) ----------

VM = {"lo": ["127.0.0.1"], "ens5": ["10.0.0.5"], "wg0": ["100.64.0.9"]}
PUBLIC = "203.0.113.7"  # the VM's public address: the cloud's NAT holds it, no interface does


def test_an_announced_address_on_no_interface_is_refused_saying_what_to_set():
    with pytest.raises(AddressError, match=r"announce_host=203.0.113.7 is on no interface .*ens5 10.0.0.5.*nat=true"):
        on_this_host(MembershipConfig(host="0.0.0.0", announce_host=PUBLIC), VM)
    with pytest.raises(AddressError, match=r"announce_host=203.0.113.7 is on no interface"):
        on_this_host(MembershipConfig(host="10.0.0.5", announce_host=PUBLIC), VM)
    with pytest.raises(AddressError, match=r"membership.host=10.0.0.6 is on no interface"):
        on_this_host(MembershipConfig(host="10.0.0.6"), VM)
    m = MembershipConfig(host="0.0.0.0", announce_host="10.0.0.5")
    assert on_this_host(m, VM) == m  # the private address, inside one VPC


def test_an_interface_names_the_address_to_bind_and_announce():
    m = on_this_host(MembershipConfig(interface="wg0"), VM)
    assert (m.host, m.announce_host) == ("100.64.0.9", None)
    with pytest.raises(AddressError, match=r"interface='tun9' is not an interface .*wg0 100.64.0.9"):
        on_this_host(MembershipConfig(interface="tun9"), VM)


def test_behind_nat_the_public_address_is_announced_and_gloo_keeps_the_hosts_own():
    m = on_this_host(MembershipConfig(host="0.0.0.0", announce_host=PUBLIC, nat=True), VM)
    assert (m.host, m.announce_host) == ("10.0.0.5", PUBLIC)
    assert data_host(m.host, m.announce_host) == "10.0.0.5" and dial_host(m.host, m.announce_host) == PUBLIC
    with pytest.raises(ValueError, match=r"nat=true needs membership.announce_host"):
        MembershipConfig(host="10.0.0.5", nat=True)


def test_this_hosts_own_addresses_are_read():
    from checkfree.swarm.addressing import local_addresses

    assert "127.0.0.1" in {a for v in local_addresses().values() for a in v}
