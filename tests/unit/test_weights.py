"""Weights files: global names independent of the split, atomic writes, stage parts and their assembly."""

import json

import pytest
import torch
from safetensors import safe_open

from checkfree.core import weights
from checkfree.core.model import ModelConfig, build_stages
from checkfree.core.weights import (
    WeightsError,
    assemble_parts,
    load_weights,
    model_state,
    save_stage_part,
    save_weights,
    stages_from_state,
)

CFG = ModelConfig(vocab_size=31, d_model=16, num_heads=2, num_layers=4, num_stages=4, seq_len=8)


def _forward(stages, tokens):
    h = stages[0].run_embed(tokens)
    for s in stages:
        h = s.run_blocks(h)
    return stages[-1].run_head(h)


def _perturbed(cfg=CFG, seed=0):
    """Stages whose norms are not all ones, so a norm mixed up with another would show."""
    stages = build_stages(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for s in stages for p in s.parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return stages


def test_global_names_do_not_depend_on_the_split():
    four, two, one = (model_state(build_stages(CFG, 3, n)) for n in (4, 2, 1))
    assert set(four) == set(two) == set(one)
    assert {"embed.weight", "layers.3.qkv.weight", "norm.weight", "head.weight"} <= set(four)
    assert all(torch.equal(four[k], one[k]) and torch.equal(two[k], one[k]) for k in one)


def test_saved_weights_load_into_any_split_and_compute_the_same(tmp_path):
    stages = _perturbed()
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(1))
    path = save_weights(tmp_path / "run", stages, CFG, step=7, meta={"run_name": "r"})
    assert path == tmp_path / "run" / "model.safetensors"
    cfg, state, info = load_weights(tmp_path / "run")
    assert cfg == CFG and info["step"] == 7 and info["meta"] == {"run_name": "r"}
    assert all(t.dtype == torch.float32 for t in state.values())
    with torch.no_grad():
        want = _forward(stages, tokens)
        for n in (1, 2, 4):
            assert torch.allclose(_forward(stages_from_state(cfg, state, n), tokens), want, atol=1e-6), n
    with pytest.raises(WeightsError, match="num_stages=3 must be >= 1 and divide model.num_layers=4"):
        stages_from_state(cfg, state, 3)


def test_the_header_and_model_json_say_what_the_file_holds(tmp_path):
    save_weights(tmp_path, build_stages(CFG, 0), CFG, step=5, meta={"tokenizer": "bytes"})
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "pt" and json.loads(header["step"]) == 5
    assert json.loads(header["format_version"]) == weights.FORMAT_VERSION and "checkfree_version" in header
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["model"]["d_model"] == 16 and info["step"] == 5 and info["meta"] == {"tokenizer": "bytes"}


def test_weights_of_another_model_are_refused(tmp_path):
    state = model_state(build_stages(CFG, 0))
    del state["layers.2.down.weight"]
    with pytest.raises(WeightsError, match=r"missing \['layers.2.down.weight'\]"):
        save_weights(tmp_path, state, CFG, step=1)
    wider = model_state(build_stages(ModelConfig(**{**vars(CFG), "d_model": 32}), 0))
    with pytest.raises(WeightsError, match="wrong shape: embed.weight: \\(31, 32\\) \\(expected \\(31, 16\\)\\)"):
        stages_from_state(CFG, wider)


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    save_weights(tmp_path, build_stages(CFG, 0), CFG, step=1)
    before = (tmp_path / "model.safetensors").read_bytes()

    def torn(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights, "save_file", torn)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'model.safetensors'}: No space left") as e:
        save_weights(tmp_path, build_stages(CFG, 1), CFG, step=2)
    assert e.value.errno == 28
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]  # no temporary left
    assert load_weights(tmp_path)[2]["step"] == 1


def test_an_unwritable_place_is_an_oserror_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match="cannot write .*file/model.safetensors"):
        save_weights(tmp_path / "file", build_stages(CFG, 0), CFG, step=1)


def _write_parts(run, cfg=CFG, steps=(4, 4, 4, 4), seed=0):
    stages = _perturbed(cfg, seed)
    for i, s in enumerate(stages):
        if steps[i] is not None:
            save_stage_part(run, i, s.state_dict(), cfg, steps[i], lineage=f"run-x/t0/peer{i}", meta={"run_name": "x"})
    return stages


def test_parts_assemble_into_the_model(tmp_path):
    stages = _write_parts(tmp_path)
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [f"stage_{i}.safetensors" for i in range(4)]
    cfg, state, info = load_weights(tmp_path)  # only parts: joined in memory, nothing written
    assert not (tmp_path / "model.safetensors").exists()
    want = model_state(stages)
    assert cfg == CFG and info["step"] == 4 and all(torch.equal(state[k], want[k]) for k in want)
    assert assemble_parts(tmp_path) == tmp_path / "model.safetensors"
    cfg, state, info = load_weights(tmp_path)
    assert info["meta"]["run_name"] == "x" and info["meta"]["parts"]["2"] == {"step": 4, "lineage": "run-x/t0/peer2"}
    assert all(torch.equal(state[k], want[k]) for k in want)


def test_parts_newer_than_the_model_file_are_reported(tmp_path, caplog):
    _write_parts(tmp_path, steps=(4, 4, 4, 4))
    assemble_parts(tmp_path)
    _write_parts(tmp_path, steps=(9, 9, 9, 9), seed=1)
    with caplog.at_level("WARNING"):
        assert load_weights(tmp_path)[2]["step"] == 4  # the file wins; the newer parts are said
    assert "is at step 4 but the stage parts [0, 1, 2, 3] are newer (steps [9])" in caplog.text


def test_a_missing_part_is_refused_naming_the_files(tmp_path):
    _write_parts(tmp_path, steps=(4, None, 4, 4))
    want = r"4 stages, missing the parts of stages \[1\].*stage_0.safetensors \(step 4"
    with pytest.raises(WeightsError, match=want):
        assemble_parts(tmp_path)
    with pytest.raises(WeightsError, match="missing the parts"):
        load_weights(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_parts_at_different_steps_are_refused_unless_allowed(tmp_path):
    _write_parts(tmp_path, steps=(4, 5, 4, 4))
    with pytest.raises(WeightsError, match=r"different steps: .*stage_1.safetensors \(step 5"):
        assemble_parts(tmp_path)
    assemble_parts(tmp_path, allow_mixed_steps=True)
    info = load_weights(tmp_path)[2]
    assert info["step"] == 4 and info["meta"]["parts"]["1"]["step"] == 5


def test_parts_of_different_configs_are_refused(tmp_path):
    _write_parts(tmp_path)
    other = ModelConfig(**{**vars(CFG), "rope_theta": 500.0})
    save_stage_part(tmp_path, 3, build_stages(other, 0)[3].state_dict(), other, 4, lineage="y")
    with pytest.raises(WeightsError, match="different model configs"):
        assemble_parts(tmp_path)


def test_a_part_must_be_its_stage(tmp_path):
    stages = build_stages(CFG, 0)
    with pytest.raises(WeightsError, match="stage_index=4 out of range 0..3"):
        save_stage_part(tmp_path, 4, stages[3].state_dict(), CFG, 1, lineage="x")
    with pytest.raises(WeightsError, match="stage 0's state dict .*missing \\['embed.weight'\\]"):
        save_stage_part(tmp_path, 0, stages[1].state_dict(), CFG, 1, lineage="x")


def test_no_weights_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="run directory .*nowhere does not exist"):
        load_weights(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="holds no weights: expected model.safetensors"):
        load_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_weights(tmp_path)


def test_a_torn_stage_part_does_not_hide_good_weights(tmp_path, caplog):
    _write_parts(tmp_path, steps=(4, 4, 4, 4))
    assemble_parts(tmp_path)
    (tmp_path / "weights" / "stage_0.safetensors").write_bytes(b"torn")
    with caplog.at_level("WARNING"):
        assert load_weights(tmp_path)[2]["step"] == 4
    assert "ignoring an unreadable stage part" in caplog.text


def test_weights_files_are_readable_as_any_file_written_here(tmp_path):
    import os

    _write_parts(tmp_path, steps=(4, 4, 4, 4))
    path = assemble_parts(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
