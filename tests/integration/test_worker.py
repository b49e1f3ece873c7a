"""The schedule executed by one StageWorker per stage (thread ranks over real gloo groups) reproduces
the single-process engine step for step: the proof that the distributed execution is right."""

import pytest
import torch

from checkfree.core.model import build_stages
from checkfree.engine.trainer import Trainer
from checkfree.swarm.transport import StageLostError
from checkfree.swarm.worker import StageWorker
from tests.helpers import run_ranks, tiny_config


def _workers(cfg, trainer):
    stages = build_stages(cfg.model, cfg.seed)
    return [
        StageWorker(
            stages[i],
            trainer.schedule,
            trainer.batches,
            cfg.optim,
            cfg.optim.lr,
            cfg.model.d_model,
            cfg.recovery.norm_ema_beta,
        )
        for i in range(cfg.model.num_stages)
    ]


@pytest.mark.parametrize(
    "schedule,strategy",
    [("gpipe", "checkfree"), ("1f1b", "checkfree"), ("1f1b", "checkfree_plus"), ("gpipe", "checkfree_plus")],
)
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
    from checkfree.core.metrics import read_jsonl

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
    for w in workers:  # no norm recorded and no Adam step taken: the step left no trace
        assert (w.grad_norm_raw, w.grad_norm_smoothed, w.all_norms) == (0.0, None, [0.0] * 4)
        assert not w.optimizer.state


def test_redundant_workers_keep_shadows_identical_to_the_stages_they_copy(tmp_path):
    """Every worker also trains a shadow of the next stage on its own outputs and the gradients that stage
    forwards (``sgrad``): after several steps each shadow equals its stage exactly, optimizer included,
    and the losses are the engine's."""
    from checkfree.core.metrics import read_jsonl
    from checkfree.core.redundancy import full_state_tensors, shadow_of
    from checkfree.swarm.shadow import HeldShadow

    cfg = tiny_config(tmp_path, "num_steps=3", "recovery.strategy=redundant")
    reference = Trainer(cfg)
    reference.run()
    stages, copies = build_stages(cfg.model, cfg.seed), build_stages(cfg.model, cfg.seed)
    L = cfg.model.num_stages
    workers = [
        StageWorker(
            stages[i], reference.schedule, reference.batches, cfg.optim, cfg.optim.lr, cfg.model.d_model, redundant=True
        )
        for i in range(L)
    ]
    for i, w in enumerate(workers):
        w.shadow = HeldShadow(copies[shadow_of(i, L)], cfg.optim, cfg.optim.lr)

    def fn(group):
        w = workers[group.rank]
        return [(w.run_step(group, step), w.commit(group, step))[1] for step in range(3)]

    results = run_ranks(L, fn, timeout_s=10)
    expected = [m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")]
    for r in results:
        assert not isinstance(r, Exception), r
        assert r == pytest.approx(expected, abs=1e-6)
    for i, w in enumerate(workers):
        holder = workers[(i - 1) % L]
        assert holder.shadow.index == i
        mine = full_state_tensors(w.stage, w.optimizer, w.lr)
        shadow = holder.shadow.state_tensors()
        assert len(mine) == len(shadow) and all(torch.equal(a, b) for a, b in zip(mine, shadow)), f"stage {i}"


def test_full_stage_state_round_trip_continues_bit_for_bit(tmp_path):
    """What a holder sends on fail-over (weights, Adam moments and step, learning rate) rebuilds a stage
    whose next optimizer step is identical to the original's."""
    import copy

    from checkfree.core.model import Stage
    from checkfree.core.redundancy import full_state_like, full_state_tensors, load_full_state
    from checkfree.core.stage_step import make_optimizer

    cfg = tiny_config(tmp_path)
    stage = build_stages(cfg.model, cfg.seed)[1]
    opt = make_optimizer(stage, cfg.optim, 1e-3)
    x = torch.randn(2, cfg.model.seq_len, cfg.model.d_model)
    for _ in range(2):
        stage.run_blocks(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    fresh = Stage(cfg.model, 1)
    fresh_opt = make_optimizer(fresh, cfg.optim, 5e-3)
    sent = full_state_tensors(stage, opt, 1e-3)
    assert [t.shape for t in sent] == [t.shape for t in full_state_like(fresh)]
    assert load_full_state(fresh, fresh_opt, [t.clone() for t in sent]) == 1e-3
    twin = copy.deepcopy(stage)
    for s, o in ((stage, opt), (fresh, fresh_opt)):
        s.run_blocks(x).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(stage.state_dict().values(), fresh.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(stage.state_dict().values(), twin.state_dict().values()))
    with pytest.raises(ValueError, match="expected"):
        load_full_state(fresh, fresh_opt, sent[:-2])


def test_redundant_worker_refuses_a_swapped_route(tmp_path):
    cfg = tiny_config(tmp_path, "recovery.strategy=redundant", "pipeline.swap=true")
    trainer = Trainer(cfg)
    with pytest.raises(ValueError, match="plain route"):
        StageWorker(
            build_stages(cfg.model, cfg.seed)[0],
            trainer.schedule,
            trainer.batches,
            cfg.optim,
            1e-3,
            cfg.model.d_model,
            redundant=True,
        )


@pytest.mark.parametrize("skip", [False, True])
def test_a_step_that_keeps_giving_non_finite_gradients_is_never_redone_forever(tmp_path, skip):
    """A NaN in stage 2's weights makes every run of every step non-finite. The swarm's training loop stops
    after optim.nonfinite_attempts runs of the step, naming it and the stages, or skips steps if asked to."""
    import math

    from checkfree.core.stage_step import NonFiniteSteps
    from checkfree.swarm.states import PeerStatus
    from checkfree.swarm.training import TrainingLoop

    cfg = tiny_config(tmp_path, "num_steps=3", "optim.nonfinite_attempts=2", f"optim.skip_nonfinite_steps={skip}")
    workers = _workers(cfg, Trainer(cfg))
    with torch.no_grad():
        next(workers[2].stage.parameters()).view(-1)[0] = math.nan
    events = [[] for _ in workers]

    class Rows:
        def write(self, row):
            pass

    def fn(group):
        log = lambda event, **f: events[group.rank].append((event, f))
        loop = TrainingLoop(cfg, 1, Rows(), None, log, None)
        status = PeerStatus(epoch=0, step=0, initial="running")
        loop.run(group, workers[group.rank], status, resumed=False)
        return status.step

    results = run_ranks(4, fn, timeout_s=10)
    if skip:
        assert results == [3, 3, 3, 3]  # every stage skipped the same steps
        skipped = [f["step"] for e, f in events[0] if e == "step_skipped"]
        assert skipped == [0, 1, 2]
    else:
        for r in results:
            assert isinstance(r, NonFiniteSteps) and "step 0" in str(r) and "2 runs" in str(r)
        assert "stages [" in str(results[0])
