"""The multi-host scenario: a 4-stage swarm with 2 spares, every peer on an emulated host of its own (a Linux
network namespace: needs root), started one by one with ``checkfree peer`` as an operator would, trains to the
end through, in turn:

1. a kill (SIGKILL of a stage's process: its host answers with a reset),
2. a vanished host (its link goes down: no reset, the silent probe must tell),
3. a network partition that leaves one stage's peer and a spare on the minority side (it must wait and say
   so, while the majority rebuilds that stage; after the heal one lineage goes on),
4. a preemption notice (served by a stand-in metadata server on the bridge): the peer hands its exact state
   to a spare and leaves.

After each loss a fresh spare arrives on a new host (a new spot VM). The checks: every step committed once,
the rebuild each event calls for, the minority waited, the notice ended in a hand-over. Prints them and saves
JSON and Markdown. The failure-free swarm on emulated hosts equals the engine (tests/process/test_golden.py).

    python scripts/multihost_scenario.py [--steps 420] [--rate-mbit 0] [--out runs/bench/multihost]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from launcher.hostpeers import PeersOnHosts
from launcher.netns import Hosts, unavailable
from launcher.notices import NoticeServer
from launcher.presets import SWARM_2CORE, TINY

EVENTS = (("kill", 1, 40), ("vanish", 2, 110), ("partition", 3, 180), ("preempt", 0, 270))
PARTITION_HOLD_STEPS = 40  # the majority trains this far past the split before the network heals


def wait_for(what: str, cond, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.2)


def clear_run_dir(out: Path) -> None:
    """Remove this script's own run directory from an earlier scenario (a rerun replaces it).

    Raises:
        SystemExit: ``out/run`` exists but is no run directory this script wrote (it has no ``peers``).
    """
    run_dir = out / "run"
    if run_dir.exists():
        if not (run_dir / "peers").is_dir():
            raise SystemExit(f"{run_dir} exists and is no scenario run directory: choose another --out")
        shutil.rmtree(run_dir)


def run(ns) -> dict:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    result: dict = {"steps": ns.steps, "rate_mbit": ns.rate_mbit, "events": [], "checks": {}}
    with Hosts("cfms", ns.rate_mbit) as hosts, NoticeServer(hosts.gateway) as notices:
        args = [*TINY, *SWARM_2CORE, "membership.rpc_timeout_s=0.5", "swarm.run_id=multihost"]
        args += [f"num_steps={ns.steps}", f"swarm.preemption.url={notices.url}", "swarm.preemption.provider=aws"]
        args += ["swarm.preemption.poll_s=0.25", "seed=7"]
        run_dir = out / "run"
        peers = PeersOnHosts(hosts, out / "logs", run_dir, args)
        spares = 0
        vanished: list[str] = []

        def new_spare() -> str:
            nonlocal spares
            spares += 1
            name = f"spare{spares}"
            # bootstrapped by the peers that train now (any live peer would do)
            holders = [peers.holder(s) for s in range(4)] if peers.holder(0) else ["s0"]
            peers.start(name, ["--spare"], [peers.maddr(n) for n in holders if peers.maddr(n)])
            return name

        try:
            peers.start("s0", ["--stage", "0"], [])
            wait_for("the first peer starts", lambda: peers.maddr("s0") is not None, 90)
            for s in (1, 2, 3):
                peers.start(f"s{s}", ["--stage", str(s)], [peers.maddr("s0")])
            new_spare(), new_spare()
            for kind, stage, at in EVENTS:
                wait_for(f"step {at}", lambda at=at: peers.committed() >= at, 600)
                victim = peers.holder(stage)
                host = peers.host_of[victim]
                event = {
                    "kind": kind,
                    "stage": stage,
                    "victim": victim,
                    "at_step": peers.committed(),
                    "time": time.time(),
                }
                print(f"[{time.strftime('%H:%M:%S')}] {kind} stage {stage} ({victim}) at step {event['at_step']}")
                if kind == "kill":
                    peers.procs[victim].kill()
                elif kind == "vanish":
                    hosts.cut(host)
                    vanished.append(victim)
                elif kind == "preempt":
                    notices.arm(victim)
                elif kind == "partition":
                    lonely = f"spare{spares}"  # the newest spare goes with it
                    minority = [host, peers.host_of[lonely]]
                    majority = [h for n, h in peers.host_of.items() if h not in minority and n not in vanished]
                    hosts.partition(minority, majority)
                    event["minority"] = [victim, lonely]
                    split_at = event["at_step"]
                    wait_for(
                        "the majority trains on",
                        lambda s=stage, v=victim, a=split_at: (
                            peers.committed() >= a + PARTITION_HOLD_STEPS and peers.holder(s) != v
                        ),
                        300,
                    )
                    waits = [e for e in peers.events(victim) if e["event"] == "leader_waiting"]
                    event["minority_waited"] = [e["reason"] for e in waits if "partition" in e["reason"]][:1]
                    hosts.heal()
                    event["healed_at_step"] = peers.committed()
                # the swarm is back: the stage has a new holder that committed steps past the event
                wait_for(
                    f"recovery from the {kind}",
                    lambda s=stage, v=victim, a=event["at_step"]: (
                        peers.holder(s) not in (None, v) and peers.committed(peers.holder(s)) > a
                    ),
                    300,
                )
                event["resumed_s"] = time.time() - event["time"]
                event["new_holder"] = peers.holder(stage)
                result["events"].append(event)
                if len(result["events"]) < len(EVENTS):
                    new_spare()  # a new spot VM arrives
            killed = [e["victim"] for e in result["events"] if e["kind"] == "kill"]
            running = [n for n in peers.procs if n not in vanished and n not in killed]
            wait_for("every peer exits", lambda: all(peers.procs[n].poll() is not None for n in running), 600)
            result["exit_codes"] = {n: peers.procs[n].returncode for n in running}
        finally:
            peers.end()
        summary = peers.merged()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    rebuilt = [(e["stage"], e["method"], e["peer"].rpartition(".")[0]) for e in events if e["event"] == "rebuilt"]
    handed = [e for e in events if e["event"] == "handed_over"]
    replaced = sorted({e["peer"].rpartition(".")[0] for e in events if e["event"] == "replaced"})
    result.update(
        summary={k: summary[k] for k in ("steps", "repeated_steps", "skipped_steps", "final_train_loss")},
        rebuilt=rebuilt,
        handed_over=[(e["peer"].rpartition(".")[0], e["to"].rpartition(".")[0], e["step"]) for e in handed],
        replaced=replaced,
    )
    by_kind = {e["kind"]: e for e in result["events"]}
    methods = {stage: m for stage, m, _ in rebuilt}
    checks = result["checks"]
    checks["every step committed once"] = (
        summary["steps"] == ns.steps and not summary["repeated_steps"] and not summary["skipped_steps"]
    )
    checks["every peer still running exited 0"] = all(c == 0 for c in result.get("exit_codes", {}).values())
    checks["kill and vanished host rebuilt by CheckFree"] = methods.get(1) not in (None, "handoff") and methods.get(
        2
    ) not in (None, "handoff")
    checks["partition: the minority waited, saying so"] = bool(by_kind["partition"].get("minority_waited"))
    checks["partition: one lineage (the cut-off holder left as replaced)"] = by_kind["partition"]["victim"] in replaced
    checks["preemption: the exact state handed over"] = any(
        h[0] == by_kind["preempt"]["victim"] for h in result["handed_over"]
    )
    result["passed"] = all(checks.values())
    return result


def report(result: dict) -> str:
    lines = [
        f"# Multi-host scenario: {'PASS' if result['passed'] else 'FAIL'}",
        "",
        "`python scripts/multihost_scenario.py` "
        f"(steps {result['steps']}, link limit {result['rate_mbit'] or 'none'} Mbit/s): 4 stages and 2 spares, each "
        "peer on an emulated host of its own, a fresh spare after each loss.",
        "",
        "| event | stage | peer | at step | new holder | back in (s) |",
        "|---|---|---|---|---|---|",
    ]
    for e in result["events"]:
        row = [e["kind"], e["stage"], e["victim"], e["at_step"], e["new_holder"], f"{e['resumed_s']:.1f}"]
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    lines += ["", "| check | |", "|---|---|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} |" for name, ok in result["checks"].items()]
    part = next(e for e in result["events"] if e["kind"] == "partition")
    lines += [
        "",
        f"Rebuilt (stage, method, peer): {result['rebuilt']}; handed over: {result['handed_over']}; "
        f"left as replaced: {result['replaced']}.",
        f"The minority side ({part.get('minority')}) said: {part.get('minority_waited', ['(nothing)'])[0][:300]}",
        f"Summary: {result['summary']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=420)
    ap.add_argument("--rate-mbit", type=float, default=0.0, help="bandwidth limit of every host's link (0: none)")
    ap.add_argument("--out", default="runs/bench/multihost")
    ns = ap.parse_args()
    clear_run_dir(Path(ns.out))  # before any host is made: a wrong --out is said at once
    why = unavailable()
    if why is not None:
        raise SystemExit(f"emulated hosts cannot be made here: {why}")
    result = run(ns)
    text = report(result)
    print(text)
    Path(ns.out, "multihost_scenario.json").write_text(json.dumps(result, indent=1, default=str))
    Path(ns.out, "multihost_scenario.md").write_text(text)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
