"""Hugging Face export: the exported LlamaForCausalLM computes checkfree's logits (RoPE layout converted, not
approximated), and the tokenizer files encode text as the run's data was encoded."""

import json

import pytest
import tokenizers
import torch

from checkfree.core.generate import generate
from checkfree.core.hf_export import byte_tokenizer_json, export_hf, hf_config, hf_state, interleaved_to_halves
from checkfree.core.model import ModelConfig, apply_rope, build_stages, rope_tables
from checkfree.core.tokenizer import ByteTokenizer, train_bpe
from checkfree.core.weights import WeightsError, model_state, save_weights

# rope_theta off its default, so a config whose theta were ignored would not match either
CFG = ModelConfig(vocab_size=97, d_model=64, num_heads=4, num_layers=4, num_stages=2, seq_len=32, rope_theta=500.0)
SKIP = "transformers is not installed (pip install -e .[dev]); the export itself does not need it"


def _forward(stages, tokens):
    h = stages[0].run_embed(tokens)
    for s in stages:
        h = s.run_blocks(h)
    return stages[-1].run_head(h)


@pytest.fixture
def run(tmp_path):
    """A 2-stage run whose weights, norms included, are all off their initial values."""
    stages = build_stages(CFG, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for s in stages for p in s.parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    save_weights(tmp_path / "run", stages, CFG, step=2)
    return tmp_path / "run", stages


def test_the_permutation_turns_interleaved_rope_into_rotate_half():
    """Pure maths, no transformers: rotating halves (Hugging Face) of the permuted projection gives the permuted
    output of rotating interleaved pairs (checkfree)."""
    H, hd, C, T = 2, 8, 16, 5
    w, x = torch.randn(H * hd, C), torch.randn(T, C)
    cos, sin = rope_tables(T, hd, 500.0)  # (T, hd/2)
    ours = apply_rope((x @ w.T).view(T, H, hd).transpose(0, 1), cos, sin)  # (H, T, hd)
    q = (x @ interleaved_to_halves(w, H).T).view(T, H, hd).transpose(0, 1)
    cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    theirs = q * cos2 + torch.cat((-q[..., hd // 2 :], q[..., : hd // 2]), -1) * sin2  # HF's rotate_half
    perm = torch.cat((torch.arange(0, hd, 2), torch.arange(1, hd, 2)))
    assert torch.allclose(theirs, ours[..., perm], atol=1e-6)


def test_the_exported_llama_computes_checkfree_logits(run, tmp_path):
    transformers = pytest.importorskip("transformers", reason=SKIP)
    run_dir, stages = run
    out = export_hf(run_dir, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["intermediate_size"] == 256
    assert config["rope_theta"] == 500.0 and config["bos_token_id"] is None and not config["tie_word_embeddings"]
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = _forward(stages, tokens)
        diff = (model(tokens).logits - ours).abs().max().item()
        assert diff <= 1e-4, diff
        prompt = [5, 17, 3]
        hf_greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, 3:].tolist()
        assert hf_greedy == generate(CFG, model_state(stages), prompt, 8, temperature=0, top_k=0, seed=0)
        # the same weights without the RoPE permutation: a different function, so the match is not by tolerance
        model.load_state_dict(hf_state(CFG, model_state(stages), permute_rope=False))
        unpermuted = (model(tokens).logits - ours).abs().max().item()
    assert unpermuted > 1e-3, unpermuted


def test_byte_level_tokenizer_json_ids_are_the_utf8_bytes():
    tok = tokenizers.Tokenizer.from_str(byte_tokenizer_json())
    text = "héllo wörld  \n\t 日本語 🎉 def f(x):\r\n  return x**2  "
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == ByteTokenizer().encode(text) and tok.decode(ids) == text and tok.get_vocab_size() == 256
    assert tok.decode(list(range(256))) == ByteTokenizer().decode(list(range(256)))


def test_a_prepared_tokenizer_is_copied_with_its_end_of_text_id(tmp_path):
    transformers = pytest.importorskip("transformers", reason=SKIP)
    docs = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
    bpe = train_bpe(docs, 300, tmp_path / "tokenizer.json")
    cfg = ModelConfig(vocab_size=bpe.vocab_size, d_model=16, num_heads=2, num_layers=2, num_stages=1, seq_len=16)
    save_weights(tmp_path / "run", build_stages(cfg, 0), cfg, step=1)
    out = export_hf(tmp_path / "run", tmp_path / "hf", bpe)
    source = json.loads((tmp_path / "tokenizer.json").read_text())
    assert json.loads((out / "tokenizer.json").read_text()) == {**source, "post_processor": None}
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == bpe.eot_id is not None
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("def g(y): return y")["input_ids"] == bpe.encode("def g(y): return y")
    assert hf_tok.eos_token_id == bpe.eot_id
    info = json.loads((out / "checkfree_export.json").read_text())
    assert info["step"] == 1 and info["tokenizer"]["vocab_size"] == bpe.vocab_size


def test_config_fields_follow_the_model_config():
    cfg = ModelConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=2, num_stages=1, seq_len=64, ffn_hidden=80)
    c = hf_config(cfg, bos_id=3, eos_id=3)
    assert (c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"], c["head_dim"]) == (32, 80, 4, 8)
    assert (c["max_position_embeddings"], c["rms_norm_eps"], c["bos_token_id"]) == (64, cfg.norm_eps, 3)


def test_bad_exports_are_refused(run, tmp_path):
    with pytest.raises(WeightsError, match="holds no weights"):
        export_hf(tmp_path, tmp_path / "hf")
    with pytest.raises(ValueError, match="tokenizer 'bytes' has 256 tokens but the model's vocab_size is 97"):
        export_hf(run[0], tmp_path / "hf", ByteTokenizer())
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="afile: it is a file, not a folder"):
        export_hf(run[0], tmp_path / "afile")
    with pytest.raises(ValueError, match="holds a checkfree run"):  # its model.safetensors would be replaced
        export_hf(run[0], run[0])


def test_a_tokenizer_that_adds_special_tokens_is_exported_without_them(tmp_path):
    """checkfree encodes without special tokens; a post-processor (BOS added, as LLaMA's) must not make the
    exported tokenizer encode otherwise."""
    transformers = pytest.importorskip("transformers", reason=SKIP)
    docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(100)]
    bpe = train_bpe(docs, 300, tmp_path / "tokenizer.json")
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    eot = raw.id_to_token(bpe.eot_id)
    raw.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{eot} $A", special_tokens=[(eot, bpe.eot_id)]
    )
    raw.save(str(tmp_path / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=bpe.vocab_size, d_model=16, num_heads=2, num_layers=2, num_stages=1, seq_len=16)
    save_weights(tmp_path / "run", build_stages(cfg, 0), cfg, step=1)
    out = export_hf(tmp_path / "run", tmp_path / "hf", bpe)
    text = "def g(y): return y"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == bpe.encode(text)
