import json

import numpy as np
import pytest
import torch

from checkfree.core.data import Batches, DataConfig, DataError, load_splits, token_meta, vocab_size_from_meta


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


def test_a_file_set_whose_every_name_hashes_to_validation_still_trains_on_one():
    from checkfree.core.data import _split_files, is_val

    names = ["doc3", "doc5", "doc6"]
    assert all(is_val(n, 0.5) for n in names)  # the stable hash sends all three to validation
    train, val = _split_files([(n, n.encode()) for n in names], 0.5)
    assert train == b"doc3" and val == b"doc5\ndoc6"


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


def _token_folder(path, dtype="uint16", vocab_size=1024, n=(1000, 500), **meta):
    path.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "val"), n):
        np.arange(count, dtype=dtype).tofile(path / f"{split}.bin")
    (path / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "dtype": dtype, **meta}))
    return DataConfig(source="tokens", path=str(path), microbatch_size=2)


def test_token_meta_gives_the_dtype_and_vocab_size(tmp_path):
    cfg = _token_folder(tmp_path / "u32", dtype="uint32", vocab_size=70_000, n=(70_000, 600))
    assert token_meta(cfg.path)["dtype"] == "uint32" and vocab_size_from_meta(cfg) == 70_000
    train, val, _ = load_splits(cfg)
    assert train.dtype == np.uint32 and len(train) == 70_000 and int(train[-1]) == 69_999
    assert Batches(cfg, 16, 70_000, seed=0).inputs(0, 0).shape == (2, 16)
    assert vocab_size_from_meta(DataConfig()) is None
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")  # an old nanoGPT folder: no meta.json
    old = DataConfig(source="tokens", path=str(tmp_path))
    assert token_meta(tmp_path) is None and vocab_size_from_meta(old) is None


def test_a_model_vocab_other_than_the_prepared_one_is_refused(tmp_path):
    cfg = _token_folder(tmp_path, vocab_size=4096)
    with pytest.raises(DataError, match=r"prepared with vocab_size 4096 \(meta.json\) but model.vocab_size=256"):
        Batches(cfg, 16, 256, seed=0)
    assert Batches(cfg, 16, 4096, seed=0).inputs(0, 0).shape == (2, 16)


def test_bad_meta_json_and_token_files_are_named(tmp_path):
    cfg = _token_folder(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta.json is not a readable JSON file"):
        load_splits(cfg)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 300}))
    with pytest.raises(DataError, match=r"meta.json lacks the key 'dtype'"):
        load_splits(cfg)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 300, "dtype": "int8"}))
    with pytest.raises(DataError, match=r"dtype='int8' is not one of uint16, uint32"):
        load_splits(cfg)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": "300", "dtype": "uint16"}))
    with pytest.raises(DataError, match=r"vocab_size='300' must be a positive integer"):
        vocab_size_from_meta(cfg)
    _token_folder(tmp_path, dtype="uint32")
    with open(tmp_path / "val.bin", "ab") as f:
        f.write(b"\x00\x00")  # half an id: truncated, or written as uint16
    with pytest.raises(DataError, match=r"val.bin has 2002 bytes, not a multiple of 4 \(uint32 ids\)"):
        load_splits(cfg)
