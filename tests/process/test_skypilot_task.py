"""launcher/skypilot/peer.yaml: SkyPilot's own parser accepts it, and its ``run`` command lines start a working
swarm: here each runs on an emulated host (a network namespace), as on a VM, with the same environment."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from checkfree.core.metrics import read_jsonl
from launcher.netns import unavailable

TASK = Path(__file__).parents[2] / "launcher" / "skypilot" / "peer.yaml"
ROOT = Path(__file__).parents[2]


def test_skypilot_parses_the_task_as_a_spot_peer_that_needs_the_join_token():
    sky = pytest.importorskip("sky", reason="SkyPilot is in the dev extra")
    task = sky.Task.from_yaml(str(TASK))
    (resources,) = list(task.resources)
    assert task.name == "checkfree-peer" and resources.use_spot and task.num_nodes == 1
    assert "checkfree peer" in task.run and "--initial-peers $INITIAL_PEERS $ROLE" in task.run
    assert {"CONFIG", "ROLE", "INITIAL_PEERS", "PORT_RANGE", "PREEMPTION"} <= set(task.envs)
    spec = yaml.safe_load(TASK.read_text())
    assert "CHECKFREE_JOIN_TOKEN" in spec["secrets"] and "CHECKFREE_JOIN_TOKEN" not in spec["envs"]
    assert (ROOT / spec["envs"]["CONFIG"]).is_file()


@pytest.mark.long  # ~60 s: keeps the default run under 15 minutes on 2 cores
@pytest.mark.skipif(unavailable() is not None, reason=f"emulated hosts cannot be made here: {unavailable()}")
def test_the_tasks_run_commands_start_a_swarm_on_emulated_hosts(tmp_path):
    """Four stage peers and a spare, each started by the task's ``run`` script on a host of its own, with a
    stand-in for the VM's tools: ``curl`` finds no public address (so the host's own is announced, as a VM
    without one would), ``~/checkfree-venv`` is this checkout's environment. No metadata server is contacted:
    PREEMPTION=none."""
    from launcher.netns import Hosts
    from tests.helpers import SWARM, poll

    spec = yaml.safe_load(TASK.read_text())
    home = tmp_path / "home"
    (home / "checkfree-venv" / "bin").mkdir(parents=True)
    (home / "checkfree-venv" / "bin" / "checkfree").symlink_to(Path(sys.executable).parent / "checkfree")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "curl").write_text("#!/bin/sh\nexit 7\n")  # no route out of the namespace anyway
    (tools / "curl").chmod(0o755)
    config = tmp_path / "swarm.yaml"
    overrides = [*SWARM, "membership.rpc_timeout_s=0.5", "swarm.run_id=sky", "num_steps=30", "run_name=sky"]
    from checkfree.config import load_config, to_yaml

    config.write_text(to_yaml(load_config([], overrides)))
    run_dir = tmp_path / "run"
    procs = []

    def launch(host, name, role, initial, token=None, swarm_id=None):
        env = {**os.environ, **{k: str(v) for k, v in spec["envs"].items()}}
        env.update(HOME=str(home), PATH=f"{tools}:{os.environ['PATH']}", CONFIG=str(config), ROLE=role)
        env.update(INITIAL_PEERS=" ".join(initial), PREEMPTION="none", RUN_DIR=str(run_dir), PEER_NAME=name)
        env.pop("CHECKFREE_JOIN_TOKEN", None)
        if token:
            env["CHECKFREE_JOIN_TOKEN"] = token
        if swarm_id:
            env["CHECKFREE_SWARM_ID"] = swarm_id
        log = open(tmp_path / f"{name}.log", "w")
        procs.append(
            subprocess.Popen(
                [*host.exec_prefix(), "bash", "-c", spec["run"]],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
        return procs[-1]

    def maddr(name):
        paths = list((run_dir / "peers").glob(f"{name}.*/events.jsonl")) if (run_dir / "peers").exists() else []
        started = [e for e in read_jsonl(paths[0]) if e["event"] == "peer_started"] if paths else []
        return started[0]["maddrs"][0] if started else None

    with Hosts("cfsky") as hosts:
        try:
            # without the token the run script refuses to start (exit 2, saying so)
            refused = launch(hosts.add(), "notoken", "--spare", ["/ip4/127.0.0.1/tcp/1/p2p/x"])
            assert refused.wait(timeout=30) == 2
            assert "--secret CHECKFREE_JOIN_TOKEN" in (tmp_path / "notoken.log").read_text()
            # the first peer starts the swarm (on a VM: checkfree swarm or checkfree peer), the others join
            first = hosts.add()
            cmd = [*first.exec_prefix(), sys.executable, "-m", "checkfree", "peer", str(config)]
            cmd += [f"membership.host={first.address}", "--run-dir", str(run_dir), "--peer-id", "s0", "--stage", "0"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
            assert poll(lambda: maddr("s0") is not None, timeout_s=60), "the first peer never started"
            token = (run_dir / "join_token").read_text().strip()
            swarm_id = (run_dir / "swarm_id").read_text().strip()
            refused = launch(hosts.add(), "noid", "--spare", [maddr("s0")], token)  # without the swarm's id
            assert refused.wait(timeout=30) == 2
            assert "pass the swarm's id: --env CHECKFREE_SWARM_ID" in (tmp_path / "noid.log").read_text()
            procs.remove(refused)
            for s in (1, 2, 3):
                launch(hosts.add(), f"s{s}", f"--stage {s}", [maddr("s0")], token, swarm_id)
            launch(hosts.add(), "spare1", "--spare", [maddr("s0")], token, swarm_id)
            for p in procs[1:]:
                p.wait(timeout=240)
            assert [p.returncode for p in procs[1:]] == [0] * 5, "\n".join(
                (tmp_path / f"{n}.log").read_text()[-1500:] for n in ("s1", "s2", "s3", "spare1")
            )
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=10)
    started = [
        e for p in (run_dir / "peers").glob("*/events.jsonl") for e in read_jsonl(p) if e["event"] == "peer_started"
    ]
    # every peer announced its own host's address, found by the run script (hostname -I), with a port in range
    for e in started:
        host, port = e["maddrs"][0].split("/")[2], int(e["maddrs"][0].split("/")[4])
        assert host.startswith("10.") and (e["peer"].startswith("s0.") or 40000 <= port <= 40100), e["maddrs"]
    metrics = [m for p in (run_dir / "peers").glob("s3.*/metrics.jsonl") for m in read_jsonl(p) if "loss/train" in m]
    assert [m["step"] for m in metrics] == list(range(30))
