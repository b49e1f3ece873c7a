"""Clean stops of real swarms: Ctrl-C on ``checkfree swarm`` stops every peer at a step boundary with its state
saved (exit 130) and the same command goes on; SIGTERM on one ``checkfree peer`` hands its stage to a spare
and exits 143 (never 0: a managed-job system reads 0 as finished); Ctrl-C on one peer saves its stage and
exits 130. And ``checkfree peer``'s command line: ``key=value`` after ``--initial-peers``."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from checkfree.core.checkpoint import CheckpointStore
from checkfree.core.metrics import read_jsonl
from checkfree.core.weights import load_weights, save_stage_part
from checkfree.swarm.admission import TOKEN_ENV, new_token
from tests.helpers import check_every_step_once, kill_groups, run_swarm, spawned_pids, tiny_config

pytestmark = pytest.mark.timeout(300)


def _committed(run_dir) -> int:
    """The newest step any peer logged as committed (-1: none yet)."""
    steps = [-1]
    for path in (run_dir / "peers").glob("*/metrics.jsonl"):
        lines = path.read_text().splitlines()
        steps += [json.loads(line)["step"] for line in lines[-3:] if line.endswith("}")]
    return max(steps)


def _wait_for_step(proc, run_dir, step, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "peers").is_dir() and _committed(run_dir) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the swarm never reached step {step}")


def _peer_pid(run_dir, name):
    (pid,) = [
        e["pid"]
        for e in read_jsonl(run_dir / "launcher-events.jsonl")
        if e["event"] == "peer_spawned" and e["peer"].startswith(f"{name}.")
    ]
    return pid


def _finish(proc, run_dir, timeout_s=200):
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        kill_groups(spawned_pids(run_dir))
    return proc.returncode, out


@pytest.mark.long  # ~45 s: the resume tests (test_swarm_resume.py) restart a stopped swarm in the default run
def test_ctrl_c_on_the_swarm_saves_every_stage_and_the_same_command_goes_on(tmp_path):
    # no periodic saves: the stop alone leaves what the same command needs to go on
    args = ("num_steps=60", "swarm.num_spares=1")
    proc = run_swarm(tmp_path, "stop", *args, background=True)
    run_dir = tmp_path / "stop"
    _wait_for_step(proc, run_dir, 10)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the launcher's whole process group
    code, out = _finish(proc, run_dir)
    assert code == 130, out
    assert "Traceback" not in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 130
    assert set(summary["exit_codes"].values()) == {130}, summary["exit_codes"]  # every peer stopped cleanly
    # every stage saved the same step boundary: a complete checkpoint there, and the model of that step
    stopped_at = CheckpointStore(run_dir / "checkpoints", 4).latest_complete()
    assert 10 <= stopped_at < 60
    left = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "left"]
    saved = [e for e in left if "saved at step" in e["reason"]]
    assert len(saved) == 4 and {e["step"] for e in saved} == {stopped_at}, left
    assert summary["weights_step"] == stopped_at, summary["weights_note"]
    _, state, header = load_weights(run_dir)
    assert header["step"] == stopped_at and state
    # the same command continues the run from there and finishes it
    code, out, _ = run_swarm(tmp_path, "stop", *args)
    assert code == 0, out
    assert f"resuming from step {stopped_at} saved in {run_dir / 'checkpoints'}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["repeated_steps"] == [] and summary["skipped_steps"] == []
    assert summary["weights_step"] == 60


@pytest.mark.slow
def test_sigterm_on_a_peer_hands_its_stage_to_a_spare_and_exits_143(tmp_path):
    from checkfree.engine.trainer import Trainer

    steps = 40
    proc = run_swarm(tmp_path, "term", f"num_steps={steps}", "swarm.num_spares=1", background=True)
    run_dir = tmp_path / "term"
    _wait_for_step(proc, run_dir, 8)
    victim = _peer_pid(run_dir, "s1-02")
    os.kill(victim, signal.SIGTERM)
    code, out = _finish(proc, run_dir)
    assert code == 0, out
    summary, metrics = check_every_step_once(run_dir, steps)
    codes = {pid.partition(".")[0]: c for pid, c in summary["exit_codes"].items()}
    assert codes["s1-02"] == 143, codes
    events = read_jsonl(run_dir / "events.jsonl")
    (handed,) = [e for e in events if e["event"] == "handed_over"]
    assert handed["peer"].startswith("s1-02.") and handed["stage"] == 1
    (rebuilt,) = [e for e in events if e["event"] == "rebuilt"]
    assert rebuilt["method"] == "handoff" and rebuilt["peer"] == handed["to"]
    # the exact state went over: the engine's failure-free losses, step for step
    reference = Trainer(tiny_config(tmp_path, f"num_steps={steps}", "run_name=reference"))
    reference.run()
    expected = [m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")]
    assert [m["loss/train"] for m in metrics] == pytest.approx(expected, abs=1e-5)


@pytest.mark.long  # the default suite covers a peer's SIGTERM (with a spare) and Ctrl-C (the whole swarm)
@pytest.mark.parametrize(("sig", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_on_a_peer_without_a_spare_saves_its_stage(tmp_path, sig, exit_code):
    """No spare in view: on Ctrl-C (or SIGTERM, which finds no spare to hand the stage to) the peer stops at a
    step boundary, writes its stage's checkpoint and weights part, and exits 130 (143); the launcher brings a
    new machine and the swarm rebuilds the stage and finishes."""
    steps = 40
    args = (f"num_steps={steps}", "checkpoint.every_steps=50", "swarm.num_spares=0")
    proc = run_swarm(tmp_path, "int", *args, background=True)
    run_dir = tmp_path / "int"
    _wait_for_step(proc, run_dir, 8)
    os.kill(_peer_pid(run_dir, "s2-03"), sig)
    code, out = _finish(proc, run_dir)
    assert code == 0, out
    summary, _ = check_every_step_once(run_dir, steps)
    codes = {pid.partition(".")[0]: c for pid, c in summary["exit_codes"].items()}
    assert codes["s2-03"] == exit_code, codes
    events = read_jsonl(run_dir / "events.jsonl")
    (left,) = [e for e in events if e["event"] == "left" and e["peer"].startswith("s2-03.")]
    step = left["step"]
    assert f"stage 2 saved at step {step}" in left["reason"]
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "stage_2.pt").is_file()  # off its cadence of 50
    assert [r["stage"] for r in summary["recovery_rows"] if r["completed"]] == [2]


def test_key_value_after_initial_peers_is_an_override_not_an_address(tmp_path):
    """``--initial-peers`` takes every word after it: a ``key=value`` there is the config's (here a bad one,
    refused by the config before any DHT starts), never dialled as an address."""
    cmd = [sys.executable, "-m", "checkfree", "peer", "--spare", "--run-dir", str(tmp_path), "--initial-peers"]
    cmd += ["/ip4/127.0.0.1/tcp/9/p2p/QmNotDialled", "model.num_stages=0"]
    env = {**os.environ, TOKEN_ENV: new_token()}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert "num_stages" in done.stderr and "multiaddr" not in done.stderr.lower(), done.stderr


# ~34 s, -m long; by default: a bad token exits 2 (test_cli), another swarm's records are refused (test_membership)
@pytest.mark.long
def test_a_peer_with_another_join_token_says_so_and_exits_2(tmp_path):
    """Every record it reads from the swarm is refused (sealed with the swarm's token, not its own): instead of
    waiting forever as a spare nobody sees, it exits 2 saying its token does not match the swarm's. (The swarm
    is then ended with two Ctrl-C: the second aborts the stop at once.)"""
    proc = run_swarm(tmp_path, "token", "num_steps=100000", "swarm.num_spares=0", background=True)
    run_dir = tmp_path / "token"
    stranger = None
    try:
        _wait_for_step(proc, run_dir, 1)
        maddrs = (run_dir / "maddrs.txt").read_text().split()
        cmd = [sys.executable, "-m", "checkfree", "peer", str(run_dir / "config.yaml"), "--spare"]
        cmd += ["--run-dir", str(tmp_path / "stranger"), "--initial-peers", *maddrs]
        env = {**os.environ, TOKEN_ENV: new_token(), "CHECKFREE_SWARM_ID": (run_dir / "swarm_id").read_text().strip()}
        stranger = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
        _, err = stranger.communicate(timeout=90)
        # then Ctrl-C twice on the swarm: the second aborts at once, still without a traceback
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        code, out = _finish(proc, run_dir, timeout_s=60)
    finally:
        if stranger is not None and stranger.poll() is None:
            os.killpg(stranger.pid, signal.SIGKILL)
            stranger.wait(timeout=10)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        kill_groups(spawned_pids(run_dir))
    assert stranger.returncode == 2, err[-3000:]
    assert "join token or swarm id does not match the swarm's" in err, err[-3000:]
    assert code == 130 and "Traceback" not in out, out[-3000:]
    assert "ending every peer at once" in out, out[-3000:]


def test_parts_at_different_steps_are_said_in_the_summary_not_assembled(tmp_path):
    """A swarm that stopped while a stage's holder could not save (killed, or lost since it wrote) leaves parts
    at different steps: the launcher says so in the summary instead of failing; parts at one step are joined."""
    from checkfree.core.model import Stage
    from launcher.local import weights_summary

    cfg = tiny_config(tmp_path).model
    for i in range(cfg.num_stages):
        save_stage_part(tmp_path, i, Stage(cfg, i).state_dict(), cfg, 3 if i == 2 else 5, f"test stage {i}")
    mixed = weights_summary(tmp_path)
    assert mixed["weights"] is None and "different steps" in mixed["weights_note"]
    assert not (tmp_path / "model.safetensors").exists()
    save_stage_part(tmp_path, 2, Stage(cfg, 2).state_dict(), cfg, 5, "test stage 2")
    joined = weights_summary(tmp_path)
    assert joined["weights_step"] == 5 and joined["weights"] == str(tmp_path / "model.safetensors")
