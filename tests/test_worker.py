"""The schedule executed by one StageWorker per stage (thread ranks over real gloo groups) reproduces
the single-process engine step for step: the proof that the distributed execution is right."""

import math

import pytest

from checkfree.model import build_stages
from checkfree.trainer import Trainer
from checkfree.transport import StageLostError
from checkfree.worker import StageWorker
from tests.conftest import tiny_config
from tests.test_transport import run_ranks


def _workers(cfg, trainer):
    stages = build_stages(cfg.model, cfg.seed)
    return [StageWorker(stages[i], trainer.schedule, trainer.batches, cfg.optim, cfg.optim.lr, cfg.model.d_model,
                        cfg.recovery.norm_ema_beta) for i in range(cfg.model.num_stages)]


@pytest.mark.parametrize("schedule,strategy", [("gpipe", "checkfree"), ("1f1b", "checkfree"), ("1f1b", "checkfree_plus"),
                                               ("gpipe", "checkfree_plus")])
def test_workers_reproduce_the_engine(tmp_path, schedule, strategy):
    cfg = tiny_config(tmp_path, "num_steps=4", f"pipeline.schedule={schedule}", f"recovery.strategy={strategy}")
    reference = Trainer(cfg)
    reference.run()
    engine = reference.engine
    workers = _workers(cfg, reference)

    def fn(group):
        w = workers[group.rank]
        losses = []
        for step in range(4):
            w.run_step(group, step)
            losses.append(w.commit(group, step))
        return losses

    results = run_ranks(4, fn, timeout_s=10)
    from checkfree.metrics import read_jsonl

    expected = [m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")]
    for r in results:
        assert not isinstance(r, Exception), r
        assert r == pytest.approx(expected, abs=1e-6)  # every stage agrees on the committed loss
    for i, w in enumerate(workers):
        assert w.grad_norm_raw == pytest.approx(engine.grad_norm_raw[i], rel=1e-5)
        assert w.all_norms == pytest.approx(engine.grad_norm_raw, rel=1e-5)
        for (k, a), b in zip(w.stage.state_dict().items(), engine.stages[i].state_dict().values()):
            assert (a - b).abs().max().item() < 1e-5, k


def test_a_stage_that_stops_mid_step_is_lost_for_its_neighbours_and_nothing_commits(tmp_path):
    cfg = tiny_config(tmp_path, "pipeline.schedule=gpipe", "recovery.strategy=checkfree")
    trainer = Trainer(cfg)
    workers = _workers(cfg, trainer)
    before = [{k: v.clone() for k, v in w.stage.state_dict().items()} for w in workers]

    def fn(group):
        if group.rank == 2:
            return "silent"  # stage 2 never takes part: a hung peer
        w = workers[group.rank]
        w.run_step(group, 0)
        return w.commit(group, 0)

    results = run_ranks(4, fn, timeout_s=1.0)
    assert results[2] == "silent"
    for r in results[:2] + results[3:]:
        assert isinstance(r, StageLostError), r
    assert results[1].stage == 2 or results[3].stage == 2  # its neighbours name it
    for w, b in zip(workers, before):  # no optimizer step anywhere
        assert all((v == b[k]).all() for k, v in w.stage.state_dict().items())
    assert all(math.isfinite(w.grad_norm_raw) for w in workers)
