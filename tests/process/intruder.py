"""An intruder: a process that reaches the swarm's DHT (its addresses are public) without the join token, and
tries everything a member could do. Run by tests/process/test_intruder.py:

    python tests/process/intruder.py RUN_ID FINGERPRINT SECONDS REPORT.json MADDR...

It joins the DHT twice: as a plain hivemind node (no validator: raw, unsigned records) and as a checkfree
node sealing with a token of its own. For SECONDS it keeps trying to heartbeat as a member and as a spare,
under its own id and under a live member's id, to publish a roster, a stop and a finish mark, to push an
epoch to the members' probe ports, and to pass the gate of every rendezvous store it learns of. It reads the
swarm's records (reads are open) to learn ids, probe ports and rendezvous addresses. REPORT.json says what it
saw and what every attempt returned.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

import msgpack


def unseal(value):
    """The body of a sealed record as a plain node sees it (sealed records are signed, not encrypted)."""
    try:
        magic, body, *_ = msgpack.unpackb(value, raw=False) if isinstance(value, bytes) else value
        return msgpack.unpackb(body, raw=False) if magic == "cf1" or magic == b"cf1" else None
    except Exception:
        return None


def main() -> None:
    run_id, fingerprint, seconds, report_path, *maddrs = sys.argv[1:]
    import hivemind
    from hivemind.utils import get_dht_time

    from checkfree.swarm.admission import Admission, Identity, new_token
    from checkfree.swarm.config import MembershipConfig
    from checkfree.swarm.gate import GateRefused, handshake
    from checkfree.swarm.membership import Membership
    from checkfree.swarm.probe import EPOCH as PROBE_EPOCH
    from checkfree.swarm.probe import NONCE_BYTES
    from checkfree.swarm.records import EpochRecord, MemberRecord

    cfg = MembershipConfig(period_s=0.25, ttl_s=1.5)
    plain = hivemind.DHT(initial_peers=maddrs, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    own = Admission(new_token(), Identity("intruder"))
    sealed = Membership(cfg, run_id, fingerprint, maddrs, admission=own)
    me = own.peer_id
    report = {"id": me, "seen_members": [], "gate": [], "attempts": 0, "probe_pushes": 0}
    members_key, epoch_key = f"{run_id}/members", f"{run_id}/{fingerprint}/epoch"
    deadline = time.monotonic() + float(seconds)
    epoch_no = 10**6
    tried_gates = set()
    while time.monotonic() < deadline:
        now = get_dht_time()
        entry = plain.get(members_key, latest=True)
        members = {
            k: unseal(v.value) for k, v in (entry.value.items() if entry and isinstance(entry.value, dict) else [])
        }
        live = {k: v for k, v in members.items() if isinstance(v, dict)}
        report["seen_members"] = sorted(set(report["seen_members"]) | set(live))
        victim = next((k for k, v in live.items() if v.get("state") == "running"), None)
        entry = plain.get(epoch_key, latest=True)
        epochs = [unseal(v.value) for v in (entry.value.values() if entry and isinstance(entry.value, dict) else [])]
        epochs = [e for e in epochs if isinstance(e, dict) and "epoch" in e]
        spare = MemberRecord(
            run_id=run_id, fingerprint=fingerprint, peer_id=me, stage=-1, epoch=-1, state="spare", step=0, time=now
        )
        # 1. a member and a spare, plain and sealed with the wrong token, under its own id and a victim's
        plain.store(members_key, spare.model_dump(), now + 5, subkey=me)
        sealed.heartbeat(spare)
        report["attempts"] += 1
        if victim is not None:
            forged = spare.model_copy(update={"peer_id": victim, "state": "running", "stage": 0, "step": 10**6})
            plain.store(members_key, forged.model_dump(), now + 5, subkey=victim)
            sealed._store(members_key, victim, forged.model_dump(), 5)
        # 2. a roster of its own, a stop, and a finish mark
        epoch_no += 1
        roster = EpochRecord(
            run_id=run_id,
            fingerprint=fingerprint,
            epoch=epoch_no,
            roster=[me] * 4,
            store_host="127.0.0.1",
            store_port=1,
            step=0,
            leader=me,
        )
        stop = roster.model_copy(update={"epoch": epoch_no + 1, "roster": [], "stop": "stopped by the intruder"})
        for rec in (roster, stop):
            plain.store(epoch_key, rec.model_dump(), now + 60, subkey=f"{rec.epoch:08d}")
            sealed.publish_epoch(rec)
        plain.store(epoch_key, 0, now + 60, subkey="finished")
        # 3. pushed epochs on the members' probe ports, unsealed and sealed with the wrong token
        for rec in live.values():
            port = rec.get("probe_port")
            for blob in (stop.model_dump_json().encode(), own.seal(b"epoch", stop.model_dump_json().encode())):
                try:
                    with socket.create_connection((rec.get("host", "127.0.0.1"), port), timeout=0.5) as c:
                        c.sendall(PROBE_EPOCH + b"n" * NONCE_BYTES + struct.pack("!I", len(blob)) + blob)
                        c.settimeout(0.5)
                        c.recv(1)
                    report["probe_pushes"] += 1
                except OSError:
                    pass
        # 4. every rendezvous gate it learns of
        for e in epochs:
            address = (e.get("store_host"), e.get("store_port"))
            if not address[1] or address in tried_gates:
                continue
            tried_gates.add(address)
            try:
                handshake(*address, own, timeout_s=2.0)
                outcome = "admitted"
            except GateRefused as err:
                outcome = f"refused: {err}"
            except OSError as err:
                outcome = f"unreachable: {err}"
            report["gate"].append({"epoch": e.get("epoch"), "outcome": outcome})
        time.sleep(0.2)
    sealed.shutdown()
    plain.shutdown()
    with open(report_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
