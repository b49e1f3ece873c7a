"""A preemption notice (served on loopback, as AWS serves spot/instance-action) lands on stage 1's peer while
the swarm trains: it hands its exact state to the spare and leaves, and the run is the failure-free run."""

import time

import pytest

from checkfree.core.metrics import read_jsonl
from launcher.notices import NoticeServer
from tests.helpers import check_every_step_once, run_swarm, tiny_config

pytestmark = pytest.mark.process


def _events(run_dir):
    return [e for path in (run_dir / "peers").glob("*/events.jsonl") for e in read_jsonl(path)]


def _holder(run_dir, stage):
    """(name, committed steps) of the peer that joined ``stage`` last (a spare may take a stage whose peer
    started late, on a loaded machine)."""
    joined = []
    for path in (run_dir / "peers").glob("*/events.jsonl"):
        joined += [e for e in read_jsonl(path) if e["event"] == "epoch_joined" and e["stage"] == stage]
    if not joined:
        return None, -1
    peer = max(joined, key=lambda e: e["joined_epoch"])["peer"]
    rows = read_jsonl(run_dir / "peers" / peer / "metrics.jsonl")
    return peer.rpartition(".")[0], max((m["step"] for m in rows if "loss/train" in m), default=-1)


def test_a_preempted_peer_hands_its_exact_state_to_a_spare_and_the_run_equals_the_engine(tmp_path):
    from checkfree.engine.trainer import Trainer

    steps = 40
    with NoticeServer() as notices:
        proc = run_swarm(
            tmp_path,
            "preempt",
            f"num_steps={steps}",
            "swarm.num_spares=2",
            "swarm.preemption.provider=aws",
            f"swarm.preemption.url={notices.url}",
            "swarm.preemption.poll_s=0.2",
            background=True,
        )
        run_dir = tmp_path / "preempt"
        try:
            deadline = time.monotonic() + 120
            while _holder(run_dir, 1)[1] < 10 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            victim, committed = _holder(run_dir, 1)
            assert committed >= 10, "the swarm never trained"
            notices.arm(victim)
            # then the spare that did not take the stage gets a notice too: it leaves, holding nothing
            taker = lambda: [e for e in _events(run_dir) if e["event"] == "rebuilt"]
            while not taker() and time.monotonic() < deadline + 60 and proc.poll() is None:
                time.sleep(0.1)
            assert taker(), "nobody took the stage"
            spares = {e["peer"].rpartition(".")[0] for e in _events(run_dir) if e["event"] == "peer_started"}
            idle = sorted(n for n in spares if n.startswith("spare") and n != taker()[0]["peer"].rpartition(".")[0])
            notices.arm(idle[0])
            out, _ = proc.communicate(timeout=200)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert proc.returncode == 0, out[-3000:]
    _, metrics = check_every_step_once(run_dir, steps)
    events = read_jsonl(run_dir / "events.jsonl")
    by = lambda e: e.get("peer", "").rpartition(".")[0]
    (preempted,) = [e for e in events if e["event"] == "preempted"]
    (handed,) = [e for e in events if e["event"] == "handed_over"]
    assert by(preempted) == by(handed) == victim and 10 <= handed["step"] < steps
    (rebuilt,) = [e for e in events if e["event"] == "rebuilt"]
    assert rebuilt["method"] == "handoff" and rebuilt["stage"] == 1 and by(rebuilt) != victim
    assert rebuilt["step"] == handed["step"] and handed["to"] == rebuilt["peer"]
    left = [e for e in events if e["event"] == "left" and by(e) == idle[0]]
    assert left and "preemption notice while a spare" in left[0]["reason"]
    # bit for bit: the losses of the engine's failure-free run, step for step
    reference = Trainer(tiny_config(tmp_path, f"num_steps={steps}", "run_name=reference"))
    reference.run()
    expected = [m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")]
    assert [m["loss/train"] for m in metrics] == expected
