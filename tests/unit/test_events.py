"""One event schema: unknown names and missing fields are refused at the point of writing."""

import pytest

from checkfree.core.events import EVENTS, EventLog
from checkfree.core.metrics import read_jsonl


def test_a_known_event_is_written_with_its_time(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("failure", stage=2, step=7, iteration=9, phase="mid_forward")
    log.close()
    (e,) = read_jsonl(tmp_path / "events.jsonl")
    assert e["event"] == "failure" and e["stage"] == 2 and e["phase"] == "mid_forward" and e["time"] > 0


def test_an_unknown_event_or_a_missing_field_is_refused(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    with pytest.raises(ValueError, match="unknown event 'kill'"):
        log.emit("kill", stage=1, step=0)
    with pytest.raises(ValueError, match=r"'rolled_back' is missing required fields \['restore_s'\]"):
        log.emit("rolled_back", to_step=4)
    log.close()
    assert read_jsonl(tmp_path / "events.jsonl") == []


def test_the_old_per_executor_names_are_gone():
    assert not {"recovery", "rollback", "kill"} & set(EVENTS)
