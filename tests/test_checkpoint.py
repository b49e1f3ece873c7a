"""Checkpoint store: complete steps only, and the emulated storage throughput."""

import pytest
import torch

import checkfree.core.checkpoint as ckpt_mod
from checkfree.core.checkpoint import CheckpointConfig, CheckpointStore


def test_emulated_storage_makes_saves_and_loads_wait_for_their_size(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(ckpt_mod.time, "sleep", waits.append)
    store = CheckpointStore(tmp_path, num_stages=2, storage_mb_s=4.0)
    payload = {"w": torch.zeros(1_000_000)}  # 4 MB of float32: one second at 4 MB/s
    store.save_stage(3, 0, payload)
    assert store.complete_steps() == []  # stage 1 has not saved step 3
    store.save_stage(3, 1, payload)
    assert store.latest_complete() == 3
    assert torch.equal(store.load_stage(3, 1)["w"], payload["w"])
    assert len(waits) == 3 and all(0.5 < w <= 1.01 for w in waits)  # what is left of ~1.0 s after the real I/O

    monkeypatch.setattr(ckpt_mod.time, "sleep", lambda s: pytest.fail("no emulation asked for, no wait"))
    CheckpointStore(tmp_path / "plain", num_stages=1).save_stage(0, 0, payload)


def test_negative_storage_throughput_is_refused():
    with pytest.raises(ValueError, match="checkpoint.storage_mb_s=-1"):
        CheckpointConfig(storage_mb_s=-1)
