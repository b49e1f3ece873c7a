"""``checkfree export`` and ``checkfree generate`` on a run that ``checkfree train`` made, and their answers to bad
input (exit code 2 and a message naming the problem)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from checkfree import cli
from checkfree.cli import export
from checkfree.config import load_config, to_yaml
from checkfree.core.model import build_stages
from checkfree.core.weights import save_weights, stages_from_state
from tests.helpers import TINY

# until checkfree/cli/__init__.py lists export in COMMANDS, the commands are reached through this shim
_SHIM = (
    "import sys\nfrom checkfree import cli\nfrom checkfree.cli import export\n"
    "cli.COMMANDS = cli.COMMANDS if export in cli.COMMANDS else (*cli.COMMANDS, export)\n"
    "sys.exit(cli.main(sys.argv[1:]))"
)


def _cli(*args, cwd):
    head = ["-m", "checkfree"] if args[0] == "train" or export in cli.COMMANDS else ["-c", _SHIM]
    return subprocess.run([sys.executable, *head, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_train_then_export_and_generate(tmp_path):
    train = [*TINY, "num_steps=3", "num_threads=1", "failures.mode=none", "recovery.strategy=none", "run_name=t"]
    out = _cli("train", *train, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "t"
    assert json.loads((run / "model.json").read_text())["step"] == 3

    out = _cli("export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert out.returncode == 0 and "tokenizer bytes" in out.stdout, out.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (32, 4, 256)
    exported, trained = load_file(tmp_path / "hf" / "model.safetensors"), load_file(run / "model.safetensors")
    assert torch.equal(exported["lm_head.weight"], trained["head.weight"])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    greedy = ["--prompt", "def main(", "--max-new-tokens", "12", "--temperature", "0"]
    out = _cli("generate", str(run), *greedy, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("def main(") and len(out.stdout) > len("def main(\n")


@pytest.fixture
def checkfree(monkeypatch, capsys):
    """The command line in this process: (exit code, stdout, stderr) of ``checkfree ARGS``."""
    if export not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, export))

    def run(*args):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_bad_input_exits_2_with_a_message(tmp_path, checkfree):
    code, _, err = checkfree("generate", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and f"run directory {tmp_path / 'nope'} does not exist" in err
    code, _, err = checkfree("export", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err
    code, _, err = checkfree("export", str(tmp_path), "--format", "onnx")
    assert code == 2 and "invalid choice: 'onnx'" in err

    cfg = load_config([], [*TINY, "model.vocab_size=97", f"out_dir={tmp_path}", "run_name=r"])
    cfg.run_dir.mkdir()
    (cfg.run_dir / "config.yaml").write_text(to_yaml(cfg))
    code, _, err = checkfree("generate", str(cfg.run_dir), "--prompt", "x")
    assert code == 2 and "holds no weights: expected model.safetensors" in err
    code, _, err = checkfree("export", str(cfg.run_dir))
    assert code == 2 and "holds no weights" in err

    save_weights(cfg.run_dir, build_stages(cfg.model, 0), cfg.model, step=1)
    code, _, err = checkfree("generate", str(cfg.run_dir), "--prompt", "é")  # byte 195 is past a 97-token vocabulary
    assert code == 2 and "prompt token id 195 is outside the model's vocabulary 0..96" in err and "bytes" in err
    code, _, err = checkfree("export", str(cfg.run_dir), "--out", str(tmp_path / "hf"))
    assert code == 2 and "tokenizer 'bytes' has 256 tokens but the model's vocab_size is 97" in err
    code, _, err = checkfree("export", str(cfg.run_dir), "--tokenizer", str(tmp_path / "no.json"))
    assert code == 2 and "expected 'bytes' or a tokenizer.json file" in err


def test_a_token_folder_moved_away_is_named_and_tokenizer_overrides(tmp_path, checkfree):
    cfg = load_config([], [*TINY, f"out_dir={tmp_path}", "run_name=m", "data.source=tokens", "data.path=moved"])
    cfg.run_dir.mkdir()
    (cfg.run_dir / "config.yaml").write_text(to_yaml(cfg))
    save_weights(cfg.run_dir, build_stages(cfg.model, 0), cfg.model, step=1)
    code, _, err = checkfree("generate", str(cfg.run_dir), "--prompt", "x")
    assert code == 2 and "data.path='moved' (its token folder, which holds the tokenizer) is not a folder" in err
    code, _, err = checkfree("export", str(cfg.run_dir), "--out", str(tmp_path / "hf"))
    assert code == 0 and "warning: no tokenizer files written" in err
    assert not (tmp_path / "hf" / "tokenizer.json").exists() and (tmp_path / "hf" / "model.safetensors").is_file()
    code, out, _ = checkfree("generate", str(cfg.run_dir), "--prompt=x", "--tokenizer=bytes", "--max-new-tokens=2")
    assert code == 0 and out.startswith("x")


def test_generate_in_process_matches_the_trained_stages(tmp_path, checkfree, capsys):
    """The printed text is the greedy continuation of the weights on disk, decoded as bytes."""
    cfg = load_config([], [*TINY, f"out_dir={tmp_path}", "run_name=g", "model.init_std=0.5"])
    cfg.run_dir.mkdir()
    (cfg.run_dir / "config.yaml").write_text(to_yaml(cfg))
    save_weights(cfg.run_dir, build_stages(cfg.model, 0), cfg.model, step=1)
    code = cli.main(["generate", str(cfg.run_dir), "--prompt", "ab", "--max-new-tokens", "3", "--temperature", "0"])
    assert code == 0
    (model,) = stages_from_state(cfg.model, {**load_file(cfg.run_dir / "model.safetensors")}, num_stages=1)
    ids = list(b"ab")
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model.run_head(model.run_blocks(model.run_embed(torch.tensor([ids]))))[0, -1].argmax()))
    assert capsys.readouterr().out == "ab" + bytes(ids[2:]).decode("utf-8", errors="replace") + "\n"


def test_a_bpe_run_exports_its_tokenizer_and_generates_with_it(tmp_path):
    from checkfree.core.prepare import PrepareSettings, prepare

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(60):
        (docs / f"d{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j} + {i}\n" for j in range(20)))
    data = tmp_path / "data"
    prepare(PrepareSettings(inputs=(str(docs / "*.py"),), out_dir=str(data), train_bpe=300, min_split_tokens=64))
    train = [*TINY, "num_steps=2", "num_threads=1", "failures.mode=none", "recovery.strategy=none", "run_name=b"]
    out = _cli("train", *train, "data.source=tokens", f"data.path={data}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "b"

    out = _cli("export", str(run), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert out.returncode == 0 and "tokenizer bpe-" in out.stdout, out.stderr
    source = json.loads((data / "tokenizer.json").read_text())  # the same, less any post-processor
    assert json.loads((tmp_path / "hf" / "tokenizer.json").read_text()) == {**source, "post_processor": None}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] is not None and config["vocab_size"] <= 300

    out = _cli("generate", str(run), "--prompt", "", "--max-new-tokens", "5", "--seed", "1", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr  # from the end-of-text token
