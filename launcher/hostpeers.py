"""
Peers on hosts
==============

Peers started one by one with ``checkfree peer``, each on an emulated host of its own (``launcher.netns``),
into one run directory: what an operator does by hand on separate machines, with no ``checkfree swarm`` in
charge. Tests and the multi-host scenario (``scripts/multihost_scenario.py``) use it to cut links, split the
network and send preemption notices to chosen peers while the swarm trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from checkfree.core.metrics import read_jsonl
from launcher.netns import Host, Hosts


class PeersOnHosts:
    def __init__(self, hosts: Hosts, log_dir: Path, run_dir: Path, cfg_args: list[str]):
        """``cfg_args``: the config files and overrides every peer gets (the same for all: one fingerprint)."""
        self.hosts, self.log_dir, self.run_dir, self.cfg_args = hosts, Path(log_dir), Path(run_dir), list(cfg_args)
        self.procs: dict[str, subprocess.Popen] = {}
        self.host_of: dict[str, Host] = {}

    def start(self, name: str, role: list[str], initial: list[str], host: Host | None = None) -> Host:
        """Start peer ``name`` (``--stage K`` or ``--spare``) bootstrapping from ``initial`` (none: a new
        swarm) on ``host`` (default: a new one). A joining peer reads the join token and the swarm id from the
        run dir."""
        host = host or self.hosts.add()
        self.host_of[name] = host
        cmd = [*host.exec_prefix(), sys.executable, "-m", "checkfree", "peer", *self.cfg_args]
        cmd += [f"membership.host={host.address}", "--run-dir", str(self.run_dir), "--peer-id", name, *role]
        cmd += ["--initial-peers", *initial] if initial else []
        with open(self.log_dir / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return host

    def folder(self, name: str) -> Path:
        """The peer's directory in the run dir (its id is NAME.HASH, the hash of its key)."""
        return next(iter((self.run_dir / "peers").glob(f"{name}.*")), self.run_dir / "peers" / name)

    def events(self, name: str | None = None) -> list[dict]:
        """One peer's events, or every peer's."""
        everyone = (self.run_dir / "peers").glob("*/events.jsonl")
        paths = [self.folder(name) / "events.jsonl"] if name else list(everyone)
        return [e for p in paths if p.exists() for e in read_jsonl(p)]

    def maddr(self, name: str) -> str | None:
        started = [e for e in self.events(name) if e["event"] == "peer_started"]
        return started[0]["maddrs"][0] if started else None

    def committed(self, name: str | None = None) -> int:
        """The last step ``name`` (default: any peer) committed, -1 if none."""
        paths = (
            [self.folder(name) / "metrics.jsonl"] if name else list((self.run_dir / "peers").glob("*/metrics.jsonl"))
        )
        steps = [m["step"] for p in paths if p.exists() for m in read_jsonl(p) if "loss/train" in m]
        return max(steps, default=-1)

    def holder(self, stage: int) -> str | None:
        """The name of the peer that the newest published epoch gives ``stage``."""
        published = [e for e in self.events() if e["event"] == "epoch_published" and e["roster"]]
        if not published:
            return None
        roster = max(published, key=lambda e: e["new_epoch"])["roster"]
        return roster[stage].rpartition(".")[0]

    def status(self, host: Host, via: str, run_id: str) -> subprocess.CompletedProcess:
        """``checkfree status`` run on ``host``, bootstrapping from peer ``via``."""
        token = (self.run_dir / "join_token").read_text().strip()
        swarm_id = (self.run_dir / "swarm_id").read_text().strip()
        return subprocess.run(
            [*host.exec_prefix(), sys.executable, "-m", "checkfree", "status", "--run-id", run_id]
            + ["--initial-peers", self.maddr(via)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "CHECKFREE_JOIN_TOKEN": token, "CHECKFREE_SWARM_ID": swarm_id},
        )

    def logs(self, tail: int = 2000) -> str:
        return "\n".join(f"--- {p}\n" + (self.log_dir / f"{p}.log").read_text()[-tail:] for p in self.procs)

    def end(self) -> None:
        """Kill every peer still running (by its PID) and reap it."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)

    def merged(self) -> dict:
        """Merge the peers' metrics and events into the run dir (as the launcher does); the run's summary."""
        from checkfree.config import load_config
        from launcher.report import merge_run

        files = [a for a in self.cfg_args if a.endswith((".yaml", ".yml"))]
        return merge_run(self.run_dir, load_config(files, [a for a in self.cfg_args if a not in files]))
