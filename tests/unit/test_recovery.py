import pytest
import torch

from checkfree.core.recovery import RecoveryPlan, plan_recovery, rebuild_blocks, uniform_average, weighted_average


def test_weighted_average_by_hand():
    prev = {"blocks.0.w": torch.tensor([1.0, 2.0])}
    nxt = {"blocks.0.w": torch.tensor([3.0, 6.0])}
    # norms 1 and 3, eps 0: w_prev = 1, w_next = 3 -> (3 * [3, 6] + 1 * [1, 2]) / 4 = [2.5, 5.0]
    out, weights = weighted_average(prev, nxt, prev_norm=1.0, next_norm=3.0, eps=0.0)
    assert torch.allclose(out["blocks.0.w"], torch.tensor([2.5, 5.0]))
    assert weights == pytest.approx((0.25, 0.75))


def test_weighted_average_eps_and_zero_norms():
    prev, nxt = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    out, weights = weighted_average(prev, nxt, 0.0, 0.0, eps=1e-4)
    assert torch.allclose(out["w"], torch.full((2,), 0.5)) and weights == pytest.approx((0.5, 0.5))
    out, weights = weighted_average(prev, nxt, 1.0, 0.0, eps=1e-4)
    assert weights[0] == pytest.approx(1.0001 / 1.0002)


def test_weighted_average_refuses_mismatched_or_bad_inputs():
    with pytest.raises(ValueError, match="key for key"):
        weighted_average({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"blocks.0.w has shape \(2,\) vs \(3,\)"):
        weighted_average({"blocks.0.w": torch.zeros(2)}, {"blocks.0.w": torch.zeros(3)}, 1.0, 1.0)
    with pytest.raises(ValueError, match="finite norm"):
        weighted_average({"a": torch.zeros(1)}, {"a": torch.zeros(1)}, float("nan"), 1.0)


def test_uniform_average():
    out, w = uniform_average({"a": torch.tensor([0.0])}, {"a": torch.tensor([4.0])})
    assert out["a"].item() == 2.0 and w == (0.5, 0.5)


@pytest.mark.parametrize(
    "strategy,stage,method,sources",
    [
        ("checkfree", 2, "weighted_average", (1, 3)),
        ("checkfree", 0, "copy", (1,)),
        ("checkfree", 5, "copy", (4,)),
        ("checkfree_plus", 0, "copy", (1,)),
        ("checkfree_plus", 5, "copy", (4,)),
        ("checkfree_plus", 3, "weighted_average", (2, 4)),
        ("uniform", 2, "uniform_average", (1, 3)),
        ("copy", 2, "copy", (1,)),
        ("copy", 0, "copy", (1,)),
        ("random", 2, "random", ()),
    ],
)
def test_single_failure_plans(strategy, stage, method, sources):
    (plan,) = plan_recovery({stage}, 6, strategy, "checkpoint", edge_replicas={"embed", "head"})
    assert (plan.method, plan.sources, plan.path) == (method, sources, "primary")
    expected_edge = None if 0 < stage < 5 else ("reinit" if strategy == "random" else "replica")
    assert plan.edge == expected_edge


def test_adjacent_failures_never_read_a_lost_stage():
    plans = plan_recovery({2, 3}, 6, "checkfree", "nearest")
    assert [(p.stage, p.sources, p.path) for p in plans] == [
        (2, (1, 4), "fallback:nearest"),
        (3, (1, 4), "fallback:nearest"),
    ]
    for lost in ({0, 1}, {1, 2}, {3, 4, 5}, {0, 1, 2, 3, 4}):
        for strategy in ("checkfree", "checkfree_plus", "copy", "uniform"):
            for p in plan_recovery(lost, 6, strategy, "nearest"):
                assert not set(p.sources) & lost


def test_adjacent_fallback_prefers_a_checkpoint_when_one_exists():
    plans = plan_recovery({1, 2}, 4, "checkfree_plus", "checkpoint", has_checkpoint=lambda s: s == 1)
    # stage 1 has a saved copy; stage 2 has none, so it averages the nearest live stages 0 and 3
    assert [(p.stage, p.method, p.sources, p.path) for p in plans] == [
        (1, "checkpoint", (), "fallback:checkpoint"),
        (2, "weighted_average", (0, 3), "fallback:nearest"),
    ]


def test_first_stage_with_its_partner_lost_falls_back_and_reinits_the_edge():
    (p0, p1) = plan_recovery({0, 1}, 4, "checkfree_plus", "nearest", edge_replicas=set())
    assert p0 == RecoveryPlan(0, "copy", (2,), "fallback:nearest", "reinit")
    assert p1.sources == (2,) and p1.path == "fallback:nearest"
    (q0, _) = plan_recovery({0, 1}, 4, "checkfree_plus", "random")
    assert q0.method == "random" and q0.path == "fallback:random"


def test_all_stages_lost_is_random():
    plans = plan_recovery({0, 1, 2, 3}, 4, "checkfree", "nearest")
    assert all(p.method == "random" and p.path == "fallback:random" for p in plans)


def test_plan_refuses_bad_stages_and_strategies():
    with pytest.raises(ValueError, match=r"\[7\]"):
        plan_recovery({7}, 4, "checkfree", "nearest")
    with pytest.raises(ValueError, match="checkpoint"):
        plan_recovery({1}, 4, "checkpoint", "nearest")


def test_rebuild_blocks_requires_every_source():
    plan = RecoveryPlan(2, "weighted_average", (1, 3), "primary", None)
    with pytest.raises(ValueError, match=r"\[3\]"):
        rebuild_blocks(plan, {1: {"a": torch.zeros(1)}}, {1: 1.0}, 1e-4)


def test_redundant_plans_fail_over_to_the_shadow_holder():
    plans = plan_recovery({0, 3}, 4, "redundant", "nearest")
    # stage 0's shadow lived on stage 3, lost too: fallback; stage 3's lives on stage 2: failover
    assert [(p.stage, p.method, p.sources, p.path, p.edge) for p in plans] == [
        (0, "copy", (1,), "fallback:nearest", "reinit"),
        (3, "shadow", (2,), "primary", "shadow"),
    ]
    (p,) = plan_recovery({2}, 4, "redundant", "nearest")
    assert (p.method, p.sources, p.path) == ("shadow", (1,), "primary")
    (p,) = plan_recovery({0}, 4, "redundant", "nearest")
    assert (p.method, p.sources, p.edge) == ("shadow", (3,), "shadow")  # the first stage's shadow lives on the last
