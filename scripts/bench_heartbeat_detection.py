"""Heartbeat-expiry detection latency on the hivemind DHT with the configured period and TTL.

A child process heartbeats a member record; this process (another DHT node) polls the members every
``--poll-s``; the child is SIGKILLed (or SIGSTOPped with --hang) and the time until its record is gone
is measured, ``--repeats`` times. Prints and saves the latencies.

    python scripts/bench_heartbeat_detection.py [membership.period_s=0.5 membership.ttl_s=2] [--hang]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import time

from checkfree.config import load_config
from checkfree.core.metrics import report
from checkfree.swarm.admission import Admission, Identity, new_token
from checkfree.swarm.membership import Membership
from checkfree.swarm.records import MemberRecord


def _beat(cfg, maddrs, token, name, seed, ready):
    identity = Identity(name, bytes.fromhex(seed))
    m = Membership(cfg, "bench-detect", "fp", maddrs, admission=Admission(token, identity))
    peer_id = identity.peer_id
    ready.set()
    while True:
        m.heartbeat(
            MemberRecord(
                run_id="bench-detect", fingerprint="fp", peer_id=peer_id, stage=0, epoch=0, state="running", step=0
            )
        )
        time.sleep(cfg.period_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--poll-s", type=float, default=0.1)
    ap.add_argument("--hang", action="store_true", help="SIGSTOP instead of SIGKILL")
    ap.add_argument("--out", default="runs/bench/heartbeat_detection.json")
    ns = ap.parse_args()
    cfg = load_config([], ns.overrides).membership
    token = new_token()
    observer = Membership(cfg, "bench-detect", "fp", admission=Admission(token, Identity("observer")))
    ctx = mp.get_context("spawn")
    latencies = []
    for n in range(ns.repeats):
        ready = ctx.Event()
        identity = Identity(f"p{n}")  # made here, so that its id is known here
        peer_id = identity.peer_id
        child = ctx.Process(  # not daemonic: it forks the DHT
            target=_beat, args=(cfg, observer.visible_maddrs(), token, f"p{n}", identity.seed_hex(), ready)
        )
        child.start()
        if not ready.wait(120):
            raise SystemExit("the heartbeating child did not start its DHT within 120 s")
        deadline = time.time() + 30
        while peer_id not in observer.members():
            if time.time() > deadline:
                raise SystemExit("the child's record never became visible")
            time.sleep(ns.poll_s)
        time.sleep(cfg.period_s * 1.5)  # let it run a few periods
        os.kill(child.pid, signal.SIGSTOP if ns.hang else signal.SIGKILL)
        t0 = time.time()
        while peer_id in observer.members():
            if time.time() - t0 > 10 * cfg.ttl_s + 30:
                raise SystemExit(f"the record of a stopped peer never expired (ttl_s={cfg.ttl_s})")
            time.sleep(ns.poll_s)
        latencies.append(time.time() - t0)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    observer.shutdown()
    result = {
        "period_s": cfg.period_s,
        "ttl_s": cfg.ttl_s,
        "poll_s": ns.poll_s,
        "signal": "SIGSTOP" if ns.hang else "SIGKILL",
        "latencies_s": latencies,
        "median_s": statistics.median(latencies),
        "max_s": max(latencies),
    }
    report(result, ns.out)


if __name__ == "__main__":
    main()
