"""Options that try to lower q (the extra steps a rebuild costs): an lr warm-up of the rebuilt stage and Adam
moments taken from its sources."""

import io
import json
import subprocess
import sys

import pytest
import torch

from checkfree.core.stage_step import warmup_lr
from checkfree.engine.trainer import Trainer
from tests.helpers import TINY, tiny_config


def test_warmup_lr_ramps_linearly_to_the_rebuilt_lr():
    assert [warmup_lr(1.0, n, 4) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(2.0, 0, 0) == 2.0


def _rebuilt_trainer(tmp_path, *extra):
    trainer = Trainer(tiny_config(tmp_path, "recovery.strategy=checkfree", *extra))
    trainer.start()
    trainer.continue_for(3)
    return trainer


def test_a_rebuilt_stage_warms_up_and_the_others_do_not(tmp_path):
    trainer = _rebuilt_trainer(tmp_path, "recovery.warmup_steps=4")
    trainer.recover([1])
    lrs = []
    for _ in range(6):
        trainer.continue_for(1)
        lrs.append([opt.param_groups[0]["lr"] for opt in trainer.engine.optimizers])
    base = trainer.cfg.optim.lr
    assert [row[1] for row in lrs] == pytest.approx([base * 1.1 * f for f in (0.25, 0.5, 0.75, 1, 1, 1)])
    assert all(row[0] == row[2] == base for row in lrs)


def test_neighbour_moments_are_averaged_with_the_blocks_weights(tmp_path):
    trainer = _rebuilt_trainer(tmp_path, "recovery.optimizer_init=neighbours")
    eng = trainer.engine
    before = {s: eng.block_moments(s) for s in (0, 2)}
    trainer.recover([1])
    rebuilt = [e for e in trainer.events.path.read_text().splitlines() if '"rebuilt"' in e]
    w0, w2 = json.loads(rebuilt[-1])["weights"]
    opt, params = eng.optimizers[1], dict(eng.stages[1].named_parameters())
    name = (
        "blocks.0.attn.wq.weight" if "blocks.0.attn.wq.weight" in params else next(n for n in params if "blocks" in n)
    )
    state = opt.state[params[name]]
    want = w0 * before[0][name]["exp_avg"] + w2 * before[2][name]["exp_avg"]
    assert torch.allclose(state["exp_avg"], want)
    want_sq = w0 * before[0][name]["exp_avg_sq"] + w2 * before[2][name]["exp_avg_sq"]
    assert torch.allclose(state["exp_avg_sq"], want_sq)
    assert float(state["step"]) == 3.0  # the sources' step count: bias correction does not restart
    trainer.continue_for(2)  # and it trains on
    assert float(opt.state[params[name]]["step"]) == 5.0


OPT_INIT = "recovery.optimizer_init=neighbours"


def test_the_swarm_refuses_neighbour_moments_it_cannot_send(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkfree",
            "swarm",
            *TINY,
            f"out_dir={tmp_path}",
            "recovery.optimizer_init=neighbours",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "recovery.optimizer_init=neighbours is an engine experiment" in out.stderr


def test_a_stage_saved_mid_warm_up_is_restored_mid_warm_up(tmp_path):
    """A checkpoint (or a preemption hand-over) of a stage still ramping its lr carries the ramp: the
    restored stage goes on at the next step of it, not at the full lr."""
    from checkfree.core.checkpoint import StagePayload, payload_bytes
    from checkfree.core.rebuild import restore_stage

    trainer = _rebuilt_trainer(tmp_path, "recovery.warmup_steps=4")
    trainer.recover([1])
    trainer.continue_for(1)
    blob = payload_bytes(trainer.engine.payload(1, trainer.state.step))
    payload = StagePayload.from_dict(torch.load(io.BytesIO(blob), weights_only=True), "the test's payload")
    assert (payload.warmup_steps, payload.warmup_done) == (4, 1)
    trainer.engine.install(1, restore_stage(trainer.spec, 1, payload))
    lrs = []
    for _ in range(4):
        trainer.continue_for(1)
        lrs.append(trainer.engine.optimizers[1].param_groups[0]["lr"])
    assert lrs == pytest.approx([trainer.cfg.optim.lr * 1.1 * f for f in (0.5, 0.75, 1, 1)])
