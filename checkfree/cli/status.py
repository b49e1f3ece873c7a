"""
``checkfree status``
====================

Join a swarm's DHT read-only and print what it is doing: once, as a table or (``--json``) as one
machine-readable snapshot, or again every few seconds (``--watch``) until Ctrl-C.

Where the swarm is comes from its run directory (``checkfree status RUN_DIR``): the run id from
``config.yaml`` (``swarm.run_id``, else ``run_name``), the join token from ``join_token``, the swarm's id
from ``swarm_id``, and the addresses
to join through from ``maddrs.txt``, the files ``checkfree swarm`` and a swarm's first ``checkfree peer``
write. ``--run-id``, ``--join-token`` (or ``$CHECKFREE_JOIN_TOKEN``), ``--swarm-id`` (or
``$CHECKFREE_SWARM_ID``) and ``--initial-peers`` override
them, and without a run directory they say it all. ``resolve_target`` (the files) and ``snapshot`` (the
records) are pure functions; the rest joins the DHT and prints.

Each peer's row ends with the counters of its record that tell an attack from a fault (the non-zero
``checkfree.swarm.probe.ATTACK_COUNTERS``), and a line totals them over every peer in the DHT.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from checkfree.core.exit_codes import ExitCode
from checkfree.swarm.probe import ATTACK_COUNTERS

STATUS_HELP = """\
Join the DHT read-only and print the live swarm: the current epoch, which peer holds which stage,
each peer's step, state, loss and heartbeat age, the spares, what peers wait for, and the addresses
other peers join through.

  checkfree status runs/tiny                    # the run directory of checkfree swarm (or of a first peer)
  checkfree status runs/tiny --watch 2          # refresh every 2 s until Ctrl-C
  checkfree status runs/tiny --json             # one snapshot as JSON
  checkfree status --run-id tiny --initial-peers /ip4/10.0.0.5/tcp/40123/p2p/12D3KooW...  # no run directory
"""


def attack_counts(counters: Mapping[str, int] | None) -> dict[str, int]:
    """The non-zero ``ATTACK_COUNTERS`` of one peer's counters, in that order."""
    counters = counters or {}
    return {k: counters[k] for k in ATTACK_COUNTERS if counters.get(k)}


def attack_totals(counters: Iterable[Mapping[str, int] | None]) -> dict[str, int]:
    """``attack_counts`` summed over several peers' counters."""
    total: Counter[str] = Counter()
    for c in counters:
        total.update(attack_counts(c))
    return attack_counts(total)


def attack_text(counts: Mapping[str, int]) -> str:
    """``shed=3 gate_refused=1``: compact, and the names are the keys of summary.json's counters."""
    return " ".join(f"{k}={v}" for k, v in counts.items())


DEFAULT_RUN_ID = "tiny"  # run_name's default, for a swarm named by --initial-peers alone
DEFAULT_WATCH_S = 2.0


class StatusInputError(ValueError):
    """A run directory, file or flag ``checkfree status`` cannot use (the message says what it expected)."""


@dataclass(frozen=True)
class Target:
    """Which swarm to look at: its run id, join token and the addresses to join through."""

    run_id: str
    token: str
    initial_peers: list[str]
    swarm_id: str | None = None


def resolve_target(
    run_dir: str | Path | None,
    initial_peers: list[str] | None = None,
    run_id: str | None = None,
    join_token: str | None = None,
    swarm_id: str | None = None,
) -> Target:
    """The swarm to look at, from ``run_dir``'s files and the flags (a flag wins over a file; the token
    from ``join_token``, else ``$CHECKFREE_JOIN_TOKEN``, else ``RUN_DIR/join_token``; the swarm id likewise
    from ``swarm_id``, ``$CHECKFREE_SWARM_ID``, ``RUN_DIR/swarm_id``).

    Raises:
        StatusInputError: the run directory or one of its files is missing, unreadable or malformed,
            or, without a run directory, no address or token was given.
    """
    from checkfree.swarm.admission import SWARM_ENV, SWARM_FILE, TOKEN_ENV, TOKEN_FILE, find_swarm_id, find_token

    folder = Path(run_dir) if run_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise StatusInputError(f"run directory {str(folder)!r} does not exist (or is not a directory)")
    if run_id is None:
        run_id = _run_id_of(folder) if folder is not None else DEFAULT_RUN_ID
    if not initial_peers:
        if folder is None:
            raise StatusInputError("say which swarm: pass its RUN_DIR, or --initial-peers MULTIADDR ...")
        initial_peers = _read(folder / "maddrs.txt", "the addresses to join through").split()
        if not initial_peers:
            raise StatusInputError(f"{folder / 'maddrs.txt'} is empty: expected the swarm's multiaddresses")
    try:
        token = find_token(join_token, folder)
    except OSError as e:
        raise StatusInputError(f"cannot read the join token in {folder / TOKEN_FILE}: {e.strerror}") from e
    if token is None:
        where = (
            f", or keep it in {folder / TOKEN_FILE}" if folder is not None else " (or pass the RUN_DIR that holds it)"
        )
        raise StatusInputError(
            f"the swarm's records are sealed with its join token: pass --join-token or ${TOKEN_ENV}{where}"
        )
    found = find_swarm_id(swarm_id, folder)
    if found is None:
        where = f", or keep it in {folder / SWARM_FILE}" if folder is not None else ""
        raise StatusInputError(f"the swarm's records are sealed with its id: pass --swarm-id or ${SWARM_ENV}{where}")
    return Target(run_id, token, list(initial_peers), found)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise StatusInputError(
            f"{path} not found: it holds {what} (checkfree swarm and a swarm's first peer write it); "
            "is this a swarm's run directory?"
        ) from None
    except OSError as e:
        raise StatusInputError(f"cannot read {path} ({what}): {e.strerror}") from e


def _run_id_of(folder: Path) -> str:
    """``swarm.run_id``, else ``run_name``, of ``RUN_DIR/config.yaml``."""
    import yaml

    path = folder / "config.yaml"
    text = _read(path, "the swarm's run id (or pass --run-id)")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StatusInputError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(cfg, dict):
        raise StatusInputError(f"{path} holds no config (a YAML mapping expected); pass --run-id")
    swarm = cfg.get("swarm") if isinstance(cfg.get("swarm"), dict) else {}
    return str(swarm.get("run_id") or cfg.get("run_name") or DEFAULT_RUN_ID)


LOST_FIELDS = ("step", "epoch", "loss", "heartbeat_age_s", "weights", "weights_valid", "attacks")


def snapshot(run_id: str, members: dict, current, now: float, fingerprints: list[str] | None = None) -> dict:
    """What ``--json`` prints (and the table shows): the epoch and its roster, each stage's holder with
    its state, step, loss, heartbeat age and weights, the spares and other peers, what peers wait for,
    and every peer's first address (to join through). Each peer's ``attacks`` are its non-zero
    ``ATTACK_COUNTERS``; ``attacks`` at the top sums them over every peer in the DHT.

    Args:
        members: peer id -> ``MemberRecord``, as read from the DHT.
        current: the newest ``EpochRecord`` (None: no epoch yet).
        now: the DHT's clock (heartbeat ages are ``now - record.time``).
        fingerprints: the config fingerprints seen, when several peers disagree.
    """
    roster = current.roster if current is not None else []
    stages = []
    for s, pid in enumerate(roster):
        r = members.get(pid)
        row = {"stage": s, "peer": pid, "state": "lost"} | dict.fromkeys(LOST_FIELDS)  # gone from the DHT
        if r is not None:
            row |= {
                "state": r.state,
                "step": r.step,
                "epoch": r.epoch,
                # JSON has no NaN: a diverged loss stays visible as a string
                "loss": r.loss if r.loss is None or math.isfinite(r.loss) else str(r.loss),
                "heartbeat_age_s": round(now - r.time, 3),
                "weights": r.lineage.describe(r.step),
                "weights_valid": r.valid_for(current.step) or r.step > current.step,
                "attacks": attack_counts(r.counters),
            }
        stages.append(row)

    def other(r) -> dict:
        return {
            "peer": r.peer_id,
            "state": r.state,
            "stage": r.stage,
            "step": r.step,
            "epoch": r.epoch,
            "heartbeat_age_s": round(now - r.time, 3),
            "attacks": attack_counts(r.counters),
        }

    outside = [r for pid, r in sorted(members.items()) if pid not in roster]
    steps = [members[p].step for p in roster if p in members]
    return {
        "run_id": run_id,
        "epoch": current.epoch if current is not None else None,
        "leader": current.leader if current is not None else None,
        "step": max(steps, default=current.step) if current is not None else None,
        "resumed_at": current.step if current is not None else None,
        "stopped": current.stop if current is not None else None,
        "finished": bool(current is not None and current.finished),
        "roster": stages,
        "spares": [other(r) for r in outside if r.state == "spare"],
        "others": [other(r) for r in outside if r.state != "spare"],
        "notes": [
            {"peer": r.peer_id, "note": r.note} for r in sorted(members.values(), key=lambda r: r.peer_id) if r.note
        ],
        "addresses": sorted(a for r in members.values() for a in r.maddrs[:1]),
        "fingerprints": fingerprints or [],
        "attacks": attack_totals(r.counters for r in members.values()),
    }


def render(snap: dict) -> str:
    """The snapshot as the text table."""
    lines = []
    if len(snap["fingerprints"]) > 1:
        lines.append(
            f"warning: peers with {len(snap['fingerprints'])} different config fingerprints share run "
            f"{snap['run_id']}: {snap['fingerprints']}; showing the one with a published epoch and the most peers"
        )
    head = f"run {snap['run_id']}: "
    if snap["epoch"] is None:
        head += "no epoch yet"
    else:
        head += f"epoch {snap['epoch']}, leader {snap['leader']}, resumed at step {snap['resumed_at']}"
        head += f", step {snap['step']}" + (", finished" if snap["finished"] else "")
    lines.append(head + (f", STOPPED: {snap['stopped']}" if snap["stopped"] else ""))
    lines.append("stage  peer                    state       step  epoch  heartbeat_age_s  loss    weights")
    for row in snap["roster"]:
        if row["state"] == "lost":
            lines.append(f"{row['stage']:5d}  {row['peer']:22s}  LOST")
            continue
        loss = "-" if row["loss"] is None else row["loss"] if isinstance(row["loss"], str) else f"{row['loss']:.4f}"
        valid = "" if row["weights_valid"] else "NOT VALID: "
        lines.append(
            f"{row['stage']:5d}  {row['peer']:22s}  {row['state']:10s} {row['step']:5d}  {row['epoch']:5d}  "
            f"{row['heartbeat_age_s']:15.1f}  {loss:6s}  {valid}{row['weights']}{_attacks_suffix(row)}"
        )
    for row in snap["spares"] + snap["others"]:
        lines.append(
            f"{'spare' if row['state'] == 'spare' else '  -  '}  {row['peer']:22s}  {row['state']:10s} "
            f"{row['step']:5d}  {row['epoch']:5d}  {row['heartbeat_age_s']:15.1f}{_attacks_suffix(row)}"
        )
    lines.append(f"attacks (all peers): {attack_text(snap['attacks']) or 'none'}")
    lines += [f"{n['peer']} waits: {n['note']}" for n in snap["notes"]]
    if snap["addresses"]:
        lines.append("join with --initial-peers " + " ".join(snap["addresses"]))
    return "\n".join(lines)


def _attacks_suffix(row: dict) -> str:
    return f"  attacks: {attack_text(row['attacks'])}" if row.get("attacks") else ""


def _observe(m, run_id: str) -> dict:
    """One snapshot read from the DHT through ``m`` (an observer's ``Membership``)."""
    members = m.members()
    fingerprints = sorted({r.fingerprint for r in members.values()})
    epochs = {f: m.current_epoch(f) for f in fingerprints}

    def weight(f: str) -> tuple[bool, int]:  # a stray peer of another config never hides the swarm's epoch
        return epochs[f] is not None, sum(r.fingerprint == f for r in members.values())

    common = max(fingerprints, key=weight, default=None)
    current = epochs[common] if common else None
    return snapshot(run_id, members, current, m.now, fingerprints if len(fingerprints) > 1 else None)


def _show(snap: dict, as_json: bool, clear: bool) -> None:
    if as_json:
        print(json.dumps(snap), flush=True)
        return
    print(("\x1b[H\x1b[2J" if clear else "") + render(snap), flush=True)


def cmd_status(ns: argparse.Namespace) -> int:
    from checkfree.swarm.admission import Admission, Identity
    from checkfree.swarm.config import MembershipConfig
    from checkfree.swarm.membership import DHTUnavailable, Membership

    try:
        target = resolve_target(ns.run_dir, ns.initial_peers, ns.run_id, ns.join_token, ns.swarm_id)
        host = ns.host or _address_towards(target.initial_peers[0])
        cfg = MembershipConfig(host=host)
        if ns.watch is not None and ns.watch <= 0:
            raise StatusInputError(f"--watch {ns.watch}: expected a positive number of seconds")
    except ValueError as e:
        print(f"checkfree status: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    try:
        m = Membership(
            cfg,
            target.run_id,
            None,
            target.initial_peers,
            client_mode=True,
            admission=Admission(target.token, Identity("status"), target.swarm_id),
        )
    except Exception as e:  # hivemind's bootstrap errors have no common base class
        print(
            f"checkfree status: cannot join the DHT through {' '.join(target.initial_peers)} from {host}: {e}",
            file=sys.stderr,
        )
        return ExitCode.CRASHED
    try:
        if ns.watch is None:
            _show(_observe(m, target.run_id), ns.json, clear=False)
            return ExitCode.OK
        clear = not ns.json and sys.stdout.isatty()
        while True:
            try:
                _show(_observe(m, target.run_id), ns.json, clear)
            except DHTUnavailable as e:  # transient: look again at the next refresh
                print(f"checkfree status: DHT read failed: {e}", file=sys.stderr)
            time.sleep(ns.watch)
    except KeyboardInterrupt:  # how --watch ends
        return ExitCode.OK
    finally:
        m.shutdown()


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
    status = sub.add_parser(
        "status",
        parents=[common],
        help="print the live swarm",
        description=STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "run_dir",
        nargs="?",
        metavar="RUN_DIR",
        help="the swarm's run directory: run id from config.yaml, token from join_token, addresses from maddrs.txt",
    )
    status.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MULTIADDR",
        help="addresses to join through (default: RUN_DIR/maddrs.txt)",
    )
    status.add_argument(
        "--host",
        help="this host's address to use (default: the one that routes to the first initial peer)",
    )
    status.add_argument(
        "--run-id",
        help=f"the swarm's run id (swarm.run_id, default its run_name; default: RUN_DIR/config.yaml's, else "
        f"{DEFAULT_RUN_ID!r})",
    )
    status.add_argument(
        "--join-token", help="the swarm's secret (default: $CHECKFREE_JOIN_TOKEN, else RUN_DIR/join_token)"
    )
    status.add_argument("--swarm-id", help="the swarm's id (default: $CHECKFREE_SWARM_ID, else RUN_DIR/swarm_id)")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_S,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C",
    )
    status.add_argument("--json", action="store_true", help="print a JSON snapshot (with --watch: one per line)")
    status.set_defaults(func=cmd_status)
