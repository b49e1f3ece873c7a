"""The norm that weights a neighbour (blocks only by default, the whole stage or post-clip on request), the
CheckFree+ partner rule, and the refusal of a swap that swaps nothing."""

from __future__ import annotations

import math

import pytest
import torch

from checkfree.config import ConfigError, load_config
from checkfree.core.metrics import read_jsonl
from checkfree.core.model import ModelConfig, build_stages
from checkfree.core.recovery import plan_recovery
from checkfree.core.stage_step import clip_stage_, recovery_norm
from checkfree.engine.trainer import Trainer
from tests.helpers import TINY, tiny_config

MODEL = ModelConfig(vocab_size=256, d_model=16, num_heads=2, num_layers=4, num_stages=4, seq_len=8)


def _fill_grads(stage, block: float, edge: float) -> tuple[int, int]:
    """Every block gradient entry = ``block``, every other = ``edge``; returns (block numel, other numel)."""
    nb = ne = 0
    for name, p in stage.named_parameters():
        value = block if name.startswith("blocks.") else edge
        p.grad = torch.full_like(p, value)
        nb, ne = (nb + p.numel(), ne) if name.startswith("blocks.") else (nb, ne + p.numel())
    return nb, ne


@pytest.mark.parametrize("index", [0, 3])
def test_an_edge_stage_weighs_by_its_blocks_only_pinned_numerically(index):
    stage = build_stages(MODEL, seed=0)[index]
    nb, ne = _fill_grads(stage, block=0.01, edge=0.5)
    assert ne > 0  # the embedding (stage 0) or the final norm and head (stage 3)
    norms = clip_stage_(stage, max_norm=1.0)
    want_blocks = 0.01 * math.sqrt(nb)
    want_total = math.sqrt(0.01**2 * nb + 0.5**2 * ne)
    assert norms.scoped == pytest.approx(want_blocks, rel=1e-5)
    assert norms.total == pytest.approx(want_total, rel=1e-5)
    assert norms.total > 1.0  # so the gradient was clipped, and post-clip is the clip's share of the blocks' norm
    assert norms.post_clip == pytest.approx(want_blocks / (want_total + 1e-6), rel=1e-5)
    # the gradient really was clipped by the whole stage's norm
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in stage.parameters()))
    assert clipped == pytest.approx(1.0, rel=1e-4)


def test_stage_scope_is_the_whole_stage_and_a_middle_stage_has_only_blocks():
    s0, s1 = build_stages(MODEL, seed=0)[:2]
    nb, ne = _fill_grads(s0, block=0.01, edge=0.5)
    whole = clip_stage_(s0, max_norm=0.0, scope="stage")  # no clipping: post-clip equals pre-clip
    assert whole.scoped == whole.total == pytest.approx(math.sqrt(0.01**2 * nb + 0.5**2 * ne), rel=1e-5)
    assert whole.post_clip == whole.scoped
    _fill_grads(s1, block=0.02, edge=9.0)
    assert clip_stage_(s1, 0.0, "blocks").scoped == pytest.approx(clip_stage_(s1, 0.0, "stage").scoped)
    with pytest.raises(ValueError, match="norm_scope='heads' is not one of blocks, stage"):
        clip_stage_(s1, 1.0, "heads")


def test_recovery_norm_sources():
    assert recovery_norm(3.0, 2.0, "raw", 1.0) == 3.0
    assert recovery_norm(3.0, 2.0, "smoothed", 1.0) == 2.0
    assert recovery_norm(3.0, 2.0, "post_clip", 1.0) == 1.0
    assert recovery_norm(3.0, None, "smoothed", None) == 3.0  # nothing smoothed yet
    assert recovery_norm(3.0, None, "post_clip", None) == 3.0  # nothing measured yet


@pytest.mark.parametrize(
    ("scope", "source"), [("blocks", "raw"), ("stage", "raw"), ("blocks", "post_clip"), ("stage", "post_clip")]
)
def test_the_engine_weighs_a_rebuild_by_the_configured_norm(tmp_path, scope, source):
    """Stage 1 is rebuilt from stages 0 and 2; the weights come from the norm the options name, computed
    here independently from the gradients of the step before."""
    cfg = tiny_config(
        tmp_path, "recovery.strategy=checkfree", f"recovery.norm_scope={scope}", f"recovery.norm_source={source}"
    )
    trainer = Trainer(cfg)
    eng = trainer.engine
    eng.run_step(0)
    expected = {}
    for s in (0, 2):
        grads = [p.grad for n, p in eng.stages[s].named_parameters() if scope == "stage" or n.startswith("blocks.")]
        total = float(torch.nn.utils.get_total_norm([p.grad for p in eng.stages[s].parameters()]))
        pre = float(torch.nn.utils.get_total_norm(grads))
        expected[s] = pre * min(1.0, 1.0 / (total + 1e-6)) if source == "post_clip" else pre
    assert eng.commit()
    trainer.state.step = 1
    trainer.recover([1])
    trainer.events.close()
    rebuilt = [e for e in read_jsonl(trainer.run_dir / "events.jsonl") if e["event"] == "rebuilt"][-1]
    assert rebuilt["source_norms"] == pytest.approx([expected[0], expected[2]], rel=1e-5)
    w0, w2 = expected[0] + 1e-4, expected[2] + 1e-4
    assert rebuilt["weights"] == pytest.approx([w0 / (w0 + w2), w2 / (w0 + w2)], rel=1e-5)


def test_the_embedding_skews_a_whole_stage_norm():
    """Why blocks only is the default: in a trained tiny model stage 0's whole norm is dominated by its
    embedding, its blocks' norm is of the order of stage 2's."""
    cfg = load_config([], [*TINY, "failures.mode=none", "out_dir=/nonexistent", "recovery.norm_scope=stage"])
    stages = build_stages(cfg.model, cfg.seed)
    x = torch.randint(0, 256, (4, 32))
    h = stages[0].run_embed(x)
    for s in stages:
        h = s.run_blocks(h)
    stages[-1].run_head(h).logsumexp(-1).mean().backward()
    blocks = clip_stage_(stages[0], 0.0, "blocks").scoped
    whole = clip_stage_(stages[0], 0.0, "stage").scoped
    assert whole > blocks


def test_partner_rule_copy_rebuilds_stages_1_and_l2_from_their_swap_partners():
    plans = plan_recovery([1], 6, "checkfree_plus", "nearest", partner_rule="copy")
    assert (plans[0].method, plans[0].sources) == ("copy", (0,))
    plans = plan_recovery([4], 6, "checkfree_plus", "nearest", partner_rule="copy")
    assert (plans[0].method, plans[0].sources) == ("copy", (5,))
    plans = plan_recovery([2], 6, "checkfree_plus", "nearest", partner_rule="copy")  # not a partner: averaged
    assert (plans[0].method, plans[0].sources) == ("weighted_average", (1, 3))
    plans = plan_recovery([1], 6, "checkfree_plus", "nearest")  # ours: averaged like any middle stage
    assert (plans[0].method, plans[0].sources) == ("weighted_average", (0, 2))
    plans = plan_recovery([1], 6, "checkfree", "nearest", partner_rule="copy")  # no swap partners in checkfree
    assert plans[0].method == "weighted_average"
    # the partner lost too: the fallback, never the lost partner's weights
    plans = plan_recovery([0, 1], 6, "checkfree_plus", "nearest", partner_rule="copy")
    assert [(p.stage, p.sources, p.path) for p in plans] == [
        (0, (2,), "fallback:nearest"),
        (1, (2,), "fallback:nearest"),
    ]


def test_partner_rule_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="recovery.partner_rule='clone' is not one of average, copy"):
        tiny_config(tmp_path, "recovery.partner_rule=clone")
    with pytest.raises(ConfigError, match="recovery.norm_scope='embed' is not one of blocks, stage"):
        tiny_config(tmp_path, "recovery.norm_scope=embed")
    with pytest.raises(ConfigError, match="recovery.norm_source='clipped' is not one of raw, smoothed, post_clip"):
        tiny_config(tmp_path, "recovery.norm_source=clipped")


def test_a_swap_that_swaps_no_microbatch_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"swap_fraction=0.5 of pipeline.num_microbatches=1 swaps no microbatch"):
        tiny_config(tmp_path, "recovery.strategy=checkfree_plus", "pipeline.num_microbatches=1")
    with pytest.raises(ConfigError, match=r"swap_fraction=0.2 of pipeline.num_microbatches=4 swaps no microbatch"):
        tiny_config(tmp_path, "pipeline.swap=true", "recovery.strategy=checkfree", "pipeline.swap_fraction=0.2")
    with pytest.raises(ConfigError, match="checkfree_plus .* pipeline.swap=false trains no partner"):
        tiny_config(tmp_path, "recovery.strategy=checkfree_plus", "pipeline.swap=false")
    # one microbatch in four is enough; no swap asked for is fine with one microbatch
    assert tiny_config(tmp_path, "recovery.strategy=checkfree_plus", "pipeline.swap_fraction=0.25").swap_enabled
    assert not tiny_config(tmp_path, "recovery.strategy=checkfree", "pipeline.num_microbatches=1").swap_enabled


def test_a_partner_rule_is_refused_where_nothing_has_a_swap_partner(tmp_path):
    with pytest.raises(ConfigError, match="recovery.partner_rule=copy .* recovery.strategy=checkfree has none"):
        tiny_config(tmp_path, "recovery.strategy=checkfree", "recovery.partner_rule=copy")
    cfg = tiny_config(tmp_path, "recovery.strategy=hybrid", "recovery.partner_rule=copy")
    assert cfg.recovery.partner_rule == "copy"
