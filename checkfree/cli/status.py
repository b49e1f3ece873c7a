"""
``checkfree status``
====================

Join a swarm's DHT read-only and print what it is doing.
"""

from __future__ import annotations

import argparse
import sys

from checkfree.core.exit_codes import ExitCode

STATUS_HELP = """\
Join the DHT read-only and print the live swarm: the current epoch, which peer holds which stage,
each peer's step, state and heartbeat age, and the spares.
"""


def cmd_status(ns: argparse.Namespace) -> int:
    from checkfree.swarm.admission import TOKEN_ENV, Admission, Identity, find_token
    from checkfree.swarm.config import MembershipConfig
    from checkfree.swarm.membership import Membership

    host = ns.host or _address_towards(ns.initial_peers[0])
    try:
        cfg = MembershipConfig(host=host)
        token = find_token(ns.join_token)
        if token is None:
            raise ValueError(f"the swarm's records are sealed with its join token: pass --join-token or ${TOKEN_ENV}")
    except ValueError as e:
        print(f"checkfree status: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    try:
        m = Membership(
            cfg, ns.run_id, None, ns.initial_peers, client_mode=True, admission=Admission(token, Identity("status"))
        )
    except Exception as e:  # hivemind's bootstrap errors have no common base class
        print(f"checkfree status: cannot join the DHT through {ns.initial_peers} from {host}: {e}", file=sys.stderr)
        return ExitCode.CRASHED
    try:
        members = m.members()
        fingerprints = sorted({r.fingerprint for r in members.values()})
        epochs = {f: m.current_epoch(f) for f in fingerprints}
        if len(fingerprints) > 1:
            print(
                f"warning: peers with {len(fingerprints)} different config fingerprints share run {ns.run_id}: "
                f"{fingerprints}; showing the one with a published epoch and the most peers"
            )

        def weight(f: str) -> tuple[bool, int]:  # a stray peer of another config never hides the swarm's epoch
            return epochs[f] is not None, sum(r.fingerprint == f for r in members.values())

        common = max(fingerprints, key=weight, default=None)
        current = epochs[common] if common else None
        now = m.now
    finally:
        m.shutdown()
    print(
        f"run {ns.run_id}: "
        + (
            f"epoch {current.epoch}, leader {current.leader}, resumed at step {current.step}"
            if current
            else "no epoch yet"
        )
        + (f", STOPPED: {current.stop}" if current and current.stop else "")
    )
    roster = current.roster if current else []
    print("stage  peer                    state       step  epoch  heartbeat_age_s  loss    weights")
    for s, pid in enumerate(roster):
        r = members.get(pid)
        if r is None:
            print(f"{s:5d}  {pid:22s}  LOST")
            continue
        valid = "" if current is None or r.valid_for(current.step) or r.step > current.step else "  NOT VALID: "
        loss = f"{r.loss:.4f}" if r.loss is not None else "-"
        print(
            f"{s:5d}  {pid:22s}  {r.state:10s} {r.step:5d}  {r.epoch:5d}  {now - r.time:15.1f}  {loss:6s}  "
            f"{valid}{r.lineage.describe(r.step)}"
        )
    others = [r for pid, r in sorted(members.items()) if pid not in roster]
    for r in others:
        print(
            f"{'spare' if r.state == 'spare' else '  -  '}  {r.peer_id:22s}  {r.state:10s} {r.step:5d}  {r.epoch:5d}  "
            f"{now - r.time:15.1f}"
        )
    for r in sorted(members.values(), key=lambda r: r.peer_id):
        if r.note:  # what a peer waits for, e.g. the minority side of a partition
            print(f"{r.peer_id} waits: {r.note}")
    bootstrap = [a for r in members.values() for a in r.maddrs[:1]]
    if bootstrap:
        print("join with --initial-peers " + " ".join(sorted(bootstrap)))
    return ExitCode.OK


def _address_towards(maddr: str) -> str:
    """The local address this host sends from to reach the peer at multiaddress ``maddr`` (a UDP socket's
    connect picks the route; nothing is sent), or 127.0.0.1 when the address is not /ip4/..."""
    import re
    import socket

    m = re.match(r"/ip4/([\d.]+)/", maddr)
    if m is None:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((m.group(1), 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common], help="print the live swarm", description=STATUS_HELP)
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR")
    status.add_argument(
        "--host",
        help="this host's address to use (default: the one that routes to the first initial peer)",
    )
    status.add_argument("--run-id", default="tiny", help="the swarm's run id (swarm.run_id, default its run_name)")
    status.add_argument("--join-token", help="the swarm's secret (default: $CHECKFREE_JOIN_TOKEN)")
    status.set_defaults(func=cmd_status)
