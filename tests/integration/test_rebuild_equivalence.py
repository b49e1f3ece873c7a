"""The engine and the swarm rebuild a lost stage identically.

For every strategy and fallback path the same losses happen after the same training: the engine
(``Trainer.recover``) rebuilds from its own stages; the swarm side runs real stage workers on thread
ranks over gloo groups, epoch 0 with the swarm's training loop, then the leader's rule (``decide_epoch``)
and epoch 1 with the swarm's hand-over, where the survivors send and the new peers rebuild. The rebuilt
stages must be equal tensor for tensor: weights, Adam state, learning rate and starting norm.
"""

import time

import pytest
import torch

from checkfree.core.checkpoint import CheckpointStore
from checkfree.core.events import EVENTS
from checkfree.core.metrics import JsonLines
from checkfree.core.recovery import edge_replicas_on
from checkfree.engine.trainer import Trainer
from checkfree.swarm.coordinator import decide_epoch
from checkfree.swarm.handover import Handover
from checkfree.swarm.records import EpochRecord, Lineage, MemberRecord
from checkfree.swarm.states import PeerStatus
from checkfree.swarm.training import TrainingLoop
from tests.helpers import run_ranks, tiny_config

STEPS = 3  # trained before the loss; replicas refreshed at 0 and 2, checkpoints (where on) at 2
COMMON = ("recovery.edge_replica_every_steps=2",)
CASES = {
    # name: (strategy, lost stages, overrides, expected (method, path) per lost stage)
    "checkfree-middle": ("checkfree", [2], (), [("weighted_average", "primary")]),
    "checkfree-first": ("checkfree", [0], (), [("copy", "primary")]),
    "checkfree_plus-last": ("checkfree_plus", [3], (), [("copy", "primary")]),
    "checkfree_plus-first": ("checkfree_plus", [0], (), [("copy", "primary")]),
    "copy": ("copy", [1], (), [("copy", "primary")]),
    "uniform": ("uniform", [2], (), [("uniform_average", "primary")]),
    "random-middle": ("random", [1], (), [("random", "primary")]),
    "random-last": ("random", [3], (), [("random", "primary")]),
    "fallback-nearest": (
        "checkfree",
        [1, 2],
        ("recovery.adjacent_fallback=nearest",),
        [("weighted_average", "fallback:nearest")] * 2,
    ),
    "fallback-nearest-first-two": (
        "checkfree_plus",
        [0, 1],
        ("recovery.adjacent_fallback=nearest",),
        [("copy", "fallback:nearest")] * 2,
    ),
    "fallback-random": (
        "checkfree",
        [1, 2],
        ("recovery.adjacent_fallback=random",),
        [("random", "fallback:random"), ("random", "fallback:random")],
    ),
    "fallback-checkpoint": (
        "checkfree",
        [1, 2],
        ("recovery.adjacent_fallback=checkpoint", "checkpoint.every_steps=2"),
        [("checkpoint", "fallback:checkpoint"), ("checkpoint", "fallback:checkpoint")],
    ),
    "redundant-shadow": ("redundant", [2], (), [("shadow", "primary")]),
    "redundant-lost-holder": (
        "redundant",
        [1, 2],
        ("recovery.adjacent_fallback=nearest",),
        [("shadow", "primary"), ("weighted_average", "fallback:nearest")],
    ),
    "checkpoint-rollback": ("checkpoint", [2], ("checkpoint.every_steps=2",), None),
}


def _engine(tmp_path, strategy, lost, overrides):
    cfg = tiny_config(tmp_path / "engine", f"recovery.strategy={strategy}", f"num_steps={STEPS}", *COMMON, *overrides)
    trainer = Trainer(cfg)
    trainer.run()
    trainer.recover(lost)
    return trainer


def _member(pid, stage, state, step, epoch):
    lineage = Lineage(kind="none" if state == "spare" else "initial")  # the survivors trained from the seed
    return MemberRecord(
        run_id="eq", fingerprint="fp", peer_id=pid, stage=stage, epoch=epoch, state=state, step=step, lineage=lineage
    )


def _swarm(tmp_path, strategy, lost, overrides):
    cfg = tiny_config(tmp_path / "swarm", f"recovery.strategy={strategy}", f"num_steps={STEPS}", *COMMON, *overrides)
    L = cfg.model.num_stages
    trainer = Trainer(cfg)  # only for its schedule and batches, shared read-only by the ranks
    ckpt = CheckpointStore(cfg.run_dir / "checkpoints", L, keep=1 << 30) if cfg.checkpoint.every_steps else None
    events: list[dict] = []

    def handover_for(rank):
        return Handover(
            cfg,
            trainer.schedule,
            trainer.batches,
            torch.device("cpu"),
            ckpt,
            lambda event, **f: events.append({"event": event, "rank": rank, **f}),
        )

    roster0 = [f"p{s}" for s in range(L)]
    rec0 = EpochRecord(
        run_id="eq",
        fingerprint="fp",
        epoch=0,
        roster=roster0,
        store_host="",
        store_port=0,
        step=0,
        leader="p0",
        time=time.time(),
    )
    tokens = trainer.tokens_per_step

    def epoch0(group):
        h = handover_for(group.rank)
        worker, step = h.run(group, None, rec0, 0)
        metrics = JsonLines(cfg.run_dir / f"metrics-{group.rank}.jsonl")
        loop = TrainingLoop(cfg, tokens, metrics, ckpt, h.emit, h.exchange_replicas if h.replicas_on else None)
        loop.run(group, worker, PeerStatus(epoch=0, step=step, initial="running"), resumed=False)
        return worker

    workers = run_ranks(L, epoch0, timeout_s=10)
    assert all(not isinstance(w, Exception) for w in workers), workers

    # the leader's rule decides epoch 1 from the survivors' reports and two spares
    members = {pid: _member(pid, s, "recovering", STEPS, 0) for s, pid in enumerate(roster0) if s not in lost}
    members.update({f"spare{k}": _member(f"spare{k}", -1, "spare", 0, -1) for k in range(len(lost))})
    decision = decide_epoch(
        members,
        rec0,
        L,
        cfg.recovery.strategy,
        cfg.recovery.adjacent_fallback,
        checkpoint_step=ckpt.latest_complete() if ckpt else None,
        has_checkpoint=lambda s: ckpt is not None and ckpt.latest_for_stage(s) is not None,
        replicas_on=edge_replicas_on(cfg.recovery),
    )
    assert decision.roster is not None, decision.reason
    rec1 = EpochRecord(
        run_id="eq",
        fingerprint="fp",
        epoch=1,
        roster=decision.roster,
        store_host="",
        store_port=0,
        step=decision.step,
        leader="p0",
        lost=list(decision.lost),
        plans=list(decision.plans),
        rollback_to=decision.rollback_to,
        time=time.time(),
    )

    def epoch1(group):
        worker = None if group.rank in lost else workers[group.rank]
        return handover_for(group.rank).run(group, worker, rec1, STEPS)

    results = run_ranks(L, epoch1, timeout_s=10, epoch=1)
    assert all(not isinstance(r, Exception) for r in results), results
    return [w for w, _ in results], [step for _, step in results], events


def _optimizer_tensors(optimizer):
    state = optimizer.state_dict()["state"]
    return {(i, k): v for i, s in state.items() for k, v in s.items()}


def _assert_same_stage(engine, index, worker):
    for (key, a), b in zip(worker.stage.state_dict().items(), engine.stages[index].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"stage {index} {key}: max diff {(a - b).abs().max()}"
    ours, theirs = _optimizer_tensors(worker.optimizer), _optimizer_tensors(engine.optimizers[index])
    assert ours.keys() == theirs.keys(), f"stage {index}: optimizer state keys differ"
    for k in ours:
        assert torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-6, rtol=0), f"stage {index} optimizer {k}"
    assert worker.lr == pytest.approx(engine.lrs[index], rel=1e-12)
    assert worker.optimizer.param_groups[0]["lr"] == pytest.approx(engine.lrs[index], rel=1e-12)
    assert worker.grad_norm_raw == pytest.approx(engine.grad_norm_raw[index], rel=1e-5)
    smoothed = engine.grad_norm_smoothed[index]
    assert worker.grad_norm_smoothed == (None if smoothed is None else pytest.approx(smoothed, rel=1e-5))


@pytest.mark.parametrize("case", list(CASES))
def test_engine_and_swarm_rebuild_the_same_stage(tmp_path, case):
    strategy, lost, overrides, expected = CASES[case]
    trainer = _engine(tmp_path, strategy, lost, overrides)
    workers, steps, swarm_events = _swarm(tmp_path, strategy, lost, overrides)
    from checkfree.core.metrics import read_jsonl

    engine_events = read_jsonl(trainer.run_dir / "events.jsonl")
    if expected is None:  # checkpoint: every stage rolled back to the last complete checkpoint
        (rolled,) = [e for e in engine_events if e["event"] == "rolled_back"]
        assert steps == [rolled["to_step"]] * 4 == [2] * 4
        assert sum(e["event"] == "rolled_back" for e in swarm_events) == 4
        compared = range(4)
    else:
        engine_rebuilt = [e for e in engine_events if e["event"] == "rebuilt"]
        swarm_rebuilt = sorted((e for e in swarm_events if e["event"] == "rebuilt"), key=lambda e: e["stage"])
        assert [(e["method"], e["path"]) for e in engine_rebuilt] == expected
        for ours, theirs in zip(swarm_rebuilt, engine_rebuilt, strict=True):
            for key in EVENTS["rebuilt"].required:
                if key in ("weights", "source_norms", "lr"):
                    assert ours[key] == pytest.approx(theirs[key], rel=1e-5), f"rebuilt event field {key}"
                elif key != "duration_s":
                    assert ours[key] == theirs[key], f"rebuilt event field {key}"
        assert steps == [STEPS] * 4
        compared = lost
    for i in compared:
        _assert_same_stage(trainer.engine, i, workers[i])
