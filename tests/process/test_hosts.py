"""A swarm whose peers each run on an emulated host of their own (``swarm.hosts=netns``: a Linux network
namespace per peer on a bridge, see ``launcher/netns.py``), so that every socket crosses a real (virtual)
network instead of loopback. Skipped, saying why, where namespaces cannot be made (not root, no iproute2)."""

import os
import re
import subprocess
import sys

import pytest

from checkfree.core.failures import Failure
from checkfree.core.metrics import read_jsonl
from launcher.netns import unavailable
from tests.helpers import check_every_step_once, run_swarm

WHY = unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"emulated hosts cannot be made here: {WHY}")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_a_swarm_on_emulated_hosts_survives_a_kill_and_a_vanished_host(tmp_path):
    """One failure kills a stage's process (its host answers with a reset); in the other the stage's host
    vanishes (its link goes down: no reset, the silent probe must tell). Every peer listens on its own
    host's address; nothing is left behind: no process, no namespace."""
    before = _namespaces()
    fails = [Failure(5, 1, "mid_forward", 0.5), Failure(14, 2, "mid_forward", 0.5)]
    code, out, run_dir = run_swarm(
        tmp_path,
        "hosts",
        "num_steps=60",
        "swarm.num_spares=2",
        "swarm.hosts=netns",
        "swarm.vanish_fraction=0.5",
        "failures.seed=1",  # the launcher's draws with this seed: the first failure vanishes, the second kills
        "membership.rpc_timeout_s=0.5",  # DHT requests to the vanished host give up sooner than the TTL
        failures=fails,
    )
    assert code == 0, out
    summary, _ = check_every_step_once(run_dir, 60)
    rows = summary["recovery_rows"]
    assert [(r["stage"], r["signal"]) for r in rows] == [(1, "LINK_DOWN"), (2, "SIGKILL")]
    assert all(r["resume_s"] is not None for r in rows)
    events = read_jsonl(run_dir / "events.jsonl")
    # no reset from the vanished host: the survivors saw its probe fall silent
    assert any("probe silent" in e["cause"] for e in events if e["event"] == "step_aborted")
    # every peer on an address of its own, none on loopback
    started = [e for e in events if e["event"] == "peer_started"]
    addresses = [re.match(r"/ip4/([\d.]+)/", e["maddrs"][0]).group(1) for e in started]
    assert len(set(addresses)) == len(started) >= 6 and not any(a.startswith("127.") for a in addresses)
    assert _namespaces() == before


def test_peers_started_one_by_one_on_separate_hosts_need_no_launcher(tmp_path):
    """No ``checkfree swarm``: an operator starts each peer on a host of its own with ``checkfree peer``. The
    first starts a new swarm alone; the others bootstrap from any live peer (the spare from stage 1's, not the
    first's); ``checkfree status`` works from yet another host; the first peer, the swarm's bootstrap node,
    is killed and the swarm goes on without it to the end."""
    from launcher.netns import Hosts
    from launcher.report import merge_run
    from tests.helpers import SWARM, poll

    # enough steps (tiny ones take ~0.1 s) that the swarm still trains when status looks and s0 is killed
    cfg_args = [*SWARM, "membership.rpc_timeout_s=0.5", "swarm.run_id=hostless", "num_steps=300"]
    run_dir = tmp_path / "hostless"
    procs: dict[str, subprocess.Popen] = {}

    def start(hosts, peer_id, role, initial):
        host = hosts.add()
        cmd = [*host.exec_prefix(), sys.executable, "-m", "checkfree", "peer", *cfg_args]
        cmd += [f"membership.host={host.address}", "--run-dir", str(run_dir), "--peer-id", peer_id, *role]
        cmd += ["--initial-peers", *initial] if initial else []
        log = open(tmp_path / f"{peer_id}.log", "w")
        procs[peer_id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def folder(name):  # a peer's id is NAME.HASH (the hash of its key)
        return next(iter((run_dir / "peers").glob(f"{name}.*")), run_dir / "peers" / name)

    def maddr(peer_id):
        path = folder(peer_id) / "events.jsonl"
        started = [e for e in read_jsonl(path) if e["event"] == "peer_started"] if path.exists() else []
        return started[0]["maddrs"][0] if started else None

    def committed(peer_id):
        path = folder(peer_id) / "metrics.jsonl"
        return max((m["step"] for m in read_jsonl(path) if "loss/train" in m), default=-1) if path.exists() else -1

    with Hosts("cftl") as hosts:
        try:
            start(hosts, "s0", ["--stage", "0"], [])
            assert poll(lambda: maddr("s0") is not None, timeout_s=60), "the first peer never started"
            for s in (1, 2, 3):
                start(hosts, f"s{s}", ["--stage", str(s)], [maddr("s0")])
            assert poll(lambda: maddr("s1") is not None, timeout_s=60)
            start(hosts, "spare", ["--spare"], [maddr("s1")])
            assert poll(lambda: maddr("spare") is not None, timeout_s=60), "the spare never started"
            assert poll(lambda: committed("s3") >= 5, timeout_s=120), "the swarm never trained"
            observer = hosts.add()
            status = subprocess.run(
                [*observer.exec_prefix(), sys.executable, "-m", "checkfree", "status", "--run-id", "hostless"]
                + ["--initial-peers", maddr("s2")],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "CHECKFREE_JOIN_TOKEN": (run_dir / "join_token").read_text().strip()},
            )
            assert status.returncode == 0, status.stdout + status.stderr
            assert "run hostless: epoch" in status.stdout and "s0" in status.stdout and "spare" in status.stdout
            assert "join with --initial-peers /ip4/" in status.stdout
            procs["s0"].kill()  # the bootstrap node of the swarm
            for peer_id in ("s1", "s2", "s3", "spare"):
                procs[peer_id].wait(timeout=180)
            assert {p: procs[p].returncode for p in ("s1", "s2", "s3", "spare")} == dict.fromkeys(
                ("s1", "s2", "s3", "spare"), 0
            ), "\n".join((tmp_path / f"{p}.log").read_text()[-2000:] for p in procs)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=10)
    from checkfree.config import load_config

    summary = merge_run(run_dir, load_config([], cfg_args))
    assert summary["steps"] == 300 and summary["repeated_steps"] == [] and summary["skipped_steps"] == []
    rebuilt = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "rebuilt"]
    assert [(e["peer"], e["stage"]) for e in rebuilt] == [("spare", 0)]
