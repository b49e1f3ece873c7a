"""Data read from a bucket (``data.path`` an fsspec URL; here fsspec's memory filesystem): fetched once into
a local cache, then read like a local path; a changed file is fetched again, a missing one named."""

import fsspec
import numpy as np
import pytest

from checkfree.core.data import DataConfig, DataError, load_splits, token_meta


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    monkeypatch.setenv("CHECKFREE_DATA_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{tmp_path.name}"
    fs.pipe(f"{root}/tokens/train.bin", np.arange(1000, dtype=np.uint16).tobytes())
    fs.pipe(f"{root}/tokens/val.bin", np.arange(100, dtype=np.uint16).tobytes())
    fs.pipe(f"{root}/tokens/meta.json", b'{"vocab_size": 1000, "dtype": "uint16"}')
    fs.pipe(f"{root}/text/a.txt", b"hello " * 100)
    fs.pipe(f"{root}/text/b.txt", b"world " * 100)
    yield fs, f"memory://{root}"
    fs.rm(root, recursive=True)


def test_a_token_folder_in_a_bucket_reads_like_a_local_one(bucket, tmp_path):
    fs, url = bucket
    cfg = DataConfig(source="tokens", path=f"{url}/tokens")
    assert token_meta(cfg.path)["vocab_size"] == 1000
    train, val, _ = load_splits(cfg)
    assert list(train[:3]) == [0, 1, 2] and len(val) == 100
    fs.pipe(url.removeprefix("memory://") + "/tokens/val.bin", np.arange(50, dtype=np.uint16).tobytes())
    assert len(load_splits(cfg)[1]) == 50  # changed: fetched again
    assert list((tmp_path / "cache").rglob("*.part")) == []


def test_a_glob_of_text_files_in_a_bucket_reads_like_a_local_glob(bucket):
    _, url = bucket
    train, val, _ = load_splits(DataConfig(source="text", path=f"{url}/text/*.txt", val_fraction=0.5))
    assert len(train) + len(val) == 1200


def test_a_missing_folder_in_a_bucket_is_named(bucket):
    _, url = bucket
    with pytest.raises(DataError, match=r"data.path='memory://.*/nope': nothing there"):
        load_splits(DataConfig(source="tokens", path=f"{url}/nope"))
