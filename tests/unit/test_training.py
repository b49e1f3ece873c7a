"""Integration tests of the single-process engine on a tiny model: failures in every phase and at
first, middle and last stages, adjacent failures, checkpoint rollback, trace replay, equivalence."""

import copy
import json
import math

import pytest
import torch

from checkfree.core.failures import Failure, write_trace
from checkfree.core.metrics import read_jsonl
from checkfree.engine.trainer import RunDirError, Trainer
from tests.helpers import tiny_config


def _run(tmp_path, *overrides, failures=(), name="run"):
    args = [f"run_name={name}", *overrides]
    if failures:
        trace = tmp_path / f"{name}-in.jsonl"
        write_trace(trace, list(failures), 4)
        args += ["failures.mode=trace", f"failures.trace_path={trace}"]
    trainer = Trainer(tiny_config(tmp_path, *args))
    summary = trainer.run()
    run_dir = trainer.run_dir
    return trainer, summary, read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "events.jsonl")


def _of(events, kind):
    return [e for e in events if e["event"] == kind]


def _assert_every_step_once(metrics, num_steps):
    assert [m["step"] for m in metrics] == list(range(num_steps))
    assert all(math.isfinite(m["loss/train"]) for m in metrics)


@pytest.mark.parametrize("phase", ["before_forward", "mid_forward", "mid_backward"])
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_failure_in_each_phase_and_stage_is_recovered(tmp_path, phase, stage):
    trainer, summary, metrics, events = _run(tmp_path, "num_steps=6", failures=[Failure(3, stage, phase, 0.5)])
    _assert_every_step_once(metrics, 6)
    assert summary["iterations"] == 7 and summary["failures"] == 1 and summary["recoveries"] == 1
    (fail,) = _of(events, "failure")
    assert (fail["stage"], fail["phase"], fail["step"]) == (stage, phase, 3)
    (discarded,) = [e for e in _of(events, "step_discarded") if e["reason"] == "stage lost"]
    assert discarded["step"] == 3
    (rec,) = _of(events, "rebuilt")
    expected = {0: ("copy", [1], "replica"), 1: ("weighted_average", [0, 2], None), 3: ("copy", [2], "replica")}[stage]
    assert (rec["method"], rec["sources"], rec["edge"], rec["path"]) == (*expected, "primary")
    assert rec["strategy"] == "checkfree_plus"
    lr = trainer.cfg.optim.lr
    assert trainer.engine.lrs == [lr * 1.1 if i == stage else lr for i in range(4)]
    assert metrics[-1][f"stage/{stage}/lr"] == pytest.approx(lr * 1.1)
    for s in trainer.engine.stages:
        assert all(torch.isfinite(p).all() for p in s.parameters())


def test_adjacent_failures_take_the_nearest_live_fallback(tmp_path):
    _, summary, metrics, events = _run(
        tmp_path,
        "num_steps=5",
        "recovery.strategy=checkfree",
        "recovery.adjacent_fallback=nearest",
        failures=[Failure(2, 1, "mid_forward", 0.3), Failure(2, 2, "mid_backward", 0.6)],
    )
    _assert_every_step_once(metrics, 5)
    recs = _of(events, "rebuilt")
    assert [(r["stage"], r["sources"], r["path"]) for r in recs] == [
        (1, [0, 3], "fallback:nearest"),
        (2, [0, 3], "fallback:nearest"),
    ]
    assert summary["recoveries"] == 2


def test_adjacent_failures_prefer_a_checkpoint(tmp_path):
    trainer, _, metrics, events = _run(
        tmp_path,
        "num_steps=6",
        "checkpoint.every_steps=2",
        failures=[Failure(3, 0, "before_forward", 0.0), Failure(3, 1, "before_forward", 0.0)],
    )
    _assert_every_step_once(metrics, 6)
    recs = _of(events, "rebuilt")
    assert [(r["stage"], r["method"], r["path"], r["edge"]) for r in recs] == [
        (0, "checkpoint", "fallback:checkpoint", "checkpoint"),
        (1, "checkpoint", "fallback:checkpoint", None),
    ]
    assert recs[0]["edge_staleness_steps"] == 1  # saved after step 2, lost while running step 3


def test_first_stage_and_its_partner_lost_without_checkpoint(tmp_path):
    _, _, metrics, events = _run(
        tmp_path, "num_steps=4", failures=[Failure(1, 0, "mid_forward", 0.5), Failure(1, 1, "mid_forward", 0.5)]
    )
    _assert_every_step_once(metrics, 4)
    rec0 = _of(events, "rebuilt")[0]
    # stage 1 (swap partner and embedding-replica holder) is gone too: nearest live is stage 2, embedding re-initialised
    assert (rec0["path"], rec0["sources"], rec0["edge"]) == ("fallback:nearest", [2], "reinit")


def test_weights_come_from_pre_clip_norms(tmp_path):
    trainer, _, metrics, events = _run(
        tmp_path,
        "num_steps=4",
        "optim.grad_clip=0.01",
        "recovery.strategy=checkfree",
        failures=[Failure(2, 2, "before_forward", 0.0)],
    )
    (rec,) = _of(events, "rebuilt")
    before = metrics[1]  # the last committed step before the failure
    n1, n3 = before["stage/1/grad_norm_raw"], before["stage/3/grad_norm_raw"]
    assert n1 > 0.05 and n3 > 0.05  # far above the clip: post-clip norms would all be 0.01
    assert rec["source_norms"] == pytest.approx([n1, n3])
    eps = trainer.cfg.recovery.eps
    assert rec["weights"] == pytest.approx([(n1 + eps) / (n1 + n3 + 2 * eps), (n3 + eps) / (n1 + n3 + 2 * eps)])


def test_rebuild_quality_against_random_reinit(tmp_path):
    """One trained snapshot, each stage lost in turn, rebuilt by CheckFree+ and by random re-init.

    First/last stage: copying the swap partner plus the replicated embedding/head keeps the model
    working while random re-initialisation destroys it. Middle stage: on models this small the
    weighted average and a random (near-identity) block cost about the same right after the rebuild
    (measured; see the closing note of issue 2), so the test only bounds the damage there.
    """
    trainer, _, metrics, _ = _run(tmp_path, "num_steps=150", "optim.lr=3e-3", "data.num_val_batches=4")
    trained = trainer.engine.evaluate(4)
    snapshot = copy.deepcopy(trainer.engine)
    after = {}
    for strategy in ("checkfree_plus", "random"):
        for stage in range(4):
            trainer.engine = copy.deepcopy(snapshot)
            trainer.cfg.recovery.strategy = strategy
            trainer.recover([stage])
            after[strategy, stage] = trainer.engine.evaluate(4)
    for stage in (0, 3):
        assert after["checkfree_plus", stage] < after["random", stage] - 1.0
    for stage in (1, 2):
        assert trained < after["checkfree_plus", stage] < trained + 0.5
    assert all(math.isfinite(v) for v in after.values())


def test_checkpoint_strategy_rolls_back_and_redoes_exactly(tmp_path):
    _, summary, metrics, events = _run(
        tmp_path,
        "num_steps=8",
        "recovery.strategy=checkpoint",
        "checkpoint.every_steps=3",
        failures=[Failure(7, 2, "mid_backward", 0.5)],
    )
    (rb,) = _of(events, "rolled_back")
    assert (rb["step"], rb["to_step"], rb["lost_steps"]) == (7, 6, 1)
    assert rb["restore_s"] > 0 and all(e["save_s"] > 0 for e in _of(events, "checkpoint_save"))
    steps = [m["step"] for m in metrics]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 6, 7]  # rolled back to the state before step 6, which is redone
    assert metrics[6]["loss/train"] == metrics[7]["loss/train"]  # same weights, same data: same loss
    assert summary["steps"] == 8


def test_trace_replay_reproduces_the_run(tmp_path):
    common = ["num_steps=12", "failures.mode=per_step", "failures.per_step_prob=0.08", "failures.seed=5"]
    _, s1, m1, e1 = _run(tmp_path, *common, name="first")
    assert s1["failures"] >= 2
    trace = tmp_path / "first" / "trace.jsonl"
    _, s2, m2, e2 = _run(tmp_path, "num_steps=12", "failures.mode=trace", f"failures.trace_path={trace}", name="replay")
    assert [m["loss/train"] for m in m1] == [m["loss/train"] for m in m2]
    assert [(e["stage"], e["phase"]) for e in _of(e1, "failure")] == [
        (e["stage"], e["phase"]) for e in _of(e2, "failure")
    ]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_engine_matches_the_unsplit_model(tmp_path, schedule):
    """Same init, data and optimizer maths: the pipeline is an exact re-arrangement of one model."""
    trainer, _, metrics, _ = _run(
        tmp_path, "num_steps=4", "optim.grad_clip=0", "recovery.strategy=none", f"pipeline.schedule={schedule}"
    )
    import torch.nn.functional as F

    from checkfree.core.model import build_stages

    cfg = trainer.cfg
    (whole,) = build_stages(cfg.model, cfg.seed, num_stages=1)
    opt = torch.optim.Adam(
        whole.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps
    )
    M = cfg.pipeline.num_microbatches
    for step in range(4):
        total = 0.0
        for mb in range(M):
            logits = whole.run_head(whole.run_blocks(whole.run_embed(trainer.batches.inputs(step, mb))))
            loss = F.cross_entropy(logits.flatten(0, 1), trainer.batches.targets(step, mb).flatten()) / M
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        assert total == pytest.approx(metrics[step]["loss/train"], abs=1e-5)


def test_run_directory_contents(tmp_path):
    trainer, summary, metrics, events = _run(
        tmp_path, "num_steps=3", "eval_every_steps=2", failures=[Failure(1, 2, "mid_forward", 0.1)]
    )
    d = trainer.run_dir
    for f in ("config.yaml", "metrics.jsonl", "events.jsonl", "trace.jsonl", "summary.json"):
        assert (d / f).is_file(), f
    assert "loss/val" in metrics[1] and "loss/val" in metrics[2] and "loss/val" not in metrics[0]
    assert json.loads((d / "summary.json").read_text())["steps"] == 3
    rec = metrics[0]
    for key in (
        "throughput/tokens_per_s",
        "time/train_s",
        "stage/3/grad_norm_raw",
        "stage/3/grad_norm_smoothed",
        "stage/0/lr",
    ):
        assert key in rec
    with pytest.raises(RunDirError, match="the run saved in .* was trained with another config"):
        Trainer(tiny_config(tmp_path, "run_name=run"))


def test_redundant_strategy_fails_over_with_no_loss_of_quality(tmp_path):
    """Shadows trained alongside their stages are exact copies: a run with failures (any stage, any
    phase) reproduces the failure-free run's losses, and the shadow costs a second copy of every stage."""
    common = ["num_steps=8", "recovery.strategy=redundant", "recovery.lr_factor=1.5"]
    _, ref, m_ref, _ = _run(tmp_path, *common, name="ref")
    fails = [
        Failure(2, 0, "mid_backward", 0.5),
        Failure(5, 2, "mid_forward", 0.5),
        Failure(7, 3, "before_forward", 0.0),
    ]
    trainer, summary, m_fail, events = _run(tmp_path, *common, failures=fails, name="fail")
    assert [m["loss/train"] for m in m_fail] == pytest.approx([m["loss/train"] for m in m_ref], abs=1e-6)
    recs = _of(events, "rebuilt")
    assert [(r["stage"], r["method"], r["sources"]) for r in recs] == [
        (0, "shadow", [3]),
        (2, "shadow", [1]),
        (3, "shadow", [2]),
    ]
    assert trainer.engine.lrs == [trainer.cfg.optim.lr] * 4  # no raised learning rate: nothing was lost
    assert summary["memory/shadow_param_bytes"] == summary["memory/param_bytes"]
    for t, shadow in enumerate(trainer.engine.shadows.stages):  # shadows re-made and in step with their stages
        for a, b in zip(shadow.parameters(), trainer.engine.stages[t].parameters()):
            assert torch.equal(a, b)


def test_redundant_with_a_lost_shadow_holder_falls_back(tmp_path):
    _, _, metrics, events = _run(
        tmp_path,
        "num_steps=4",
        "recovery.strategy=redundant",
        "recovery.adjacent_fallback=nearest",
        failures=[Failure(1, 1, "mid_forward", 0.5), Failure(1, 2, "mid_forward", 0.5)],
    )
    _assert_every_step_once(metrics, 4)
    recs = _of(events, "rebuilt")
    # stage 1's shadow lived on stage 0: failover; stage 2's shadow lived on stage 1, lost too: fallback
    assert [(r["stage"], r["method"], r["path"]) for r in recs] == [
        (1, "shadow", "primary"),
        (2, "weighted_average", "fallback:nearest"),
    ]


@pytest.mark.parametrize("skip", [False, True])
def test_the_engine_stops_or_skips_a_step_that_keeps_giving_non_finite_gradients(tmp_path, skip):
    import math

    from checkfree.core.metrics import read_jsonl
    from checkfree.core.stage_step import NonFiniteSteps

    cfg = tiny_config(tmp_path, "num_steps=3", "optim.nonfinite_attempts=2", f"optim.skip_nonfinite_steps={skip}")
    trainer = Trainer(cfg)
    with torch.no_grad():
        next(trainer.engine.stages[2].parameters()).view(-1)[0] = math.nan
    if not skip:
        with pytest.raises(NonFiniteSteps, match=r"step 0 gave non-finite gradients on stages \[.*2.*\] in 2 runs"):
            trainer.run()
        return
    trainer.run()
    events = read_jsonl(trainer.run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "step_skipped"] == [0, 1, 2]
    assert sum(e["event"] == "step_discarded" for e in events) == 6
