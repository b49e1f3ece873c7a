"""
Hugging Face export
===================

A run's weights as a Hugging Face ``LlamaForCausalLM`` folder (``config.json``, ``model.safetensors`` and,
where the data's tokenizer is known, ``tokenizer.json`` + ``tokenizer_config.json``), written without the
``transformers`` package. The exported model computes the same function as checkfree's own forward.

Two layouts differ and are converted here, not approximated:

- RoPE. checkfree rotates *interleaved* pairs of a head's dimensions, ``(x[2j], x[2j+1])`` (the original
  LLaMa code); Hugging Face's Llama rotates *halves*, ``(x[j], x[j + hd/2])`` (``rotate_half``), both by the
  angle of frequency ``j``. The rows of ``q_proj`` and ``k_proj`` are therefore permuted within each head,
  ``2j -> j`` and ``2j+1 -> hd/2 + j``: the rotated query and key come out permuted alike, so every
  attention score (a dot product over the head's dimensions) is unchanged. ``v_proj`` is not rotated and
  keeps its rows. (Hugging Face's ``convert_llama_weights_to_hf`` applies the same permutation.)
- Fused projections: ``qkv`` splits into ``q_proj``, ``k_proj``, ``v_proj`` (in that order) and ``gate_up``
  into ``gate_proj`` (first half) and ``up_proj`` (second half).

Byte-level runs (``data.source`` stdlib or text) get a ``tokenizer.json`` that maps each UTF-8 byte to its own
value as id (a byte-level BPE with no merges), so ``AutoTokenizer`` encodes text exactly as training did.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import decoders, models, pre_tokenizers

from checkfree.core.model import ModelConfig
from checkfree.core.tokenizer import TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Tokenizer
from checkfree.core.weights import INFO_FILE, atomic_write, checkfree_version, load_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
EXPORT_INFO_FILE = "checkfree_export.json"  # where the export came from (run, step, tokenizer)


def hf_config(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """``config.json`` of a ``LlamaForCausalLM`` with checkfree's architecture."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.d_model // cfg.num_heads,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this ...
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # ... and 5.x this
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }


def interleaved_to_halves(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a query or key projection ``(H * hd, C)`` reordered within each head from interleaved RoPE pairs
    to halves: new row ``j`` is old ``2j``, new row ``hd/2 + j`` is old ``2j + 1``."""
    out_features, in_features = w.shape
    hd = out_features // num_heads
    return w.reshape(num_heads, hd // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def hf_state(cfg: ModelConfig, state: Mapping[str, torch.Tensor], permute_rope: bool = True) -> dict[str, torch.Tensor]:
    """The global-named checkfree ``state`` (``checkfree.core.weights``) under Hugging Face Llama names.

    ``permute_rope=False`` skips the RoPE permutation; only tests use it, to show that it matters.
    """
    rope = (lambda w: interleaved_to_halves(w, cfg.num_heads)) if permute_rope else (lambda w: w)
    out = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(cfg.num_layers):
        layer, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[layer + "qkv.weight"].split(cfg.d_model, dim=0)
        gate, up = state[layer + "gate_up.weight"].chunk(2, dim=0)
        out |= {
            hf + "self_attn.q_proj.weight": rope(q),
            hf + "self_attn.k_proj.weight": rope(k),
            hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": state[layer + "proj.weight"],
            hf + "mlp.gate_proj.weight": gate,
            hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": state[layer + "down.weight"],
            hf + "input_layernorm.weight": state[layer + "attn_norm.weight"],
            hf + "post_attention_layernorm.weight": state[layer + "ffn_norm.weight"],
        }
    out |= {"model.norm.weight": state["norm.weight"], "lm_head.weight": state["head.weight"]}
    return {k: t.to(torch.float32).contiguous() for k, t in out.items()}


@cache
def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, the symbols a ByteLevel pre-tokenizer emits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def byte_tokenizer_json() -> str:
    """A ``tokenizer.json`` whose ids are the text's UTF-8 bytes, as checkfree's byte-level data (``ByteTokenizer``)."""
    vocab = {char: b for b, char in _byte_to_char().items()}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _write_tokenizer(out_dir: Path, tokenizer: Tokenizer, seq_len: int) -> dict:
    """The tokenizer files for ``tokenizer``; returns what the export info records about it."""
    target = out_dir / TOKENIZER_FILE
    if isinstance(tokenizer, HFTokenizer):
        # without its post-processor: checkfree encodes with no special tokens added, and so must AutoTokenizer
        spec = json.loads(Path(tokenizer.path).read_text())
        spec["post_processor"] = None
        atomic_write(target, lambda tmp: tmp.write_text(json.dumps(spec, ensure_ascii=False)))
        source = str(tokenizer.path)
    else:
        assert isinstance(tokenizer, ByteTokenizer), type(tokenizer)
        atomic_write(target, lambda tmp: tmp.write_text(byte_tokenizer_json()))
        source = "bytes (a byte-level BPE with no merges: id = the UTF-8 byte)"
    eot = None if tokenizer.eot_id is None else tokenizer.decode([tokenizer.eot_id])
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": seq_len,
        "bos_token": eot,
        "eos_token": eot,
        "clean_up_tokenization_spaces": False,
    }
    atomic_write(out_dir / TOKENIZER_CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(tok_cfg, indent=2) + "\n"))
    return {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "source": source}


def export_hf(run_dir: str | Path, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write the run's weights as a Hugging Face ``LlamaForCausalLM`` folder ``out_dir``; returns it.

    Args:
        tokenizer: the tokenizer the run's data was made with (``tokenizer_for_data``); its ``tokenizer.json``
            (a byte-level one for bytes) and a ``tokenizer_config.json`` are written, and its end-of-text id
            becomes ``bos_token_id``/``eos_token_id``. None: no tokenizer files, both ids null.

    Raises:
        WeightsError: the run holds no readable weights (``load_weights``).
        ValueError: the tokenizer's vocabulary is larger than the model's.
        OSError: a file could not be written (its path named).
    """
    cfg, state, info = load_weights(run_dir)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{cfg.vocab_size}: it was not the tokenizer of this run's data"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OSError(f"cannot export to {out_dir}: it is a file, not a folder")
    if (
        out_dir.resolve() == Path(run_dir).resolve()
        or (out_dir / "config.yaml").exists()
        or (out_dir / INFO_FILE).exists()
    ):
        raise ValueError(
            f"cannot export to {out_dir}: it holds a checkfree run (its model.safetensors would be overwritten); "
            "choose another --out, e.g. RUN_DIR/hf"
        )
    eot = tokenizer.eot_id if tokenizer is not None else None
    tensors = hf_state(cfg, state)
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    config = hf_config(cfg, bos_id=eot, eos_id=eot)
    atomic_write(out_dir / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    tok_info = _write_tokenizer(out_dir, tokenizer, cfg.seq_len) if tokenizer is not None else None
    export_info = {
        "run_dir": str(Path(run_dir).resolve()),
        "step": info["step"],
        "checkfree_version": checkfree_version(),
        "weights_checkfree_version": info.get("checkfree_version"),
        "tokenizer": tok_info,
    }
    atomic_write(out_dir / EXPORT_INFO_FILE, lambda tmp: tmp.write_text(json.dumps(export_info, indent=2) + "\n"))
    return out_dir
