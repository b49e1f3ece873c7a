"""
Sampling
========

Text from a trained model: the unsplit model (one stage holding every layer, ``stages_from_state(...,
num_stages=1)``) predicts one token at a time from at most ``seq_len`` tokens of context (the positions
RoPE was trained on). Greedy at temperature 0; otherwise sampled from the top ``top_k`` logits divided by
the temperature, with a seeded ``torch.Generator``, so the same seed gives the same text.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from checkfree.core.model import ModelConfig, Stage
from checkfree.core.weights import stages_from_state


def _check(cfg: ModelConfig, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token to continue from")
    bad = [i for i in prompt_ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise ValueError(
            f"prompt token id {bad[0]} is outside the model's vocabulary 0..{cfg.vocab_size - 1} "
            f"({len(bad)} such ids): the prompt was not encoded with the tokenizer the model was trained on"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not 0 <= temperature < float("inf"):  # NaN fails too
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0: no limit)")


def next_token(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """One token from the last position's logits ``(V,)``: argmax at temperature 0, else a seeded draw."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def generate(
    model_cfg: ModelConfig,
    state: Mapping[str, torch.Tensor],
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """The tokens that follow ``prompt_ids`` (the prompt itself not included).

    Args:
        state: the model under global names (``load_weights``).
        temperature: 0 picks the most likely token every time; higher flattens the distribution.
        top_k: sample among the ``top_k`` most likely tokens only (0: all of them).
        seed: seeds the sampler: the same arguments give the same tokens.
        stop_id: stop after generating this id (e.g. the tokenizer's end of text); it is included.

    Raises:
        ValueError: an empty prompt, a prompt id outside the vocabulary, or a negative argument.
        WeightsError: ``state`` is not the model ``model_cfg`` describes.
    """
    _check(model_cfg, prompt_ids, max_new_tokens, temperature, top_k)
    (model,) = stages_from_state(model_cfg, state, num_stages=1)
    return sample(model, model_cfg.seq_len, prompt_ids, max_new_tokens, temperature, top_k, seed, stop_id)


@torch.inference_mode()
def sample(
    model: Stage,
    seq_len: int,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    stop_id: int | None = None,
) -> list[int]:
    """``generate`` on an unsplit model already built (no checks)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids, new = list(prompt_ids), []
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-seq_len:]])  # (1, T <= seq_len): RoPE knows no later positions
        logits = model.run_head(model.run_blocks(model.run_embed(context)))[0, -1]  # (V,)
        token = next_token(logits, temperature, top_k, gen)
        ids.append(token)
        new.append(token)
        if token == stop_id:
            break
    return new
