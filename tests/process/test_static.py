"""The static pipeline (fault-tolerance machinery off) runs the swarm's workers in real processes and
trains exactly what the engine trains: the baseline of the overhead and scaling benchmarks is sound."""

import multiprocessing

import pytest

from checkfree.core.metrics import read_jsonl
from checkfree.engine.trainer import Trainer
from launcher.static import run_static_pipeline
from tests.helpers import tiny_config


# bf16 in the long group (~10 s): tests/unit/test_precision.py runs the bf16 workers against the bf16 engine
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.long)])
def test_static_pipeline_reproduces_the_engine(tmp_path, precision):
    cfg = tiny_config(tmp_path, "num_steps=4", "num_threads=1", "failures.mode=none", f"precision={precision}")
    records = run_static_pipeline(cfg, tmp_path / "static", timeout_s=120)
    reference = Trainer(cfg)
    reference.run()
    expected = [m["loss/train"] for m in read_jsonl(reference.run_dir / "metrics.jsonl")]
    assert len(records) == cfg.model.num_stages
    for stage_records in records:
        assert [r["step"] for r in stage_records] == [0, 1, 2, 3]
        assert [r["loss/train"] for r in stage_records] == pytest.approx(expected, abs=1e-5)
        assert all(r["memory/max_rss_mb"] > 50 and r["throughput/tokens_per_s"] > 0 for r in stage_records)


def test_a_failing_stage_process_is_reported_and_nothing_is_left_running(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "num_steps=2",
        "num_threads=1",
        "transport.rendezvous_timeout_s=3",
        "transport.timeout_s=3",
        "data.source=text",
        f"data.path={tmp_path}/corpus.txt",
    )
    (tmp_path / "corpus.txt").write_text("x" * 50000)  # the config checks the file exists ...
    (tmp_path / "corpus.txt").unlink()  # ... then it is gone: every stage process fails to read its data
    with pytest.raises(RuntimeError, match=r"stages \(stage, exit code\) \[\(0, 1\)"):
        run_static_pipeline(cfg, tmp_path / "static", timeout_s=60)
    assert multiprocessing.active_children() == []
