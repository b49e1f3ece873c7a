"""checkfree.core.metrics' schema: what a metrics row must carry, and that the engine's rows carry it."""

import json
import math

import pytest

from checkfree.core.failures import Failure, write_trace
from checkfree.core.metrics import KEYS, RECORDS, JsonLines, check_record, check_rows, read_jsonl, schema_table
from checkfree.engine.records import RunState, step_record
from checkfree.engine.trainer import Trainer
from tests.helpers import tiny_config

STEP = {"step": 3, "iteration": 4, "loss/train": 2.5, "throughput/tokens_per_s": 900.0, "time/step_s": 0.2}


def test_a_real_engine_run_writes_step_records_of_the_schema(tmp_path):
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, [Failure(1, 2, "mid_forward", 0.1)], 4)
    overrides = ["num_steps=3", "eval_every_steps=2", "failures.mode=trace", f"failures.trace_path={trace}"]
    trainer = Trainer(tiny_config(tmp_path, *overrides))
    trainer.run()
    rows = read_jsonl(trainer.run_dir / "metrics.jsonl")
    check_rows(rows)
    assert [r["iteration"] for r in rows] == [0, 2, 3]  # the failed attempt of step 1 counted
    assert "loss/val" in rows[1] and "epoch" not in rows[0]


def test_a_non_finite_value_is_a_number_as_written():
    st = RunState(step=1, iteration=1, train_s=0.5)
    record = step_record(st, 3.0, 0.5, math.nan, [1e-3], [0.1], [0.1])
    check_record(record)
    check_record(json.loads(json.dumps({**record, "loss/val": "nan"})))  # as JsonLines writes NaN


@pytest.mark.parametrize(
    "record, kind, message",
    [
        ({k: v for k, v in STEP.items() if k != "iteration"}, "peer_step", r"missing required keys \['iteration'"),
        ({**STEP}, "step", r"missing required keys \['time/train_s'\]"),
        ({**STEP, "time/train_s": 1.0, "loss/tarin": 2.0}, "step", "'loss/tarin' .* is not in the schema"),
        ({**STEP, "time/train_s": "1.0"}, "step", r"'time/train_s' = '1.0': expected a number"),
        ({**STEP, "time/train_s": 1.0, "step": -1}, "step", "'step' = -1: expected a non-negative int"),
        ({**STEP, "time/train_s": 1.0, "iteration": True}, "step", "'iteration' = True: expected a non-negative int"),
        ({**STEP, "time/train_s": 1.0, "stage/x/lr": 1.0}, "step", "'stage/x/lr'"),
        ({**STEP}, "epoch", "unknown metrics record kind 'epoch'"),
    ],
)
def test_a_row_off_the_schema_is_refused_with_the_key_and_value(record, kind, message):
    with pytest.raises(ValueError, match=message):
        check_record(record, kind)


def test_a_swarm_peers_file_holds_step_and_validation_rows(tmp_path):
    peer_step = {**STEP, "time/wall": 1.7e9, "epoch": 2, "stage": 1, "stage/3/grad_norm_raw": 0.4}
    f = JsonLines(tmp_path / "metrics.jsonl")
    f.write(peer_step)
    f.write({"step": 3, "epoch": 2, "stage": 1, "loss/val": float("inf")})
    f.close()
    check_rows(read_jsonl(tmp_path / "metrics.jsonl"), "peer")
    with pytest.raises(ValueError, match="time/train_s"):
        check_rows([peer_step])  # a run directory's step record: the launcher's merge adds time/train_s


def test_every_required_key_is_typed_and_the_table_lists_every_key():
    assert all(k in KEYS for r in RECORDS.values() for k in r.required)
    assert all(f"`{k}`" in schema_table() for k in KEYS)
