"""The memory plan a peer prints and checks at start: its parts add up, its activation estimate is close to
what autograd really keeps, the schedule decides how many microbatches are held, and a config that cannot
fit is refused naming the numbers."""

import pytest
import torch

from checkfree.config import load_config
from checkfree.core.memory_plan import (
    MemoryPlanError,
    check_fits,
    hop_activation_elements,
    in_flight,
    plan_for,
    stage_params,
)
from checkfree.core.model import ModelConfig, Stage
from checkfree.core.schedule import build_schedule

M = ModelConfig(d_model=64, num_heads=4, num_layers=8, num_stages=4, seq_len=64)


def _saved_bytes(fn) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_the_parameter_count_is_the_models():
    for i in range(M.num_stages):
        assert stage_params(M, i) == sum(p.numel() for p in Stage(M, i).parameters())


@pytest.mark.parametrize("stage, head", [(1, False), (3, True)])
def test_the_activation_estimate_is_within_half_again_of_what_autograd_keeps(stage, head):
    B = 8
    s = Stage(M, stage)
    x = torch.randn(B, M.seq_len, M.d_model, requires_grad=True)
    measured = _saved_bytes(lambda: s.run_head(s.run_blocks(x)) if head else s.run_blocks(x))
    estimated = hop_activation_elements(M, B, blocks=True, head=head) * 4
    assert 1 / 1.5 <= estimated / measured <= 1.5, (estimated, measured)


def test_gpipe_holds_every_microbatch_and_1f1b_at_most_the_pipeline_depth():
    gpipe, one_f = build_schedule("gpipe", 4, 8, 0.0), build_schedule("1f1b", 4, 8, 0.0)
    assert [in_flight(gpipe, s) for s in range(4)] == [8] * 4
    assert all(in_flight(one_f, s) <= 4 for s in range(4)) and in_flight(one_f, 0) == 4


def test_the_plan_adds_up_and_counts_the_replica_and_the_shadow():
    cfg = load_config(["configs/bench.yaml"], [])
    from checkfree.core.schedule import schedule_for

    schedule = schedule_for(cfg.pipeline, 4, cfg.swap_enabled)
    p1 = plan_for(cfg, schedule, 1)
    assert p1.edge_replica == M.vocab_size * M.d_model * 4  # CheckFree+: stage 1 keeps the embedding
    assert p1.adam == 2 * p1.weights and p1.gradients == p1.weights
    assert p1.total == sum((p1.weights, p1.gradients, p1.adam, p1.activations, p1.edge_replica, p1.shadow))
    bf16 = plan_for(load_config(["configs/bench.yaml"], ["precision=bf16"]), schedule, 1)
    assert bf16.activations * 2 == p1.activations and bf16.weights == p1.weights  # fp32 masters
    redundant = load_config(["configs/bench.yaml"], ["recovery.strategy=redundant", "pipeline.swap=false"])
    r1 = plan_for(redundant, schedule_for(redundant.pipeline, 4, False), 1)
    assert r1.shadow >= 4 * stage_params(M, 2) * 4
    spare = plan_for(cfg, schedule, None)  # a spare may take any stage: the largest
    assert spare.total == max(plan_for(cfg, schedule, s).total for s in range(4))


def test_a_config_that_cannot_fit_is_refused_naming_the_numbers():
    cfg = load_config(["configs/bench.yaml"], [])
    from checkfree.core.schedule import schedule_for

    plan = plan_for(cfg, schedule_for(cfg.pipeline, 4, cfg.swap_enabled), 3)
    check_fits(plan, plan.total * 2, "this host")
    with pytest.raises(MemoryPlanError, match=r"cannot fit: stage 3: .* MiB = weights .* but this host has 0\.5 MiB"):
        check_fits(plan, 2**19, "this host")
