"""Checkpoint store: one payload for both executors, complete steps only, safe loads, and the emulated
storage throughput, on a local path or any fsspec URL (file://, memory://; S3 in
tests/integration/test_checkpoint_s3.py)."""

import importlib.util
import io
import uuid

import fsspec
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


def test_storage_options_must_be_a_mapping():
    with pytest.raises(ValueError, match="checkpoint.storage_options must be a mapping .* got list"):
        CheckpointConfig(storage_options=["key", "secret"])
    with pytest.raises(
        ValueError, match=r"checkpoint.storage_options must have string keys, got keys of type \['int'\]"
    ):
        CheckpointConfig(storage_options={1: "x"})
    assert CheckpointConfig().storage_options == {}


def test_a_save_that_fails_names_the_file(tmp_path):
    store = CheckpointStore(tmp_path, num_stages=1)
    (tmp_path / "step_00000003").write_bytes(b"")  # a file where the step's folder belongs
    with pytest.raises(OSError, match=r"cannot save checkpoint .*step_00000003/stage_0\.pt"):
        store.save_stage(_payload(0, 3))


@pytest.fixture
def memory_url(request):
    """A fresh ``memory://`` store root; the memory filesystem is global to the process, so it is emptied after."""
    root = f"/checkfree-test/{uuid.uuid4().hex}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    for f in fs.find(root):
        fs.rm_file(f)


@pytest.fixture(params=["file", "memory"])
def url(request, tmp_path):
    return tmp_path.as_uri() + "/store" if request.param == "file" else request.getfixturevalue("memory_url")


def test_a_store_given_a_url_saves_lists_loads_and_prunes(url):
    store = CheckpointStore(url, num_stages=2, keep=1)
    assert (store.complete_steps(), store.latest_complete(), store.latest_for_stage(0)) == ([], None, None)
    for step in (2, 4):
        for stage in (0, 1):
            store.save_stage(_payload(stage, step))
    store.save_stage(_payload(0, 6))  # stage 1 never saves step 6
    assert store.complete_steps() == [2, 4] and store.latest_for_stage(0) == 6 and store.latest_for_stage(1) == 4
    got = store.load_stage(4, 1)
    assert (got.stage, got.step, got.lr) == (1, 4, 1e-3) and torch.equal(got.model["w"], torch.zeros(10))

    store.prune()
    assert store.complete_steps() == [4] and store.latest_for_stage(0) == 6  # an incomplete step is never pruned
    assert not store.fs.exists(f"{store.path}/step_00000002")
    with pytest.raises(RuntimeError, match=r"cannot load checkpoint .*step_00000002/stage_0\.pt"):
        store.load_stage(2, 0)


def test_pruning_a_root_named_like_a_glob_pattern_deletes_only_its_own_steps(memory_url):
    mine, other = CheckpointStore(f"{memory_url}/run[12]", 1, keep=1), CheckpointStore(f"{memory_url}/run1", 1, keep=1)
    for step in (1, 2):
        mine.save_stage(_payload(0, step))
    other.save_stage(_payload(0, 1))
    mine.prune()
    assert (mine.complete_steps(), other.complete_steps()) == ([2], [1])


def test_a_second_store_on_the_same_url_sees_the_first_ones_saves(memory_url):
    a, b = CheckpointStore(memory_url, num_stages=2), CheckpointStore(memory_url, num_stages=2)
    a.save_stage(_payload(0, 3))
    assert b.complete_steps() == [] and b.latest_for_stage(0) == 3
    b.save_stage(_payload(1, 3))
    assert a.latest_complete() == 3


def test_a_step_missing_a_stage_or_holding_only_a_torn_temporary_file_is_not_complete(tmp_path):
    store = CheckpointStore(tmp_path, num_stages=2)
    store.save_stage(_payload(0, 1))
    (tmp_path / "step_00000001" / ".stage_1.pt.0123abcd.tmp").write_bytes(b"half a checkpoint")  # a crash mid-save
    assert store.complete_steps() == [] and store.latest_for_stage(1) is None
    assert [p.name for p in (tmp_path / "step_00000001").iterdir() if p.name.endswith(".tmp")] == [
        ".stage_1.pt.0123abcd.tmp"
    ]  # the store's own save left no temporary file behind


def test_a_corrupt_file_on_a_url_is_refused_by_its_url(memory_url):
    store = CheckpointStore(memory_url, num_stages=1)
    store.fs.pipe_file(f"{store.path}/step_00000007/stage_0.pt", b"not a zip archive")
    with pytest.raises(RuntimeError, match=r"cannot load checkpoint memory://.*step_00000007/stage_0\.pt"):
        store.load_stage(7, 0)
    buf = io.BytesIO()
    torch.save(
        {**{f: 0 for f in ("stage", "step", "lr", "grad_norm_raw", "grad_norm_smoothed")}, "model": 1, "optim": {}}, buf
    )
    store.fs.pipe_file(f"{store.path}/step_00000008/stage_0.pt", buf.getvalue())
    with pytest.raises(
        RuntimeError, match=r"step_00000008/stage_0\.pt is not a stage checkpoint: wrong types \(model: int\)"
    ):
        store.load_stage(8, 0)


def test_a_url_whose_protocol_is_unknown_or_not_installed_is_refused_by_name():
    with pytest.raises(ValueError, match=r"checkpoint storage 'nosuchfs://bucket/run': Protocol not known: nosuchfs"):
        CheckpointStore("nosuchfs://bucket/run", num_stages=1)
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: gs:// has an implementation here")
    with pytest.raises(ValueError, match=r"'gs://bucket/run': .* needs the package 'gcsfs', .*pip install gcsfs"):
        CheckpointStore("gs://bucket/run", num_stages=1)


def test_a_rollback_drops_the_abandoned_timeline_so_no_step_mixes_two(tmp_path):
    """Stage 1 saved step 8 before the loss, stage 0 did not; the swarm rolls back to 4. Were stage 1's old
    file of step 8 kept, stage 0's new one would make step 8 look complete with two timelines in it."""
    store = CheckpointStore(tmp_path / "ckpt", num_stages=2)
    for step, stages in ((4, (0, 1)), (8, (1,))):
        for s in stages:
            store.save_stage(_payload(s, step))
    assert store.drop_after(1, 4) == [8] and store.drop_after(0, 4) == []
    store.save_stage(_payload(0, 8))  # the new timeline's step 8, stage 0 first
    assert store.latest_complete() == 4 and store.latest_for_stage(1) == 4


def test_a_write_finished_after_a_rollback_by_a_peer_frozen_across_it_never_completes_a_step(tmp_path):
    """Stage 1's peer was frozen (SIGSTOP) mid-write of step 8 while the swarm rolled back to step 4 in epoch 5
    and deleted the old timeline's files; it wakes and finishes the write. The new timeline's stage 0 writes
    step 8: the step must not look complete with stage 1's old file, and once stage 1's new holder writes
    it, the new file is the one loaded."""
    store, frozen = CheckpointStore(tmp_path / "ckpt", num_stages=2), CheckpointStore(tmp_path / "ckpt", num_stages=2)
    for s in (0, 1):
        store.save_stage(_payload(s, 4))
    old = _payload(1, 8)
    old.lr = 0.5  # tells the files apart
    store.rollbacks = [(5, 4)]  # the swarm rolled back in epoch 5 to step 4; the frozen peer never heard of it
    store.drop_after(0, 4), store.drop_after(1, 4)
    frozen.save_stage(old)  # the late write, of timeline 0
    store.save_stage(_payload(0, 8))  # timeline 5
    assert store.latest_complete() == 4 and store.latest_for_stage(1) == 4
    assert frozen.latest_complete() == 8  # what a reader unaware of the rollback would have taken
    store.save_stage(_payload(1, 8))
    assert store.latest_complete() == 8 and store.load_stage(8, 1).lr == 1e-3
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step_00000008").iterdir()) == [
        "stage_0.t5.pt",
        "stage_1.pt",
        "stage_1.t5.pt",
    ]
    assert store.drop_after(1, 4) == [8] and not (tmp_path / "ckpt" / "step_00000008" / "stage_1.pt").exists()


def test_files_of_steps_up_to_the_rollback_stay_valid_in_later_timelines(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", num_stages=1)
    for step in (4, 8):
        store.save_stage(_payload(0, step))
    store.rollbacks = [(3, 8), (7, 4)]  # back to 8 in epoch 3 (its files stay), later back to 4 in epoch 7
    assert store.complete_steps() == [4] and store.timeline == 7


def test_a_background_write_keeps_the_timeline_of_the_moment_it_was_asked(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", num_stages=1)
    saver = ckpt_mod.AsyncSaver(store)
    store.rollbacks = [(2, 0)]
    saver.save(6, [(0, ckpt_mod.payload_bytes(_payload(0, 6)))])
    store.rollbacks = [(2, 0), (9, 4)]  # a rollback the writer's process learns of before its write lands
    saver.wait()
    assert (tmp_path / "ckpt" / "step_00000006" / "stage_0.t2.pt").exists() and store.complete_steps() == []


def test_a_late_drop_after_a_rollback_spares_the_newer_timelines_files(tmp_path):
    """A peer frozen inside its rollback of epoch 5 wakes after the swarm wrote step 8 in timeline 5 (and again
    in timeline 9): its late drop deletes only the files older than the rollback it was in."""
    store = CheckpointStore(tmp_path / "ckpt", num_stages=1)
    store.save_stage(_payload(0, 8))  # timeline 0, abandoned by the rollback in epoch 5
    store.rollbacks = [(5, 4)]
    store.save_stage(_payload(0, 8))
    store.rollbacks = [(5, 4), (9, 8)]
    store.save_stage(_payload(0, 12))
    assert store.drop_after(0, 4, before=5) == [8]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*/*.pt")) == ["stage_0.t5.pt", "stage_0.t9.pt"]
    assert store.complete_steps() == [8, 12]


def test_loading_a_file_a_rollback_abandoned_is_refused_saying_so(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", num_stages=1)
    store.save_stage(_payload(0, 8))
    store.rollbacks = [(5, 4)]
    with pytest.raises(RuntimeError, match="stage 0 at step 8 .* belongs to a timeline a rollback abandoned"):
        store.load_stage(8, 0)


def test_a_complete_step_beyond_the_bound_is_never_the_one_rolled_back_to(tmp_path):
    """A rollback never goes forward: a complete step newer than the swarm's (planted, or left by another run)
    is passed over when the caller bounds the search."""
    store = CheckpointStore(tmp_path, num_stages=2)
    for step in (40, 99_999_999):
        for stage in range(2):
            store.save_stage(_payload(stage, step))
    assert store.latest_complete() == 99_999_999
    assert store.latest_complete(at_most=50) == 40
    assert store.latest_complete(at_most=39) is None
    assert store.latest_for_stage(1, at_most=50) == 40 and store.latest_for_stage(1) == 99_999_999
