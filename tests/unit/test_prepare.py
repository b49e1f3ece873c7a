"""Tokenizers (bytes, a tokenizer.json, a BPE trained here) and ``prepare``: text and JSONL to token shards."""

import json
import random

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from checkfree.core.data import Batches, DataConfig
from checkfree.core.prepare import PrepareError, PrepareSettings, ShardWriter, prepare, token_dtype
from checkfree.core.tokenizer import (
    EOT_TOKEN,
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    describe,
    load_tokenizer,
    tokenizer_for_data,
    train_bpe,
)

WORDS = ["alpha", "beta", "gamma", "delta", "héllo", "世界", "def", "return", "    ", "\n", "x = 1", "(", ")"]


def _corpus(n: int, words: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


def _write_docs(folder, texts, suffix=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"d{i:03d}{suffix}").write_text(t)
    return str(folder / f"*{suffix}")


def _bytes_shard(path) -> bytes:
    """A bytes-tokenizer shard's text (its ids are stored as uint16, the narrowest dtype data.py reads)."""
    return np.fromfile(path, dtype=np.uint16).astype(np.uint8).tobytes()


def _settings(inputs, out, **kw) -> PrepareSettings:
    return PrepareSettings(inputs=tuple(inputs), out_dir=str(out), **{"min_split_tokens": 16, **kw})


# --- tokenizers ---------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_utf8_and_replaces_a_cut_character():
    tok = ByteTokenizer()
    text = "héllo 世界\n\tdef f(): return 1"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 256 and tok.eot_id is None and tok.name == "bytes"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"
    with pytest.raises(TokenizerError, match="id 300 is not a byte"):
        tok.decode([65, 300])


def test_bpe_trained_on_a_small_corpus_round_trips_text(tmp_path):
    texts = _corpus(40)
    tok = train_bpe(iter(texts), 400, tmp_path / "tokenizer.json")
    assert 257 <= tok.vocab_size <= 400 and tok.eot_id == 0 and describe(tok)["eot_token"] == EOT_TOKEN
    for text in [*texts[:5], "never seen: ✓ \x00 Ω\r\n  trailing  "]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2  # merges learned: fewer tokens than bytes
    again = load_tokenizer(str(tmp_path))  # a folder holding tokenizer.json
    assert again.encode(texts[1]) == tok.encode(texts[1]) and again.eot_id == tok.eot_id
    assert tok.decode([tok.eot_id]) == EOT_TOKEN  # kept, so a generated end of text is visible
    with pytest.raises(TokenizerError, match="vocab_size=100 is too small"):
        train_bpe(iter(texts), 100, tmp_path / "small.json")


def test_hf_tokenizer_file_finds_its_end_of_text_and_corrupt_files_are_named(tmp_path):
    wl = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.save(str(tmp_path / "wl.json"))
    tok = load_tokenizer(str(tmp_path / "wl.json"))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 4 and tok.eot_id == 1 and tok.name == "wordlevel-4"
    assert tok.encode("hello world hello") == [2, 3, 2]
    with pytest.raises(TokenizerError, match="has no token '<eot>'"):
        HFTokenizer(tmp_path / "wl.json", eot_token="<eot>")
    (tmp_path / "bad.json").write_text((tmp_path / "wl.json").read_text()[:40])
    with pytest.raises(TokenizerError, match=r"cannot load tokenizer file .*bad\.json: "):
        load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(TokenizerError, match=r"expected 'bytes' or a tokenizer.json file; .*nope.json is not a file"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_tokenizer_for_data_reads_meta_json(tmp_path):
    assert isinstance(tokenizer_for_data(DataConfig()), ByteTokenizer)
    pattern = _write_docs(tmp_path / "in", _corpus(20))
    prepare(_settings([pattern], tmp_path / "bpe", train_bpe=300))
    tok = tokenizer_for_data(DataConfig(source="tokens", path=str(tmp_path / "bpe")))
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode("héllo delta")) == "héllo delta"
    prepare(_settings([pattern], tmp_path / "bytes"))
    assert isinstance(tokenizer_for_data(DataConfig(source="tokens", path=str(tmp_path / "bytes"))), ByteTokenizer)
    np.zeros(10, np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(TokenizerError, match="has no meta.json, so its tokenizer is unknown"):
        tokenizer_for_data(DataConfig(source="tokens", path=str(tmp_path)))


# --- prepare ------------------------------------------------------------------------------------------------


def test_split_is_by_document_and_the_seed_changes_it(tmp_path):
    texts = [f"<<document {i}>> " + "body text " * 30 for i in range(60)]
    pattern = _write_docs(tmp_path / "in", texts)
    meta = prepare(_settings([pattern], tmp_path / "out", val_fraction=0.2))
    train = _bytes_shard(tmp_path / "out" / "train.bin").decode()
    val = _bytes_shard(tmp_path / "out" / "val.bin").decode()
    in_val = {i for i, t in enumerate(texts) if t in val}
    assert all((t in train) != (i in in_val) for i, t in enumerate(texts))  # each document in exactly one split
    assert meta["documents"] == {"train": 60 - len(in_val), "val": len(in_val)} and 4 <= len(in_val) <= 20
    assert meta["tokens"]["val"] == len(val) and meta["split"] == "documents"
    prepare(_settings([pattern], tmp_path / "seed1", val_fraction=0.2, seed=1))
    assert _bytes_shard(tmp_path / "seed1" / "val.bin") != val.encode()
    names = sorted(str(p) for p in (tmp_path / "in").glob("*.txt"))  # the shell's expansion of the glob
    prepare(_settings(names, tmp_path / "named", val_fraction=0.2))
    assert _bytes_shard(tmp_path / "named" / "val.bin") == val.encode()
    few = _write_docs(tmp_path / "few", texts[:3])  # the hash holds out none of three: the last one is held out
    meta = prepare(_settings([few], tmp_path / "few_out", val_fraction=0.01))
    assert meta["documents"] == {"train": 2, "val": 1}
    assert _bytes_shard(tmp_path / "few_out" / "val.bin").startswith(b"<<document 2>>")


def test_meta_json_describes_the_shards(tmp_path):
    pattern = _write_docs(tmp_path / "in", _corpus(30))
    meta = prepare(_settings([pattern], tmp_path / "out", train_bpe=320, val_fraction=0.2), version="9.9")
    out = tmp_path / "out"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert meta["tokenizer"] == {"kind": "hf", "name": f"bpe-{meta['vocab_size']}", "file": "tokenizer.json",
                                 "eot_token": EOT_TOKEN}  # fmt: skip
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 0 and meta["checkfree_version"] == "9.9"
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert len(ids) == meta["tokens"][split] and ids.max() < meta["vocab_size"]
        assert (ids == 0).sum() == meta["documents"][split]  # one end-of-text after every document
    assert meta["inputs"]["files"] == 30 and meta["settings"]["train_bpe"] == 320
    (tmp_path / "in" / "d000.txt").write_text("changed")
    assert prepare(_settings([pattern], tmp_path / "out2"))["inputs"]["sha256"] != meta["inputs"]["sha256"]


def test_uint32_shards_for_a_vocabulary_over_65536(tmp_path):
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    wl = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.save(str(tmp_path / "tokenizer.json"))
    rng = random.Random(0)
    pattern = _write_docs(tmp_path / "in", [" ".join(f"w{rng.randrange(1, 70_000)}" for _ in range(200))] * 10)
    meta = prepare(_settings([pattern, pattern], tmp_path / "out", tokenizer=str(tmp_path / "tokenizer.json")))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000 and meta["inputs"]["files"] == 10
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint32)
    assert train.max() > 65_536 and (tmp_path / "out" / "tokenizer.json").is_file()
    batches = Batches(DataConfig(source="tokens", path=str(tmp_path / "out"), microbatch_size=2), 16, 70_000, seed=0)
    assert int(batches.inputs(0, 0).max()) > 65_536


def test_streaming_in_small_pieces_and_batches_gives_the_same_shards(tmp_path):
    pattern = _write_docs(tmp_path / "in", _corpus(25))
    prepare(_settings([pattern], tmp_path / "one"))
    prepare(_settings([pattern], tmp_path / "many", batch_size=1, piece_bytes=7))  # cuts inside UTF-8 characters
    for split in ("train", "val"):
        assert (tmp_path / "one" / f"{split}.bin").read_bytes() == (tmp_path / "many" / f"{split}.bin").read_bytes()
    prepare(_settings([pattern], tmp_path / "bpe1", train_bpe=300))
    prepare(_settings([pattern], tmp_path / "bpe2", train_bpe=300, batch_size=3))
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "bpe1" / name).read_bytes() == (tmp_path / "bpe2" / name).read_bytes()


def test_jsonl_holds_one_document_per_line(tmp_path):
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(_corpus(30, words=40))]
    (tmp_path / "docs.json").write_text("\n".join(lines[:15]) + "\n\n" + "\n".join(lines[15:]) + "\n")
    meta = prepare(_settings([str(tmp_path / "docs.json")], tmp_path / "out", jsonl_field="body", val_fraction=0.3))
    assert meta["documents"]["train"] + meta["documents"]["val"] == 30 and meta["documents"]["val"] > 0
    (tmp_path / "odd.jsonl").write_bytes(b'{"text": "a lone \\ud800 surrogate, a bad byte \xff"}\n' * 400)
    meta = prepare(_settings([str(tmp_path / "odd.jsonl")], tmp_path / "odd", train_bpe=300, val_fraction=0.5))
    ids = np.fromfile(tmp_path / "odd" / "val.bin", np.uint16).tolist()
    text = HFTokenizer(tmp_path / "odd" / "tokenizer.json").decode(ids)
    assert text.startswith("a lone ? surrogate, a bad byte \ufffd<|endoftext|>") and meta["documents"]["val"] > 100
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(PrepareError, match=r"bad\.jsonl:2: field 'text' holds int, not text"):
        prepare(_settings([str(tmp_path / "bad.jsonl")], tmp_path / "x"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": "a"\n')
    with pytest.raises(PrepareError, match=r"bad\.jsonl:3: not a valid JSON line"):
        prepare(_settings([str(tmp_path / "bad.jsonl")], tmp_path / "x", train_bpe=300))
    with pytest.raises(PrepareError, match=r"docs\.json:1: no field 'text' in this JSON line"):
        prepare(_settings([str(tmp_path / "docs.json")], tmp_path / "x", jsonl_field="text"))


def test_one_text_file_is_cut_at_a_line_start(tmp_path):
    text = "".join(f"line {i} of the only file\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    meta = prepare(_settings([str(tmp_path / "one.txt")], tmp_path / "out", val_fraction=0.1))
    train, val = (_bytes_shard(tmp_path / "out" / f"{s}.bin") for s in ("train", "val"))
    assert train.endswith(b"\n\n") and val.endswith(b"\n\n")  # the separator after each part's own newline
    assert train[:-1] + val[:-1] == text.encode() and val.startswith(b"line ")
    assert meta["split"] == "bytes of one file" and len(val) == pytest.approx(0.1 * len(text), rel=0.1)


def test_a_failed_or_interrupted_prepare_leaves_no_shards(tmp_path, monkeypatch):
    pattern = _write_docs(tmp_path / "in", _corpus(10))
    (tmp_path / "in" / "d999.jsonl").write_text("not json\n")
    with pytest.raises(PrepareError, match="d999.jsonl:1"):
        prepare(_settings([pattern, str(tmp_path / "in" / "*.jsonl")], tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []
    prepare(_settings([pattern], tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls = []

    def interrupted(self, split, ids, documents):
        calls.append(split)
        if len(calls) > 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(_settings([pattern], tmp_path / "out", batch_size=1))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # the old shards, untouched


def test_bad_inputs_are_clear_errors(tmp_path):
    pattern = _write_docs(tmp_path / "in", _corpus(10))
    with pytest.raises(PrepareError, match=r"input '.*nothing\*\.txt' matches no file"):
        prepare(_settings([str(tmp_path / "nothing*.txt")], tmp_path / "out"))
    with pytest.raises(PrepareError, match="is a folder: give its files, or a glob"):
        prepare(_settings([str(tmp_path / "in")], tmp_path / "out"))
    _write_docs(tmp_path / "empty", ["", ""])
    with pytest.raises(PrepareError, match="hold no text: an empty corpus"):
        prepare(_settings([str(tmp_path / "empty" / "*.txt")], tmp_path / "out"))
    with pytest.raises(PrepareError, match=r"the train split has \d+ tokens \(\d+ documents\); need at least 100000"):
        prepare(_settings([pattern], tmp_path / "out", min_split_tokens=100_000))
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrepareError, match="cannot create the output folder"):
        prepare(_settings([pattern], tmp_path / "file" / "out"))
    with pytest.raises(PrepareError, match="either a tokenizer .* or train_bpe=300, not both"):
        _settings([pattern], tmp_path / "out", tokenizer="bytes", train_bpe=300)
    with pytest.raises(PrepareError, match="val_fraction=1.0 must be in"):
        _settings([pattern], tmp_path / "out", val_fraction=1.0)
    with pytest.raises(TokenizerError, match="cannot load tokenizer file"):
        prepare(_settings([pattern], tmp_path / "out", tokenizer=str(tmp_path / "file")))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_exclude_leaves_out_matching_paths_and_says_when_nothing_is_left(tmp_path):
    from checkfree.core.prepare import PrepareError, find_inputs

    for rel in ("a/x.py", "a/site-packages/pkg/y.py", "b/z.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("print(1)\n")
    found = find_inputs([f"{tmp_path}/**/*.py"], None, ("*/site-packages/*",))
    assert sorted(src.key for src in found) == ["a/x.py", "b/z.py"]
    with pytest.raises(PrepareError, match=r"matches no file once \['\*'\] are left out"):
        find_inputs([f"{tmp_path}/**/*.py"], None, ("*",))


def test_a_new_prepare_leaves_no_tokenizer_of_the_last_one(tmp_path):
    pattern = _write_docs(tmp_path / "in", _corpus(30))
    prepare(_settings([pattern], tmp_path / "out", train_bpe=300))
    assert (tmp_path / "out" / "tokenizer.json").exists()
    prepare(_settings([pattern], tmp_path / "out"))  # bytes now
    assert not (tmp_path / "out" / "tokenizer.json").exists()
