"""The pipelining benchmark (scripts/bench_pipelining.py, run as a command: no test loads a script): the ratio
interval on known numbers, the summary and page of known runs (the recorded result regenerated), and that
the torch side's stage modules and loss (launcher/torch_pipeline.py), fed torch's own microbatch split,
compute what checkfree's engine computes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

from checkfree.analysis.pipelining import PipeliningBench, add_run, empty_data, page, ratio_interval, summarise
from checkfree.config import load_config
from checkfree.core.data import Batches
from checkfree.core.model import build_stages
from checkfree.core.schedule import build_schedule
from checkfree.engine.pipeline import PipelineEngine
from launcher.torch_pipeline import TorchStage, microbatch_loss, stacked

ROOT = Path(__file__).resolve().parents[2]
T_975_DF2 = 4.302652729911275  # Student t quantile, 0.975, 2 degrees of freedom (tables)


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--steps", "5", "--skip", "5"], "--steps 5 must exceed --skip 5"),
        (["--rounds", "0"], "--rounds 0 must be >= 1"),
    ],
)
def test_the_command_line_refuses_what_cannot_be_measured(argv: list[str], said: str) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/bench_pipelining.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]


def test_ratio_interval_t_on_log_ratios() -> None:
    theirs = [100.0, 200.0, 50.0]
    ours = [t * math.exp(x) for t, x in zip(theirs, (0.1, 0.2, 0.3))]  # log ratios: mean 0.2, sd 0.1
    r = ratio_interval(ours, theirs)
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert r["estimate"] == pytest.approx(math.exp(0.2))
    assert (r["low"], r["high"]) == (pytest.approx(math.exp(0.2 - half)), pytest.approx(math.exp(0.2 + half)))
    assert r["n"] == 3 and r["method"] == "t interval on per-round log ratios"


def test_ratio_interval_one_round_gives_no_interval() -> None:
    one = ratio_interval([3.0], [2.0])
    assert one["estimate"] == pytest.approx(1.5) and one["low"] is None and one["high"] is None
    assert one["n"] == 1 and one["method"] == "one round: no interval"


def test_the_recorded_result_is_regenerated() -> None:
    """docs/results/pipelining.json: its ratios to torch from its per-round medians, and its page, exactly."""
    recorded = json.loads((ROOT / "docs/results/pipelining.json").read_text())
    for sides in recorded["results"].values():
        theirs = sides["torch"]["per_round_median_tokens_per_s"]
        for side, row in sides.items():
            if side != "torch":
                assert ratio_interval(row["per_round_median_tokens_per_s"], theirs) == row["ratio_to_torch"]
    assert page(recorded) == (ROOT / "docs/results/pipelining.md").read_text()


def _rows(rates: list[float], losses: list[float]) -> list[dict]:
    return [{"step": s, "throughput/tokens_per_s": r, "loss/train": x} for s, (r, x) in enumerate(zip(rates, losses))]


def test_runs_fold_into_medians_ratios_and_loss_gaps() -> None:
    bench = PipeliningBench(
        ["c.yaml"], [], steps=4, rounds=2, skip=1, tail=2, schedules=["1f1b"], sides=["torch", "static"]
    )
    assert bench.order(0) == [("1f1b", "torch"), ("1f1b", "static")]
    assert bench.order(1) == [("1f1b", "static"), ("1f1b", "torch")]
    data = empty_data(bench)
    add_run(data[("1f1b", "torch")], _rows([1, 10, 20, 30], [4.0, 3.0, 2.0, 1.0]), 100.0, 5.0, bench.skip)
    add_run(data[("1f1b", "static")], _rows([1, 20, 40, 60], [4.0, 3.0, 2.5, 1.0]), 120.0, 6.0, bench.skip)
    add_run(data[("1f1b", "torch")], _rows([1, 10, 10, 10], [4.0, 3.0, 2.0, 1.0]), 90.0, 5.0, bench.skip)
    add_run(data[("1f1b", "static")], _rows([1, 40, 40, 40], [4.0, 3.0, 2.0, 1.0]), 110.0, 6.0, bench.skip)
    summary = summarise(data, bench.tail)["1f1b"]
    torch_row, static = summary["torch"], summary["static"]
    assert torch_row["per_round_median_tokens_per_s"] == [20, 10] and torch_row["median_tokens_per_s"] == 10
    assert "ratio_to_torch" not in torch_row and torch_row["max_stage_process_rss_mb"] == 100.0
    assert static["per_round_median_tokens_per_s"] == [40, 40] and static["median_tokens_per_s"] == 40
    assert static["ratio_to_torch"]["estimate"] == pytest.approx(math.sqrt(2 * 4))  # geo-mean of 2 and 4
    assert static["ratio_of_pooled_medians"] == 4.0 and static["max_abs_loss_gap_to_torch"] == 0.5
    assert static["train_loss_tail"] == pytest.approx((1.75 + 1.5) / 2) and static["run_wall_s"] == [6.0, 6.0]
    assert bench.common_overrides(Path("/t"))[-2:] == ["out_dir=/t", "swarm.num_spares=0"]


def test_torch_stages_compute_the_engines_loss_and_gradients() -> None:
    cfg = load_config(["configs/tiny.yaml"], ["pipeline.num_microbatches=2", "failures.mode=none"])
    L, M = cfg.model.num_stages, cfg.pipeline.num_microbatches
    batches = Batches(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.seed)
    engine = PipelineEngine(build_stages(cfg.model, cfg.seed), build_schedule("gpipe", L, M), batches, cfg.optim)
    expected = engine.run_step(3)

    stages = build_stages(cfg.model, cfg.seed)
    wrapped = [TorchStage(s) for s in stages]
    # the same split the schedule makes of the stacked step batch
    inputs, _ = split_args_kwargs_into_chunks((stacked(batches.inputs, 3, M),), None, M)
    targets, _ = split_args_kwargs_into_chunks((stacked(batches.targets, 3, M),), None, M)
    total = 0.0
    for m, ((x,), (y,)) in enumerate(zip(inputs, targets)):
        assert torch.equal(x, batches.inputs(3, m)) and torch.equal(y, batches.targets(3, m))
        for module in wrapped:
            x = module(x)
        loss = microbatch_loss(x, y, M)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(expected, rel=1e-6)
    for ours, theirs in zip(stages, engine.stages):
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
