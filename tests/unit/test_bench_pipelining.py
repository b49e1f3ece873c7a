"""scripts/bench_pipelining.py: its command line, the ratio interval on known numbers, and that the torch
side's stage modules and loss, fed torch's own microbatch split, compute what checkfree's engine computes."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

from checkfree.config import load_config
from checkfree.core.data import Batches
from checkfree.core.model import build_stages
from checkfree.core.schedule import build_schedule
from checkfree.engine.pipeline import PipelineEngine
from scripts import bench_pipelining as bp

T_975_DF2 = 4.302652729911275  # Student t quantile, 0.975, 2 degrees of freedom (tables)


def test_parse_args_defaults_and_split() -> None:
    ns = bp.parse_args([])
    assert ns.files == [bp.DEFAULT_CONFIG] and ns.overrides == []
    assert ns.schedules == ["gpipe", "1f1b"] and ns.sides == ["torch", "static", "swarm"]
    ns = bp.parse_args(["configs/tiny.yaml", "optim.lr=1e-3", "--steps", "8", "--rounds", "1", "--schedules", "1f1b"])
    assert ns.files == ["configs/tiny.yaml"] and ns.overrides == ["optim.lr=1e-3"]
    assert (ns.steps, ns.rounds, ns.schedules) == (8, 1, ["1f1b"])


@pytest.mark.parametrize("argv", [["--steps", "5", "--skip", "5"], ["--rounds", "0"], ["--schedules", "zb"]])
def test_parse_args_refuses(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bp.parse_args(argv)


def test_ratio_interval_t_on_log_ratios() -> None:
    theirs = [100.0, 200.0, 50.0]
    ours = [t * math.exp(x) for t, x in zip(theirs, (0.1, 0.2, 0.3))]  # log ratios: mean 0.2, sd 0.1
    r = bp.ratio_interval(ours, theirs)
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert r["estimate"] == pytest.approx(math.exp(0.2))
    assert (r["low"], r["high"]) == (pytest.approx(math.exp(0.2 - half)), pytest.approx(math.exp(0.2 + half)))
    assert r["n"] == 3 and r["method"].startswith("t interval")


def test_ratio_interval_one_round_and_no_scipy(monkeypatch) -> None:
    one = bp.ratio_interval([3.0], [2.0])
    assert one["estimate"] == pytest.approx(1.5) and one["low"] is None and one["high"] is None
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import fails: the bootstrap stands in
    r = bp.ratio_interval([1.1, 1.3, 1.2, 1.25], [1.0, 1.0, 1.0, 1.0])
    assert r["method"] == "percentile bootstrap" and 1.1 <= r["low"] < r["estimate"] < r["high"] <= 1.3


def test_torch_stages_compute_the_engines_loss_and_gradients() -> None:
    cfg = load_config(["configs/tiny.yaml"], ["pipeline.num_microbatches=2", "failures.mode=none"])
    L, M = cfg.model.num_stages, cfg.pipeline.num_microbatches
    batches = Batches(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.seed)
    engine = PipelineEngine(build_stages(cfg.model, cfg.seed), build_schedule("gpipe", L, M), batches, cfg.optim)
    expected = engine.run_step(3)

    stages = build_stages(cfg.model, cfg.seed)
    wrapped = [bp.TorchStage(s) for s in stages]
    # the same split the schedule makes of the stacked step batch
    inputs, _ = split_args_kwargs_into_chunks((bp.stacked(batches.inputs, 3, M),), None, M)
    targets, _ = split_args_kwargs_into_chunks((bp.stacked(batches.targets, 3, M),), None, M)
    total = 0.0
    for m, ((x,), (y,)) in enumerate(zip(inputs, targets)):
        assert torch.equal(x, batches.inputs(3, m)) and torch.equal(y, batches.targets(3, m))
        for module in wrapped:
            x = module(x)
        loss = bp.microbatch_loss(x, y, M)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(expected, rel=1e-6)
    for ours, theirs in zip(stages, engine.stages):
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
