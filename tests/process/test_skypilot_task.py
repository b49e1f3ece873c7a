"""launcher/skypilot/peer.yaml and peer-gpu.yaml: SkyPilot's own parser accepts them, and their run script
(launcher/skypilot/run_peer.sh) starts a working swarm: here each peer runs on an emulated host (a network
namespace), as on a VM, with the same environment. As on a cloud VM, the "public address" a lookup would give
is on no interface of the host: the peers announce their private address, and a peer told to announce the
public one is refused. A relaunched peer (a managed job after a preemption) whose stage a spare took over
joins as a spare, and every peer's logs end up in LOG_URL."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from checkfree.core.metrics import read_jsonl
from launcher.netns import unavailable
from tests.helpers import poll

ROOT = Path(__file__).parents[2]
TASK = ROOT / "launcher" / "skypilot" / "peer.yaml"
GPU_TASK = ROOT / "launcher" / "skypilot" / "peer-gpu.yaml"
PUBLIC = "203.0.113.7"  # TEST-NET-3: on no interface of any emulated host, like a cloud VM's public address


@pytest.mark.parametrize("path", [TASK, GPU_TASK], ids=["cpu", "gpu"])
def test_skypilot_parses_the_tasks_as_spot_peers_that_need_the_token_run_id_and_swarm_id(path):
    sky = pytest.importorskip("sky", reason="SkyPilot is in the dev extra")
    with pytest.raises(ValueError, match="'RUN_ID' is None"):  # SkyPilot itself asks for the run id
        sky.Task.from_yaml(str(path))
    spec = yaml.safe_load(path.read_text())
    given = [("RUN_ID", "demo"), ("CHECKFREE_SWARM_ID", "0" * 32), ("BUCKET", "s3://b/demo")]
    task = sky.Task.from_yaml_config(
        yaml.safe_load(path.read_text()),
        env_overrides=[g for g in given if g[0] in spec["envs"]],
        secrets_overrides=[("CHECKFREE_JOIN_TOKEN", "cfj1_x")],
    )
    (resources,) = list(task.resources)
    assert resources.use_spot and task.num_nodes == 1
    assert task.run.strip().endswith("bash launcher/skypilot/run_peer.sh")
    assert "CHECKFREE_JOIN_TOKEN" in spec["secrets"] and "CHECKFREE_JOIN_TOKEN" not in spec["envs"]
    assert spec["envs"]["RUN_ID"] is None and spec["envs"]["CHECKFREE_SWARM_ID"] is None  # required
    assert (ROOT / spec["envs"]["CONFIG"]).is_file()
    # exactly the two ranges the peers use: the swarm's ports, and gloo's, pinned by the setup
    assert spec["resources"]["ports"] == [spec["envs"]["PORT_RANGE"], spec["envs"]["DATA_PORTS"].replace(" ", "-")]
    assert 'ip_local_port_range="$DATA_PORTS"' in spec["setup"]
    if path == GPU_TASK:
        assert resources.accelerators and "device=cuda precision=bf16" in spec["envs"]["EXTRA"]
        assert spec["envs"]["BUCKET"] is None


@pytest.mark.long  # ~90 s: keeps the default run under 15 minutes on 2 cores
@pytest.mark.skipif(unavailable() is not None, reason=f"emulated hosts cannot be made here: {unavailable()}")
def test_the_run_script_starts_a_swarm_on_emulated_hosts_and_a_relaunched_peer_joins_as_a_spare(tmp_path):
    """Four stage peers and a spare, each started by the task's run script on a host of its own, with a stand-in
    for the VM's tools: ``curl`` answers the public address (on no interface), ``~/checkfree-venv`` is this
    checkout's environment. No metadata server is contacted: PREEMPTION=none."""
    from launcher.netns import Hosts

    spec = yaml.safe_load(TASK.read_text())
    home = tmp_path / "home"
    (home / "checkfree-venv" / "bin").mkdir(parents=True)
    (home / "checkfree-venv" / "bin" / "checkfree").symlink_to(Path(sys.executable).parent / "checkfree")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "curl").write_text(f"#!/bin/sh\necho {PUBLIC}\n")  # what a VM's public-address lookup answers
    (tools / "curl").chmod(0o755)
    config = tmp_path / "swarm.yaml"
    steps = 400
    overrides = ["membership.rpc_timeout_s=0.5", f"num_steps={steps}", "run_name=sky", "swarm.log_every_s=2"]
    from checkfree.config import load_config, to_yaml
    from tests.helpers import SWARM

    config.write_text(to_yaml(load_config([], [*SWARM, *overrides])))
    run_dir, logs = tmp_path / "run", tmp_path / "bucket"
    procs: dict[str, subprocess.Popen] = {}

    def launch(host, name, role, initial, extra="", **secrets):
        env = {k: v for k, v in os.environ.items() if k not in ("CHECKFREE_JOIN_TOKEN", "CHECKFREE_SWARM_ID")}
        env.update({k: str(v) for k, v in spec["envs"].items() if v is not None}, **secrets)
        env.update(HOME=str(home), PATH=f"{tools}:{os.environ['PATH']}", CONFIG=str(config), ROLE=role)
        env.update(INITIAL_PEERS=" ".join(initial), PREEMPTION="none", RUN_DIR=str(run_dir), PEER_NAME=name)
        env.update(LOG_URL=str(logs), EXTRA=extra)
        with open(tmp_path / f"{name}.log", "a") as log:
            procs[name] = subprocess.Popen(
                [*host.exec_prefix(), "bash", "-c", spec["run"]],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return procs[name]

    def maddr(name):
        paths = list((run_dir / "peers").glob(f"{name}.*/events.jsonl")) if (run_dir / "peers").exists() else []
        started = [e for e in read_jsonl(paths[0]) if e["event"] == "peer_started"] if paths else []
        return started[0]["maddrs"][0] if started else None

    def refused(name, needle, **kw):
        p = launch(hosts.add(), name, "--spare", ["/ip4/127.0.0.1/tcp/1/p2p/x"], **kw)
        assert p.wait(timeout=60) == 2, (tmp_path / f"{name}.log").read_text()[-2000:]
        assert needle in (tmp_path / f"{name}.log").read_text()
        del procs[name]

    with Hosts("cfsky") as hosts:
        try:
            refused("notoken", "--secret CHECKFREE_JOIN_TOKEN", RUN_ID="sky", CHECKFREE_SWARM_ID="0" * 32)
            # the first peer starts the swarm (on a VM: checkfree swarm or checkfree peer), the others join
            first = hosts.add()
            cmd = [*first.exec_prefix(), sys.executable, "-m", "checkfree", "peer", str(config), "swarm.run_id=sky"]
            cmd += [f"membership.host={first.address}", "--run-dir", str(run_dir), "--peer-id", "s0", "--stage", "0"]
            procs["s0"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            assert poll(lambda: maddr("s0") is not None, timeout_s=60), "the first peer never started"
            secrets = dict(
                CHECKFREE_JOIN_TOKEN=(run_dir / "join_token").read_text().strip(),
                CHECKFREE_SWARM_ID=(run_dir / "swarm_id").read_text().strip(),
                RUN_ID="sky",
            )
            refused("noid", "pass the swarm's id", **{**secrets, "CHECKFREE_SWARM_ID": ""})
            refused("norun", "pass the swarm's run id", **{**secrets, "RUN_ID": ""})
            # told to announce the public address, as a VM's lookup would give it: refused, saying what to set
            refused(
                "public",
                f"announce_host={PUBLIC} is on no interface",
                extra=f"membership.announce_host={PUBLIC}",
                **secrets,
            )
            for s in (1, 2, 3):
                launch(hosts.add(), f"s{s}", f"--stage {s}", [maddr("s0")], **secrets)
            launch(hosts.add(), "spare1", "--spare", [maddr("s0")], **secrets)

            # the cloud reclaims the VM of stage 1's holder mid-run (which peer that is settles at the first epoch:
            # a peer that starts late finds its stage given to a spare); its managed job runs the task again on a
            # new VM, asking for stage 1 as before
            def step():
                return max(
                    (m["step"] for p in (run_dir / "peers").glob("*/metrics.jsonl") for m in read_jsonl(p)), default=-1
                )

            assert poll(lambda: step() >= 40, timeout_s=120), "the swarm never reached step 40"
            epochs = [e for evs in map(read_jsonl, (run_dir / "peers").glob("*/events.jsonl")) for e in evs]
            roster = max((e for e in epochs if e["event"] == "epoch_published"), key=lambda e: e["new_epoch"])["roster"]
            holder = roster[1].rpartition(".")[0]
            os.killpg(procs[holder].pid, signal.SIGKILL)
            procs[holder].wait(timeout=10)
            taken = lambda: any(  # a spare rebuilt stage 1
                e["event"] == "rebuilt" and e.get("stage") == 1
                for p in (run_dir / "peers").glob("*/events.jsonl")
                for e in read_jsonl(p)
            )
            assert poll(taken, timeout_s=90), "no spare took stage 1"
            launch(hosts.add(), holder, "--stage 1", [maddr("s0")], **secrets)
            for p in procs.values():
                p.wait(timeout=300)
            codes = {n: p.returncode for n, p in procs.items()}
            assert set(codes.values()) == {0}, (
                codes,
                "\n".join((tmp_path / f"{n}.log").read_text()[-1500:] for n in procs if n != "s0"),
            )
        finally:
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    events = {p.parent.name: read_jsonl(p) for p in (run_dir / "peers").glob("*/events.jsonl")}
    # every peer announced its own host's private address (hostname -I), with a port in range; never the public one
    for peer, evs in events.items():
        for e in evs:
            if e["event"] == "peer_started":
                host, port = e["maddrs"][0].split("/")[2], int(e["maddrs"][0].split("/")[4])
                assert host.startswith("10.") and (peer.startswith("s0.") or 40000 <= port <= 40099), e["maddrs"]
    # the relaunched peer (a new key, so a new id) found stage 1 held and waited as a spare
    again = [
        p for p, evs in events.items() if p.startswith(holder + ".") and any(e["event"] == "became_spare" for e in evs)
    ]
    assert again, {p: [e["event"] for e in evs][:8] for p, evs in events.items() if p.startswith(holder + ".")}
    from launcher.report import merge_run

    summary = merge_run(run_dir, load_config([str(config)], []))
    assert (summary["steps"], summary["repeated_steps"], summary["skipped_steps"]) == (steps, [], [])
    # every peer's events, metrics and log are in LOG_URL, as they would be in a bucket after the VMs are gone
    copied = {p.name for p in (logs / "peers").iterdir()}
    assert {p for p in events if not p.startswith("s0.")} <= copied
    for peer in copied:
        assert {"events.jsonl", "peer.log"} <= {f.name for f in (logs / "peers" / peer).iterdir()}, peer
