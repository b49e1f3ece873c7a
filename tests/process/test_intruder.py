"""A real intruder process against a training swarm: it reaches the DHT (as anyone can who knows an address)
but holds no join token. It cannot appear as a member, stop the swarm, publish a roster anyone follows, take
a spare's place in a rebuild, pass a rendezvous gate, or receive weights; the swarm trains to the end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkfree.core.failures import Failure
from checkfree.core.metrics import read_jsonl
from tests.helpers import check_every_step_once, run_swarm

# ~42 s: test_attacks.py (default) and the DHT, gate and probe tests cover its parts in the default run
pytestmark = [pytest.mark.process, pytest.mark.long]

INTRUDER = Path(__file__).with_name("intruder.py")


def test_an_intruder_without_the_token_cannot_join_stop_lead_or_take_weights(tmp_path):
    from checkfree.swarm.config import config_fingerprint
    from tests.helpers import SWARM, tiny_config

    name, steps = "guarded", 160
    overrides = ["num_steps=160", "swarm.num_spares=1", "swarm.run_id=guarded"]
    fingerprint = config_fingerprint(tiny_config(tmp_path, *SWARM, *overrides))
    # a stage is lost mid-run: a rebuild happens (weights move) while the intruder poses as a spare
    proc = run_swarm(tmp_path, name, *overrides, failures=[Failure(30, 1, "mid_forward", 0.5)], background=True)
    run_dir = tmp_path / name
    report = tmp_path / "intruder.json"
    intruder = None
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "maddrs.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        maddrs = (run_dir / "maddrs.txt").read_text().split()
        env = {k: v for k, v in os.environ.items() if k != "CHECKFREE_JOIN_TOKEN"}
        intruder = subprocess.Popen(
            [sys.executable, str(INTRUDER), "guarded", fingerprint, "25", str(report), *maddrs],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**env, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        out, _ = proc.communicate(timeout=240)
        intruder_out, _ = intruder.communicate(timeout=120)
    finally:
        for p in (proc, intruder):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert proc.returncode == 0, out[-3000:]
    assert intruder.returncode == 0, intruder_out[-3000:]
    seen = json.loads(report.read_text())
    me = seen["id"]
    check_every_step_once(run_dir, steps)
    events = read_jsonl(run_dir / "events.jsonl")
    # it read the swarm (reads are open) and tried for real, many times, and knocked on the members' probes
    assert seen["seen_members"] and seen["attempts"] >= 10 and seen["probe_pushes"] > 0
    # every gate it reached refused it
    assert seen["gate"] and not any(g["outcome"] == "admitted" for g in seen["gate"])
    assert any(g["outcome"].startswith("refused") for g in seen["gate"]), seen["gate"]
    # nobody followed it: no roster names it, no stop, the rebuild went to the real spare
    published = [e for e in events if e["event"] == "epoch_published"]
    assert all(me not in e["roster"] and e["new_epoch"] < 10**6 for e in published)
    assert not any(e["event"] == "swarm_stopped" for e in events)
    rebuilt = [e for e in events if e["event"] == "rebuilt"]
    assert rebuilt and all(e["peer"].startswith("spare-") for e in rebuilt)
    assert all(e.get("peer") != me for e in events)
    logs = "".join(p.read_text() for p in (run_dir / "peers").glob("*.log"))
    assert "refused" in logs and "stopped by the intruder" not in logs
