"""A swarm whose peers each run on an emulated host of their own (``swarm.hosts=netns``: a Linux network
namespace per peer on a bridge, see ``launcher/netns.py``), so that every socket crosses a real (virtual)
network instead of loopback. Skipped, saying why, where namespaces cannot be made (not root, no iproute2)."""

import re
import subprocess

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


@pytest.mark.long  # ~30 s; scripts/multihost_scenario.py (long too) and the partition test cover these paths
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


def HostPeers(hosts, tmp_path, run_id: str, *cfg: str):
    from launcher.hostpeers import PeersOnHosts
    from tests.helpers import SWARM

    args = [*SWARM, "membership.rpc_timeout_s=0.5", f"swarm.run_id={run_id}", *cfg]
    return PeersOnHosts(hosts, tmp_path, tmp_path / run_id, args)


@pytest.mark.long  # ~70 s; the partition test below also starts peers one by one and runs status elsewhere
def test_peers_started_one_by_one_on_separate_hosts_need_no_launcher(tmp_path):
    """No ``checkfree swarm``: an operator starts each peer on a host of its own with ``checkfree peer``. The
    first starts a new swarm alone (and writes the join token into its run dir, which the others read); the
    others bootstrap from any live peer (the spare from stage 1's, not the first's); ``checkfree status`` works
    from yet another host; the first peer, the swarm's bootstrap node, is killed and the swarm goes on without
    it to the end."""
    from launcher.netns import Hosts
    from tests.helpers import poll

    # enough steps (tiny ones take ~0.1 s) that the swarm still trains when status looks and s0 is killed
    with Hosts("cftl") as hosts:
        peers = HostPeers(hosts, tmp_path, "hostless", "num_steps=300")
        try:
            peers.start("s0", ["--stage", "0"], [])
            assert poll(lambda: peers.maddr("s0") is not None, timeout_s=60), "the first peer never started"
            for s in (1, 2, 3):
                peers.start(f"s{s}", ["--stage", str(s)], [peers.maddr("s0")])
            assert poll(lambda: peers.maddr("s1") is not None, timeout_s=60)
            peers.start("spare", ["--spare"], [peers.maddr("s1")])
            assert poll(lambda: peers.maddr("spare") is not None, timeout_s=60), "the spare never started"
            assert poll(lambda: peers.committed("s3") >= 5, timeout_s=120), "the swarm never trained"
            status = peers.status(hosts.add(), via="s2", run_id="hostless")
            assert status.returncode == 0, status.stdout + status.stderr
            assert "run hostless: epoch" in status.stdout and "s0" in status.stdout and "spare" in status.stdout
            assert "join with --initial-peers /ip4/" in status.stdout
            peers.procs["s0"].kill()  # the bootstrap node of the swarm
            for name in ("s1", "s2", "s3", "spare"):
                peers.procs[name].wait(timeout=180)
            codes = {p: peers.procs[p].returncode for p in ("s1", "s2", "s3", "spare")}
            assert codes == dict.fromkeys(codes, 0), peers.logs()
        finally:
            peers.end()
    summary = peers.merged()
    assert summary["steps"] == 300 and summary["repeated_steps"] == [] and summary["skipped_steps"] == []
    rebuilt = [e for e in read_jsonl(peers.run_dir / "events.jsonl") if e["event"] == "rebuilt"]
    assert [(e["peer"].rpartition(".")[0], e["stage"]) for e in rebuilt] == [("spare", 0)]


@pytest.mark.long  # ~50 s: the default run stays well under 15 minutes on 2 cores
def test_a_partition_leaves_the_minority_waiting_and_one_lineage_goes_on(tmp_path):
    """The network splits between {stages 0, 1, 2, a spare} and {stage 3, a spare, an observer}. The majority
    side rebuilds stage 3 on its spare and trains on; the minority side waits and says so (``checkfree status``
    on its side shows why) instead of rebuilding stages 0-2 on its spare. When the network heals, stage 3's old
    peer sees that it was replaced and leaves: one lineage, every step committed once."""
    from launcher.netns import Hosts
    from tests.helpers import poll

    with Hosts("cfsp") as hosts:
        peers = HostPeers(hosts, tmp_path, "split", "num_steps=400")
        try:
            peers.start("s0", ["--stage", "0"], [])
            assert poll(lambda: peers.maddr("s0") is not None, timeout_s=60), "the first peer never started"
            for s in (1, 2, 3):
                peers.start(f"s{s}", ["--stage", str(s)], [peers.maddr("s0")])
            peers.start("spareA", ["--spare"], [peers.maddr("s0")])
            peers.start("spareB", ["--spare"], [peers.maddr("s0")])
            observer = hosts.add()
            assert poll(lambda: peers.committed("s3") >= 20, timeout_s=120), "the swarm never trained"
            assert poll(lambda: peers.maddr("spareB") is not None, timeout_s=60)
            side_a = [peers.host_of[n] for n in ("s0", "s1", "s2", "spareA")]
            side_b = [peers.host_of[n] for n in ("s3", "spareB")] + [observer]
            hosts.partition(side_a, side_b)
            cut_at = peers.committed("s0")
            # the majority rebuilds stage 3 on its own spare and trains on
            assert poll(lambda: peers.committed("spareA") >= cut_at + 20, timeout_s=120), peers.logs()
            # the minority waits, says why, and its status shows it
            waiting = lambda: [e for e in peers.events("s3") if e["event"] == "leader_waiting"]
            assert poll(lambda: any("partition" in e["reason"] for e in waiting()), timeout_s=60), peers.logs()
            status = peers.status(observer, via="s3", run_id="split")
            assert status.returncode == 0 and "possible network partition" in status.stdout, status.stdout
            hosts.heal()
            for name in ("s0", "s1", "s2", "spareA", "s3", "spareB"):
                peers.procs[name].wait(timeout=240)
            codes = {p: peers.procs[p].returncode for p in peers.procs}
            assert codes == dict.fromkeys(codes, 0), peers.logs()
        finally:
            peers.end()
    summary = peers.merged()
    assert summary["steps"] == 400 and summary["repeated_steps"] == [] and summary["skipped_steps"] == []
    events = read_jsonl(peers.run_dir / "events.jsonl")
    by = lambda e: e["peer"].rpartition(".")[0]
    # no epoch was ever published on the minority side after the split, and its spare never trained
    published = [e for e in events if e["event"] == "epoch_published" and e["step"] > cut_at]
    assert published and not any(by(e) in ("s3", "spareB") for e in published)
    assert [(by(e), e["stage"]) for e in events if e["event"] == "rebuilt"] == [("spareA", 3)]
    assert any(by(e) == "s3" and e["event"] == "replaced" for e in events)
