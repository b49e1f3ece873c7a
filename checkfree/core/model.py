"""
Model
=====

A LLaMa-style decoder (RoPE, RMSNorm, SwiGLU, untied embedding and head) cut into pipeline stages.

Every stage owns ``blocks.0 .. blocks.{k-1}`` under local names, so neighbouring stages' state dicts line
up key for key and can be averaged. The first stage also owns the token embedding (``embed``), the last
the final norm and output head (``norm``, ``head``). Parameters are initialised from a generator seeded by
the *global* layer index, so a stage built alone, the same stage inside a different split, and the unsplit
model all start from identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from checkfree.core.seeding import hash_seed


@dataclass
class ModelConfig:
    vocab_size: int = 256  # tokens; 256 for the byte-level tokenizer
    d_model: int = 128  # residual width
    num_heads: int = 4  # attention heads; must divide d_model
    num_layers: int = 8  # transformer blocks in the whole model
    num_stages: int = 4  # pipeline stages; must divide num_layers
    ffn_hidden: int = 0  # SwiGLU hidden width; 0 means 4 * d_model (the paper's setting)
    seq_len: int = 128  # context length in tokens
    init_std: float = 0.02  # std of the normal init of every linear and embedding weight
    norm_eps: float = 1e-5  # epsilon of every RMSNorm
    rope_theta: float = 10000.0  # RoPE base of the rotary frequencies

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "num_stages", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.num_heads={self.num_heads}")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError(f"model.d_model/num_heads={self.d_model // self.num_heads} must be even for RoPE")
        if self.num_layers % self.num_stages:
            raise ValueError(
                f"model.num_layers={self.num_layers} must be divisible by model.num_stages="
                f"{self.num_stages} (every stage holds the same number of blocks so that "
                "neighbours can be averaged layer by layer)"
            )
        if self.ffn_hidden < 0:
            raise ValueError(f"model.ffn_hidden={self.ffn_hidden} must be >= 0 (0 means 4 * d_model)")

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 4 * self.d_model

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.num_stages


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); rotate interleaved pairs (x0, x1) by the position's angle
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        gate, up = self.gate_up(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Stage(nn.Module):
    """One pipeline stage: optional embedding, ``layers_per_stage`` blocks, optional norm and head.

    A microbatch's visit to a stage (a schedule *hop*) may use any subset of the three parts: under the
    CheckFree+ swapped route the first stage runs only its embedding on one visit and only its blocks on
    the next.
    """

    def __init__(self, cfg: ModelConfig, index: int, num_stages: int | None = None):
        super().__init__()
        num_stages = cfg.num_stages if num_stages is None else num_stages
        if not 0 <= index < num_stages:
            raise ValueError(f"stage index {index} out of range: expected 0..{num_stages - 1}")
        self.index, self.num_stages = index, num_stages
        per_stage = cfg.num_layers // num_stages
        self.first_layer = index * per_stage
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model) if index == 0 else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(per_stage))
        last = index == num_stages - 1
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if last else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if last else None
        cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.num_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def run_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.embed is not None, f"stage {self.index} has no embedding"
        return self.embed(tokens)  # (B, T) -> (B, T, C)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, self.rope_cos, self.rope_sin)
        return h

    def run_head(self, h: torch.Tensor) -> torch.Tensor:
        assert self.head is not None and self.norm is not None, f"stage {self.index} has no head"
        return self.head(self.norm(h))  # (B, T, C) -> (B, T, V)


def init_stage_(stage: Stage, cfg: ModelConfig, seed: int, salt: int = 0) -> None:
    """Initialise ``stage`` in place: N(0, init_std) weights, unit norms.

    Each block draws from a generator seeded by (seed, global layer index, salt); the embedding and
    head use their own streams. ``salt`` > 0 gives a fresh, different draw (random re-initialisation).
    """

    def normal_(params: list[torch.Tensor], stream: int) -> None:
        gen = torch.Generator().manual_seed(hash_seed(seed, stream, salt))
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen) * cfg.init_std)

    for k, block in enumerate(stage.blocks):
        normal_(
            [block.qkv.weight, block.proj.weight, block.gate_up.weight, block.down.weight],
            stream=1 + stage.first_layer + k,
        )
        with torch.no_grad():
            block.attn_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
    for kind in ("embed", "head"):
        if (stage.embed if kind == "embed" else stage.head) is not None:
            stage.load_state_dict(initial_edge_state(cfg, seed, kind, salt), strict=False)


def initial_edge_state(cfg: ModelConfig, seed: int, kind: str, salt: int = 0) -> dict[str, torch.Tensor]:
    """The embedding (``kind='embed'``) or final norm + head (``kind='head'``) exactly as ``init_stage_``
    draws them, without building the stage that owns them (the initial copy a replica holder keeps)."""
    gen = torch.Generator().manual_seed(hash_seed(seed, -1 if kind == "embed" else -2, salt))
    if kind == "embed":
        return {"embed.weight": torch.randn((cfg.vocab_size, cfg.d_model), generator=gen) * cfg.init_std}
    return {
        "norm.weight": torch.ones(cfg.d_model),
        "head.weight": torch.randn((cfg.vocab_size, cfg.d_model), generator=gen) * cfg.init_std,
    }


def build_stages(cfg: ModelConfig, seed: int, num_stages: int | None = None) -> list[Stage]:
    """All stages of the model (``num_stages=1`` gives the unsplit model with the same weights)."""
    num_stages = cfg.num_stages if num_stages is None else num_stages
    stages = [Stage(cfg, i, num_stages) for i in range(num_stages)]
    for s in stages:
        init_stage_(s, cfg, seed)
    return stages


def param_count(stages: list[Stage]) -> int:
    return sum(p.numel() for s in stages for p in s.parameters())


BLOCK_PREFIX = "blocks."
EMBED_PREFIX = "embed."
HEAD_PREFIXES = ("norm.", "head.")


def block_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(BLOCK_PREFIX)}


def edge_state(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The embedding (``kind='embed'``) or final norm + head (``kind='head'``) entries of a state dict."""
    prefixes = (EMBED_PREFIX,) if kind == "embed" else HEAD_PREFIXES
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}
