"""``checkfree status RUN_DIR``: everything it needs comes from the run directory a swarm's first peer
writes (join_token, maddrs.txt) beside its config.yaml; --json prints one snapshot, --watch ends on Ctrl-C
with exit 0 and no traceback."""

import json
import os
import signal
import subprocess
import sys

import pytest

from checkfree.config import load_config, to_yaml
from tests.helpers import SWARM, kill_groups, poll


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "CHECKFREE_JOIN_TOKEN"}  # the run directory's token


def test_a_run_directory_without_its_files_exits_2_saying_which(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "checkfree", "status", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert out.returncode == 2, out.stderr
    assert "config.yaml not found" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.long  # a live peer for a minute: run with -m long
def test_status_of_a_live_first_peer_from_its_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config([], [*SWARM, "failures.mode=none", "run_name=solo", "num_steps=100000"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    peer = subprocess.Popen(
        [sys.executable, "-m", "checkfree", "peer", str(run / "config.yaml"), "--stage", "0"]
        + ["--run-dir", str(run), "--peer-id", "solo"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=_env(),
    )
    watch = None
    try:
        assert poll(lambda: (run / "maddrs.txt").exists() and (run / "join_token").exists(), timeout_s=60)
        # its note (what it waits for) is heartbeated from its first decision on
        waiting_logged = lambda: any("leader_waiting" in f.read_text() for f in run.glob("peers/*/events.jsonl"))
        assert poll(waiting_logged, timeout_s=60)
        status = lambda *args: subprocess.run(
            [sys.executable, "-m", "checkfree", "status", str(run), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        out = status("--json")
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
        assert snap["run_id"] == "solo" and snap["epoch"] is None and snap["roster"] == []
        [waiting] = snap["others"]  # stage 0 asked for, waiting for the three others
        assert waiting["peer"].startswith("solo.") and waiting["stage"] == 0 and waiting["heartbeat_age_s"] < 30
        assert {"peer": waiting["peer"], "note": "waiting for peers for stages [1, 2, 3]"} in snap["notes"]
        assert snap["addresses"] == (run / "maddrs.txt").read_text().split()[:1]
        # --watch: refreshed until Ctrl-C (SIGINT to its whole process group, as a terminal sends it)
        watch = subprocess.Popen(
            [sys.executable, "-m", "checkfree", "status", str(run), "--watch", "0.3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=_env(),
        )
        assert watch.stdout.readline() == "run solo: no epoch yet\n"
        waits = f"{waiting['peer']} waits: waiting for peers for stages [1, 2, 3]\n"
        assert waits in iter(watch.stdout.readline, "")  # the table, up to the note (the pipe holds the rest)
        os.killpg(watch.pid, signal.SIGINT)
        _, err = watch.communicate(timeout=30)
        assert watch.returncode == 0 and "Traceback" not in err, err
    finally:
        for proc in (watch, peer):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
        kill_groups([p.pid for p in (watch, peer) if p is not None])  # the DHT processes of each
