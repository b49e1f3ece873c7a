"""A real local swarm's metrics follow checkfree.core.metrics' schema: each peer's own rows, and the run
directory's merged step records that analysis reads alike for both executors."""

import pytest

from checkfree.analysis.runs import read_metrics, val_curve
from checkfree.core.metrics import check_rows, read_jsonl
from tests.helpers import run_swarm

# ~15 s, -m long: the default run checks every peer row and merged step record of a real swarm in
# test_swarm.py::test_swarm_reproduces_the_engine_and_refuses_a_foreign_peer; this one adds validation rows
pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(240)]


def test_a_local_swarm_writes_rows_of_the_metrics_schema(tmp_path):
    code, out, run_dir = run_swarm(tmp_path, "schema", "num_steps=4", "eval_every_steps=2", "swarm.num_spares=0")
    assert code == 0, out
    peers = sorted((run_dir / "peers").glob("*/metrics.jsonl"))
    assert len(peers) == 4
    for f in peers:
        check_rows(read_jsonl(f), "peer")
    rows = read_metrics(run_dir)
    check_rows(rows)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]  # no failure: one attempt a step, as the engine counts
    curve = val_curve(rows)
    assert [(p.steps, p.iterations) for p in curve] == [(2, 2), (4, 4)]
    assert 0 < curve[0].seconds < curve[1].seconds  # from the start of the first step
