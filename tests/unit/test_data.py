import numpy as np
import pytest
import torch

from checkfree.core.data import Batches, DataConfig, DataError, load_splits


def test_batches_are_a_pure_function_of_seed_step_microbatch():
    cfg = DataConfig(max_bytes=300_000, microbatch_size=4)
    a, b = Batches(cfg, 32, 256, seed=7), Batches(cfg, 32, 256, seed=7)
    assert torch.equal(a.inputs(5, 2), b.inputs(5, 2))
    assert torch.equal(a.targets(5, 2), b.targets(5, 2))
    assert not torch.equal(a.inputs(5, 2), a.inputs(5, 3))
    assert not torch.equal(a.inputs(5, 2), Batches(cfg, 32, 256, seed=8).inputs(5, 2))
    x, y = a.inputs(3, 1), a.targets(3, 1)
    assert x.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one token


def test_stdlib_split_holds_out_whole_files():
    cfg = DataConfig(max_bytes=2_000_000)
    train, val, desc = load_splits(cfg)
    assert desc.startswith("stdlib:") and len(val) > 0.01 * len(train)
    # no 200-byte window of the validation text appears in the training text
    train_b, val_b = train.tobytes(), val.tobytes()
    rng = np.random.default_rng(0)
    for o in rng.integers(0, len(val_b) - 200, 20):
        assert val_b[o : o + 200] not in train_b


def test_text_source_single_file_and_glob(tmp_path):
    (tmp_path / "one.txt").write_text("hello world. " * 500)
    train, val, _ = load_splits(DataConfig(source="text", path=str(tmp_path / "one.txt"), val_fraction=0.1))
    assert len(val) == pytest.approx(0.1 * (len(train) + len(val)), abs=2)
    for i in range(12):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 100)
    train, val, _ = load_splits(DataConfig(source="text", path=str(tmp_path / "doc*.txt"), val_fraction=0.2))
    assert len(train) > 0 and len(val) > 0


def test_token_files(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "val.bin")
    b = Batches(DataConfig(source="tokens", path=str(tmp_path), microbatch_size=2), 16, 1024, seed=0)
    x, y = b.inputs(0, 0), b.targets(0, 0)
    assert torch.equal(y, x + 1)
    with pytest.raises(DataError, match="token id 999 but model.vocab_size=256"):
        Batches(DataConfig(source="tokens", path=str(tmp_path)), 16, 256, seed=0)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="matches no readable file"):
        load_splits(DataConfig(source="text", path=str(tmp_path / "nope*.txt")))
    with pytest.raises(DataError, match=r"expected a token file .*train.bin"):
        load_splits(DataConfig(source="tokens", path=str(tmp_path)))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match="need at least model.seq_len"):
        Batches(DataConfig(source="text", path=str(tmp_path / "short.txt")), 64, 256, seed=0)
    with pytest.raises(ValueError, match="data.path is required"):
        DataConfig(source="text")
