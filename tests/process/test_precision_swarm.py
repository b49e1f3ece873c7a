"""A real swarm at ``precision=bf16``: peer processes send bf16 activations and gradients over gloo, every step
commits once with a finite loss, and each stage logs the bytes it sent per committed step (half fp32's
payload: what the schedule sends, in bf16, plus the int64 headers)."""

import math

import pytest

from checkfree.core.metrics import read_jsonl
from checkfree.core.schedule import schedule_for
from checkfree.swarm.transport import HEADER_LEN
from tests.helpers import check_every_step_once, run_swarm, tiny_config

# ~31 s: bf16 workers on thread ranks (tests/unit/test_precision.py) reproduce the bf16 engine in the default run
pytestmark = [pytest.mark.process, pytest.mark.long, pytest.mark.timeout(240)]


def test_a_bf16_swarm_trains_and_logs_the_bytes_each_stage_sends(tmp_path):
    steps = 6
    code, out, run_dir = run_swarm(
        tmp_path, "bf16", f"num_steps={steps}", "precision=bf16", "eval_every_steps=3", "swarm.num_spares=0"
    )
    assert code == 0, out
    _, metrics = check_every_step_once(run_dir, steps)
    assert all(math.isfinite(m["loss/train"]) for m in metrics)
    cfg = tiny_config(tmp_path)  # the shapes the swarm ran with (run_swarm's overrides are the tiny config's)
    schedule = schedule_for(cfg.pipeline, cfg.model.num_stages, cfg.swap_enabled)
    act = cfg.data.microbatch_size * cfg.model.seq_len * cfg.model.d_model  # elements of one (B, T, C) message
    peer_rows = [r for f in (run_dir / "peers").glob("*/metrics.jsonl") for r in read_jsonl(f)]
    rows = [r for r in peer_rows if "loss/train" in r]
    assert len(rows) == steps * cfg.model.num_stages
    for r in rows:
        messages = sum(op.dst is not None for op in schedule.ops[r["stage"]])  # activations on, gradients back
        assert r["comm/bytes_sent"] == messages * (HEADER_LEN * 8 + act * 2), r
    vals = [r["loss/val"] for r in peer_rows if "loss/val" in r]
    assert vals and all(math.isfinite(v) for v in vals)
