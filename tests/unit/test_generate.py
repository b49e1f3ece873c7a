"""Sampling: greedy is the model's argmax step by step, draws are reproducible by seed, the context is cropped
to seq_len, and bad arguments are refused by name."""

import pytest
import torch

from checkfree.core.generate import generate, next_token
from checkfree.core.model import ModelConfig, build_stages
from checkfree.core.weights import model_state

CFG = ModelConfig(vocab_size=29, d_model=16, num_heads=2, num_layers=2, num_stages=2, seq_len=8, init_std=0.5)
STATE = model_state(build_stages(CFG, 0))  # a large init_std: logits far from uniform, so greedy has a clear winner


def _logits(ids):
    (stage,) = build_stages(CFG, 0, num_stages=1)
    with torch.no_grad():
        return stage.run_head(stage.run_blocks(stage.run_embed(torch.tensor([ids]))))[0, -1]


def test_greedy_is_the_argmax_at_every_step():
    prompt = [1, 2, 3]
    out = generate(CFG, STATE, prompt, 3, temperature=0, top_k=0, seed=0)
    want = []
    for _ in range(3):
        want.append(int(_logits(prompt + want).argmax()))
    assert out == want
    assert generate(CFG, STATE, prompt, 3, temperature=0, top_k=5, seed=9) == want  # no randomness at all


def test_draws_are_reproducible_by_seed_and_top_k_1_is_greedy():
    prompt = [4, 5]
    a = generate(CFG, STATE, prompt, 20, temperature=2.0, top_k=0, seed=1)
    assert a == generate(CFG, STATE, prompt, 20, temperature=2.0, top_k=0, seed=1) and len(a) == 20
    assert a != generate(CFG, STATE, prompt, 20, temperature=2.0, top_k=0, seed=2)
    greedy = generate(CFG, STATE, prompt, 5, temperature=0, top_k=0, seed=0)
    assert generate(CFG, STATE, prompt, 5, temperature=1.0, top_k=1, seed=3) == greedy


def test_top_k_never_draws_outside_the_k_most_likely():
    logits = torch.arange(10.0)
    gen = torch.Generator().manual_seed(0)
    assert {next_token(logits, 100.0, 3, gen) for _ in range(200)} == {7, 8, 9}


def test_the_context_is_cropped_to_seq_len():
    long = list(range(20))  # longer than seq_len=8: only the last 8 tokens are seen
    assert generate(CFG, STATE, long, 4, 0, 0, 0) == generate(CFG, STATE, long[-8:], 4, 0, 0, 0)


def test_stop_id_ends_the_text():
    first = generate(CFG, STATE, [1], 1, 0, 0, 0)[0]
    assert generate(CFG, STATE, [1], 10, 0, 0, 0, stop_id=first) == [first]


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ([], {}, "the prompt is empty"),
        ([3, 29], {}, "prompt token id 29 is outside the model's vocabulary 0..28"),
        ([3], {"max_new_tokens": -1}, "max_new_tokens=-1 must be >= 0"),
        ([3], {"temperature": -0.5}, "temperature=-0.5 must be >= 0"),
        ([3], {"top_k": -2}, "top_k=-2 must be >= 0"),
    ],
)
def test_bad_arguments_are_refused(prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(CFG, STATE, prompt, **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_a_temperature_that_is_no_number_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        generate(CFG, STATE, [1, 2], 3, temperature=temperature)
