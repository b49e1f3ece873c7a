"""``checkfree prepare`` as a user runs it, then ``checkfree train`` on what it wrote."""

import json
import random
import subprocess
import sys

from tests.helpers import TINY


def _checkfree(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "checkfree", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_prepare_with_a_trained_bpe_then_train_on_it(tmp_path):
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "range", "(", ")", ":", "\n    "]
    (tmp_path / "corpus").mkdir()
    for i in range(24):
        (tmp_path / "corpus" / f"mod{i}.py").write_text(" ".join(rng.choice(words) for _ in range(600)))
    out = _checkfree("prepare", "corpus/*.py", "--out", "data", "--train-bpe", "300", "--val-fraction", "0.2",
                     "--no-progress", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert f"vocab_size {meta['vocab_size']}, uint16, in data" in out.stdout
    assert "train on it: checkfree train data.source=tokens data.path=data" in out.stdout
    train = [*TINY, "data.source=tokens", "data.path=data", "num_steps=3"]  # model.vocab_size follows meta.json
    train += ["failures.mode=none", "recovery.strategy=none", "progress=false", "plot=false", "num_threads=1"]
    out = _checkfree("train", *train, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "done: 3 steps" in out.stdout
    out = _checkfree("train", *train, "model.vocab_size=256", cwd=tmp_path)
    assert out.returncode == 2 and f"prepared with vocab_size {meta['vocab_size']} (meta.json)" in out.stderr


def test_bad_input_exits_2_and_leaves_no_shards(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "a fine line"}\n{"text": "a broken line\n')
    out = _checkfree("prepare", "docs.jsonl", "--out", "data", "--no-progress", cwd=tmp_path)
    assert out.returncode == 2 and "checkfree prepare: docs.jsonl:2: not a valid JSON line" in out.stderr
    assert not (tmp_path / "data" / "train.bin").exists() and out.stdout == ""
    out = _checkfree("prepare", "nothing/*.txt", "--out", "data", cwd=tmp_path)
    assert out.returncode == 2 and "input 'nothing/*.txt' matches no file" in out.stderr
