"""The hand-over's own failure paths: a peer whose join broke off before it held weights, a rollback to a
checkpoint nobody can read."""

import time

import pytest
import torch

from checkfree.core.checkpoint import CheckpointStore
from checkfree.core.model import build_stages
from checkfree.engine.trainer import Trainer
from checkfree.swarm.coordinator import PeerCannotServe, SwarmStopped
from checkfree.swarm.handover import Handover
from checkfree.swarm.records import EpochRecord
from tests.helpers import run_ranks, tiny_config


def _record(epoch, step, **kw):
    roster = [f"p{s}" for s in range(4)]
    return EpochRecord(
        run_id="h",
        fingerprint="fp",
        epoch=epoch,
        roster=roster,
        store_host="",
        store_port=0,
        step=step,
        leader="p0",
        time=time.time(),
        **kw,
    )


class _Group:  # what the hand-over reads of a group before it talks to anyone
    def __init__(self, stage):
        self.stage = stage


def _handover(cfg, ckpt=None, stop_swarm=None, trainer=None):
    trainer = trainer or Trainer(cfg)  # for its schedule and batches
    return Handover(
        cfg, trainer.schedule, trainer.batches, torch.device("cpu"), ckpt, lambda *a, **k: None, stop_swarm=stop_swarm
    )


def test_peers_whose_first_join_broke_off_start_from_the_initial_state_in_the_next_epoch(tmp_path):
    """Before any step is committed the initial state is a pure function of the seed: stage peers that never
    held weights (their epoch-0 rendezvous failed) join epoch 1 at step 0 with it."""
    cfg = tiny_config(tmp_path)
    rec, trainer = _record(1, 0), Trainer(cfg)
    results = run_ranks(4, lambda g: _handover(cfg, trainer=trainer).run(g, None, rec, 0), timeout_s=10, epoch=1)
    reference = build_stages(cfg.model, cfg.seed)
    for i, (worker, step) in enumerate(results):
        assert step == 0 and worker.index == i
        assert all(
            torch.equal(a, b) for a, b in zip(worker.stage.state_dict().values(), reference[i].state_dict().values())
        )


def test_a_peer_without_trained_weights_is_never_resumed_past_step_zero(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(PeerCannotServe, match="resumes stage 2 at step 5 on this peer, which holds no trained"):
        _handover(cfg).run(_Group(2), None, _record(3, 5), 0)


def test_a_rollback_nobody_can_read_stops_the_whole_swarm(tmp_path):
    cfg = tiny_config(tmp_path, "recovery.strategy=checkpoint", "checkpoint.every_steps=2")
    stopped = []

    def stop_swarm(rec, reason):
        stopped.append((rec.epoch, reason))
        raise SwarmStopped(reason)

    ckpt = CheckpointStore(tmp_path / "empty", 4)
    with pytest.raises(SwarmStopped, match="stage 1 cannot roll back to step 4"):
        _handover(cfg, ckpt, stop_swarm).run(_Group(1), None, _record(2, 4, rollback_to=4), 6)
    assert stopped and stopped[0][0] == 2 and "cannot load checkpoint" in stopped[0][1]


def test_a_peer_whose_first_join_broke_off_serves_as_a_source_at_step_zero(tmp_path):
    """Stage peers whose epoch-0 rendezvous failed hold no worker yet; when the next epoch (still at step 0)
    rebuilds stage 2, stages 1 and 3 must send their initial weights (this crashed with AttributeError)."""
    cfg = tiny_config(tmp_path, "recovery.strategy=uniform")
    trainer = Trainer(cfg)
    plan = {"stage": 2, "method": "uniform_average", "sources": [1, 3], "path": "primary", "edge": None}
    rec = _record(1, 0, lost=[2], plans=[plan])
    results = run_ranks(4, lambda g: _handover(cfg, trainer=trainer).run(g, None, rec, 0), timeout_s=10, epoch=1)
    assert all(not isinstance(r, Exception) for r in results), results
    initial = build_stages(cfg.model, cfg.seed)
    rebuilt = results[2][0].stage.state_dict()
    for key, value in rebuilt.items():
        expected = (initial[1].state_dict()[key] + initial[3].state_dict()[key]) / 2
        assert torch.allclose(value, expected, atol=1e-7), key


def test_a_replica_holder_whose_first_join_broke_off_still_sends_the_embedding(tmp_path):
    """Stage 1 holds the embedding's replica; when its epoch-0 join broke off before the replicas were
    exchanged and stage 0 is lost at step 0, it sends the initial embedding (this crashed: no replica)."""
    cfg = tiny_config(tmp_path, "recovery.strategy=checkfree_plus")
    trainer = Trainer(cfg)
    plan = {"stage": 0, "method": "copy", "sources": [1], "path": "primary", "edge": "replica"}
    rec = _record(1, 0, lost=[0], plans=[plan])
    results = run_ranks(4, lambda g: _handover(cfg, trainer=trainer).run(g, None, rec, 0), timeout_s=10, epoch=1)
    assert all(not isinstance(r, Exception) for r in results), results
    initial = build_stages(cfg.model, cfg.seed)
    assert torch.equal(results[0][0].stage.embed.weight, initial[0].embed.weight)
    taken_at, replica = results[1][0].replica  # refreshed by the exchange at the end of the join
    assert taken_at == 0 and torch.equal(replica["embed.weight"], initial[0].embed.weight)
