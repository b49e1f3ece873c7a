"""Checkpoint store: one payload for both executors, complete steps only, safe loads, and the emulated
storage throughput."""

import pytest
import torch

import checkfree.core.checkpoint as ckpt_mod
from checkfree.core.checkpoint import CheckpointConfig, CheckpointStore, StagePayload


def _payload(stage: int, step: int, numel: int = 10) -> StagePayload:
    w = torch.zeros(numel)
    opt = torch.optim.Adam([torch.nn.Parameter(w.clone())])
    return StagePayload(
        stage=stage,
        step=step,
        model={"w": w},
        optim=opt.state_dict(),
        lr=1e-3,
        grad_norm_raw=0.5,
        grad_norm_smoothed=None,
    )


def test_emulated_storage_makes_saves_and_loads_wait_for_their_size(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(ckpt_mod.time, "sleep", waits.append)
    monkeypatch.setattr(ckpt_mod.time, "perf_counter", lambda: 0.0)  # the real I/O takes no time: no load flake
    store = CheckpointStore(tmp_path, num_stages=2, storage_mb_s=4.0)
    numel = 1_000_000  # 4 MB of float32: one second at 4 MB/s
    store.save_stage(_payload(0, 3, numel))
    assert store.complete_steps() == []  # stage 1 has not saved step 3
    store.save_stage(_payload(1, 3, numel))
    assert store.latest_complete() == 3
    loaded = store.load_stage(3, 1)
    assert torch.equal(loaded.model["w"], torch.zeros(numel)) and loaded.lr == 1e-3 and loaded.grad_norm_raw == 0.5
    assert len(waits) == 3 and all(0.99 < w <= 1.01 for w in waits)  # 4 MB at 4 MB/s, real I/O taking no time

    monkeypatch.setattr(ckpt_mod.time, "sleep", lambda s: pytest.fail("no emulation asked for, no wait"))
    CheckpointStore(tmp_path / "plain", num_stages=1).save_stage(_payload(0, 0))


def test_a_payload_round_trips_with_its_optimizer_state(tmp_path):
    store = CheckpointStore(tmp_path, num_stages=1)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.sum().backward()
    opt.step()
    store.save_stage(StagePayload(0, 5, {"p": p.detach()}, opt.state_dict(), 0.1, 2.0, 1.5))
    got = store.load_stage(5, 0)
    assert torch.equal(got.optim["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert (got.step, got.grad_norm_smoothed) == (5, 1.5)


def test_a_file_that_is_not_a_stage_payload_is_refused_by_name(tmp_path):
    store = CheckpointStore(tmp_path, num_stages=1)
    (tmp_path / "step_00000002").mkdir()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "step_00000002" / "stage_0.pt")
    with pytest.raises(RuntimeError, match=r"stage_0.pt is not a stage checkpoint: holds \['weights'\]"):
        store.load_stage(2, 0)


class Foreign:
    """Any class a pickle could name: loading it would run its module's code."""


def test_a_pickled_object_is_never_unpickled(tmp_path):
    """Loads use weights_only=True: a checkpoint that would run code when read is refused."""
    store = CheckpointStore(tmp_path, num_stages=1)
    (tmp_path / "step_00000001").mkdir()
    torch.save({"model": Foreign()}, tmp_path / "step_00000001" / "stage_0.pt")
    with pytest.raises(RuntimeError, match="cannot load checkpoint .*stage_0.pt"):
        store.load_stage(1, 0)


def test_a_payload_of_another_stage_or_step_is_refused(tmp_path):
    store = CheckpointStore(tmp_path, num_stages=2)
    store.save_stage(_payload(1, 4))
    (tmp_path / "step_00000004" / "stage_1.pt").rename(tmp_path / "step_00000004" / "stage_0.pt")
    with pytest.raises(RuntimeError, match="holds stage 1 at step 4, expected stage 0 at step 4"):
        store.load_stage(4, 0)


def test_negative_storage_throughput_is_refused():
    with pytest.raises(ValueError, match="checkpoint.storage_mb_s=-1"):
        CheckpointConfig(storage_mb_s=-1)
