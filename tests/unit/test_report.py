"""The run report: one row per stage loss the peers saw, injected by the launcher or not."""

import json
from types import SimpleNamespace

import pytest

from checkfree.core.events import EVENTS
from launcher.recoveries import recoveries, recovery_table
from launcher.report import merge_run, timeline

ROSTER = ["p0", "p1", "p2", "p3"]
HANG_S = 1.5
# what merge_run reads of a run's config
CFG = SimpleNamespace(recovery=SimpleNamespace(strategy="checkfree"), membership=SimpleNamespace(hang_s=HANG_S))


def _ev(t: float, event: str, **fields) -> dict:
    missing = set(EVENTS[event].required) - set(fields)
    assert not missing, f"{event} lacks {missing}"  # the fixtures follow the schema the peers write
    return {"time": t, "event": event, **fields}


def _peer(t: float, event: str, peer: str, epoch: int, **fields) -> dict:
    return _ev(t, event, peer=peer, epoch=epoch, stage_held=None, **fields)


def _published(t: float, new_epoch: int, roster: list[str], lost=(), rollback_to=None) -> dict:
    return _peer(
        t,
        "epoch_published",
        roster[0],
        new_epoch - 1,
        new_epoch=new_epoch,
        roster=roster,
        step=4,
        lost=list(lost),
        plans=[],
        rollback_to=rollback_to,
        reason="recover" if lost else "re-form",
    )


def _kill(t: float, stage: int, peer: str, epoch: int, step: int = 5) -> dict:
    return _ev(t, "failure", stage=stage, peer=peer, pid=1000, signal="SIGKILL", step=step, epoch=epoch, iteration=step)


def _abort(t: float, peer: str, epoch: int) -> dict:
    return _peer(t, "step_aborted", peer, epoch, step=5, cause="connection reset", error="StageLostError")


def _rebuilt(t: float, peer: str, stage: int, epoch: int) -> dict:
    fields = dict(strategy="checkfree", method="copy", path="primary", sources=[stage - 1], weights=[1.0])
    fields |= dict(source_norms=[1.0], edge=None, edge_staleness_steps=None, lr=1e-3, duration_s=0.25)
    return _peer(t, "rebuilt", peer, epoch, stage=stage, step=4, **fields)


def _resumed(t: float, peer: str, epoch: int) -> dict:
    return _peer(t, "resumed", peer, epoch, step=4)


def _by_time(*events: dict) -> list[dict]:
    return sorted(events, key=lambda e: e["time"])


def test_an_injected_kill_is_paired_with_the_epoch_that_replaced_its_peer():
    events = _by_time(
        _published(1.0, 0, ROSTER),
        _kill(10.0, 1, "p1", epoch=0),
        _abort(10.2, "p0", 0),
        _abort(10.3, "p2", 0),
        _published(12.0, 1, ["p0", "s4", "p2", "p3"], lost=[1]),
        _rebuilt(13.0, "s4", 1, 1),
        _resumed(14.0, "p2", 1),
        _resumed(14.1, "p0", 1),
    )
    (row,) = recoveries(events)
    assert row["epoch"] == 1 and row["stage"] == 1 and row["lost_peer"] == row["killed_peer"] == "p1"
    assert row["injected"] and (row["signal"], row["kill_step"], row["iteration"]) == ("SIGKILL", 5, 5)
    assert (row["new_peer"], row["method"], row["path"], row["completed"]) == ("s4", "copy", "primary", True)
    assert row["loss_time"] == 10.0 and row["detected_by"] == "StageLostError"
    timings = ("detect_s", "decide_s", "rebuild_s", "resume_s", "transfer_and_rebuild_s")
    assert [row[k] for k in timings] == pytest.approx([0.2, 1.8, 2.8, 1.0, 0.25])


def test_a_loss_the_launcher_did_not_inject_gets_a_row_timed_from_the_first_abort():
    """A peer killed from outside by its PID: the launcher saw its child end (peer_exited), never killed it."""
    events = _by_time(
        _published(1.0, 0, ROSTER),
        _abort(10.1, "p1", 0),
        _abort(10.4, "p3", 0),
        _ev(10.5, "peer_exited", peer="p2", returncode=-9),
        _published(12.0, 1, ["p0", "p1", "s4", "p3"], lost=[2]),
        _rebuilt(13.0, "s4", 2, 1),
        _resumed(14.0, "p0", 1),
    )
    (row,) = recoveries(events)
    assert (row["epoch"], row["stage"], row["lost_peer"], row["new_peer"]) == (1, 2, "p2", "s4")
    assert not row["injected"] and row["completed"]
    assert row["signal"] == "SIGKILL"  # from the return code the launcher saw
    assert row["kill_step"] is None and row["iteration"] is None
    assert row["loss_time"] == 10.1 and row["detect_s"] is None  # the true loss time is unknown
    assert [row[k] for k in ("decide_s", "rebuild_s", "resume_s")] == pytest.approx([1.9, 2.9, 1.0])


def test_a_loss_no_peer_aborted_on_is_dated_at_the_publish():
    """A host that vanished between steps: only the leader's heartbeat view saw it."""
    events = _by_time(
        _published(1.0, 0, ROSTER),
        _published(12.0, 1, ["p0", "p1", "p2", "s4"], lost=[3]),
        _rebuilt(13.0, "s4", 3, 1),
        _resumed(14.0, "p0", 1),
    )
    (row,) = recoveries(events)
    assert (row["lost_peer"], row["signal"], row["loss_time"], row["detected_by"]) == ("p3", None, 12.0, "heartbeat")
    assert row["detect_s"] is None and row["decide_s"] == 0.0 and row["rebuild_s"] == pytest.approx(1.0)


def test_two_stages_lost_in_one_epoch_get_one_row_each():
    """Stage 2 killed by the launcher, stage 1 lost otherwise in the same epoch: rows in the epoch's lost order."""
    events = _by_time(
        _published(1.0, 0, ROSTER),
        _abort(9.5, "p0", 0),  # stage 1's loss broke the step first
        _kill(10.0, 2, "p2", epoch=0),
        _abort(10.3, "p3", 0),
        _published(12.0, 1, ["p0", "s4", "s5", "p3"], lost=[1, 2]),
        _rebuilt(13.0, "s4", 1, 1),
        _rebuilt(13.5, "s5", 2, 1),
        _resumed(14.0, "p0", 1),
    )
    rows = recoveries(events)
    assert [(r["stage"], r["lost_peer"], r["injected"], r["new_peer"]) for r in rows] == [
        (1, "p1", False, "s4"),
        (2, "p2", True, "s5"),
    ]
    assert rows[0]["loss_time"] == 9.5 and rows[0]["detect_s"] is None
    assert rows[1]["detect_s"] == pytest.approx(0.3)  # the first abort after its kill, not the one before
    assert [r["rebuild_s"] for r in rows] == pytest.approx([3.5, 3.2])
    assert all(r["epoch"] == 1 and r["completed"] for r in rows)


def test_an_epoch_that_broke_off_before_the_rebuild_and_the_epoch_that_relisted_the_stage_get_a_row_each():
    events = _by_time(
        _published(1.0, 0, ROSTER),
        _kill(10.0, 1, "p1", epoch=0),
        _abort(10.2, "p0", 0),
        _published(12.0, 1, ["p0", "s4", "p2", "p3"], lost=[1]),
        # s4 vanished before the transfer: the rendezvous of epoch 1 breaks for the others
        _abort(14.0, "p2", 1),
        _abort(14.2, "p0", 1),
        _published(17.0, 2, ["p0", "s5", "p2", "p3"], lost=[1]),
        _rebuilt(18.0, "s5", 1, 2),
        _resumed(19.0, "p0", 2),
    )
    first, second = recoveries(events)
    assert (first["epoch"], first["lost_peer"], first["injected"], first["completed"]) == (1, "p1", True, False)
    assert first["new_peer"] is first["method"] is first["rebuild_s"] is first["resume_s"] is None
    assert first["detect_s"] == pytest.approx(0.2) and first["decide_s"] == pytest.approx(1.8)
    assert (second["epoch"], second["lost_peer"], second["injected"], second["completed"]) == (2, "s4", False, True)
    assert (second["new_peer"], second["method"], second["loss_time"]) == ("s5", "copy", 14.0)
    assert [second[k] for k in ("decide_s", "rebuild_s", "resume_s")] == pytest.approx([3.0, 4.0, 1.0])


def test_a_launcher_failure_no_epoch_ever_listed_still_gets_a_row():
    events = _by_time(
        _published(1.0, 0, ROSTER),
        _kill(10.0, 1, "p1", epoch=0),
        _abort(10.2, "p0", 0),
        _published(12.0, 1, ["p0", "s4", "p2", "p3"], lost=[1]),
        _rebuilt(13.0, "s4", 1, 1),
        _resumed(14.0, "p0", 1),
        _kill(30.0, 3, "p3", epoch=1, step=19),  # the run ended before a new epoch formed
        _abort(30.4, "p2", 1),
    )
    first, last = recoveries(events)
    assert first["epoch"] == 1 and first["completed"]
    assert (last["epoch"], last["stage"], last["lost_peer"], last["injected"]) == (None, 3, "p3", True)
    assert (last["kill_step"], last["loss_time"], last["completed"], last["method"]) == (19, 30.0, False, None)
    assert last["detect_s"] == pytest.approx(0.4) and last["detected_by"] == "StageLostError"
    assert last["decide_s"] is last["rebuild_s"] is last["resume_s"] is None


def test_under_the_checkpoint_strategy_the_new_peers_rollback_is_the_rebuild():
    roster = ["p0", "p1", "n2", "p3"]
    events = _by_time(
        _published(1.0, 0, ROSTER),
        _kill(10.0, 2, "p2", epoch=0),
        _abort(10.1, "p1", 0),
        _published(12.0, 1, roster, lost=[2], rollback_to=4),
        *[
            _peer(12.5 + k / 10, "rolled_back", p, 1, to_step=4, restore_s=0.5 if p == "n2" else 0.02)
            for k, p in enumerate(["p0", "p1", "p3", "n2"])
        ],
        _resumed(13.0, "p0", 1),
    )
    (row,) = recoveries(events)
    assert (row["new_peer"], row["method"], row["path"]) == ("n2", "checkpoint", "rollback to step 4")
    assert (row["sources"], row["weights"], row["transfer_and_rebuild_s"]) == ([], [], 0.5)
    assert row["rebuild_s"] == pytest.approx(2.7) and row["resume_s"] == pytest.approx(0.2) and row["completed"]


def test_an_epoch_logged_twice_counts_once():
    published = _published(12.0, 1, ["p0", "s4", "p2", "p3"], lost=[1])
    events = _by_time(
        _published(1.0, 0, ROSTER),
        _kill(10.0, 1, "p1", epoch=0),
        published,
        {**published, "time": 12.3},
        _rebuilt(13.0, "s4", 1, 1),
        _resumed(14.0, "p0", 1),
    )
    (row,) = recoveries(events)
    assert row["detect_s"] == pytest.approx(2.0) and row["injected"]  # from the first publish


def test_the_summary_counts_losses_injected_kills_and_recoveries(tmp_path):
    launcher = [_kill(10.0, 1, "p1", epoch=0), _ev(21.0, "peer_exited", peer="p3", returncode=-9)]
    peers = _by_time(
        _published(1.0, 0, ROSTER),
        _abort(10.2, "p0", 0),
        _published(12.0, 1, ["p0", "s4", "p2", "p3"], lost=[1]),
        _rebuilt(13.0, "s4", 1, 1),
        _resumed(14.0, "p0", 1),
        _abort(20.5, "p0", 1),  # p3 killed from outside
        _published(22.0, 2, ["p0", "s4", "p2", "s5"], lost=[3]),
    )
    (tmp_path / "launcher-events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in launcher))
    (tmp_path / "peers" / "p0").mkdir(parents=True)
    (tmp_path / "peers" / "p0" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in peers))
    summary = merge_run(tmp_path, CFG)
    assert (summary["failures"], summary["stage_losses"], summary["injected_failures"]) == (2, 2, 1)
    assert summary["recoveries"] == 1  # epoch 2 never resumed
    assert summary["detect_s"]["n"] == 1 and summary["decide_s"]["n"] == 2 and summary["rebuild_s"]["n"] == 1
    rows = [json.loads(line) for line in (tmp_path / "recoveries.jsonl").read_text().splitlines()]
    assert rows == summary["recovery_rows"] and [r["signal"] for r in rows] == ["SIGKILL", "SIGKILL"]
    table = recovery_table(rows).splitlines()
    assert len(table) == 3 and "SIGKILL*" in table[1] and "SIGKILL " in table[2] and table[2].endswith("-")


def test_a_peer_listed_lost_that_kept_its_stage_pairs_its_later_kill_with_its_later_loss():
    """A peer whose weights were not valid is listed lost and rebuilds the stage it holds; killed later."""
    events = _by_time(
        _published(1.0, 0, ROSTER),
        _abort(10.0, "p0", 0),
        _published(12.0, 1, ROSTER, lost=[1]),
        _rebuilt(13.0, "p1", 1, 1),
        _resumed(14.0, "p0", 1),
        _kill(20.0, 1, "p1", epoch=1),
        _published(22.0, 2, ["p0", "s4", "p2", "p3"], lost=[1]),
    )
    rows = recoveries(events)
    assert [(r["epoch"], r["lost_peer"], r["injected"], r["new_peer"]) for r in rows] == [
        (1, "p1", False, "p1"),
        (2, "p1", True, None),
    ]


def _commits(*pairs: tuple[int, range]) -> list[dict]:
    return [{"epoch": epoch, "step": step} for epoch, steps in pairs for step in steps]


def test_steps_redone_after_a_rollback_are_not_repeated_on_the_final_timeline():
    """Epoch 1 rolls back to step 4: the old epoch's commits of steps 4-6 are abandoned and redone."""
    metrics = _commits((0, range(0, 7)), (1, range(4, 10)))
    events = [_published(1.0, 0, ROSTER), _published(5.0, 1, ROSTER, lost=[0, 1], rollback_to=4)]
    assert timeline(metrics, events) == ([], [4, 5, 6], [], [])


def test_a_step_applied_in_two_epochs_without_a_rollback_is_repeated():
    metrics = _commits((0, range(0, 7)), (1, range(6, 10)))
    events = [_published(1.0, 0, ROSTER), _published(5.0, 1, ROSTER, lost=[2])]
    assert timeline(metrics, events) == ([6], [], [], [])


def test_a_step_the_final_timeline_lacks_is_skipped_even_if_an_abandoned_epoch_had_it():
    """The rollback to step 2 abandons steps 2-5 of epoch 0; epoch 2 resumes at step 4 (a bug): 2 and 3 were
    never applied on the final timeline."""
    metrics = _commits((0, range(0, 6)), (2, range(4, 8)))
    events = [_published(5.0, 1, ROSTER, lost=[0, 1], rollback_to=2)]
    assert timeline(metrics, events) == ([], [2, 3, 4, 5], [2, 3], [])


def test_commits_after_the_rollback_epoch_are_kept_and_a_later_rollback_abandons_them_in_turn():
    metrics = _commits((0, range(0, 6)), (1, range(2, 9)), (3, range(5, 12)))
    events = [
        _published(5.0, 1, ROSTER, lost=[0, 1], rollback_to=2),
        _published(9.0, 2, ROSTER, lost=[3]),
        _published(9.5, 3, ROSTER, lost=[2, 3], rollback_to=5),
    ]
    assert timeline(metrics, events) == ([], [2, 3, 4, 5, 6, 7, 8], [], [])


def test_a_rollback_that_broke_off_and_was_not_redone_abandons_nothing():
    """Epoch 1 published a rollback to step 2 but broke off before anyone trained in it; epoch 2 went on from
    step 6, where epoch 0 had stopped: no step was redone, none skipped."""
    metrics = _commits((0, range(0, 6)), (2, range(6, 10)))
    events = [_published(5.0, 1, ROSTER, lost=[0, 1], rollback_to=2), _published(6.0, 2, ROSTER, lost=[1])]
    assert timeline(metrics, events) == ([], [], [], [])


def test_a_step_applied_only_by_peers_lost_before_the_swarm_resumed_at_it_is_lost_not_repeated():
    """Stages 1 and 2 applied step 6 and died; the survivors held it pending and epoch 1 resumed at 6 without
    them (as a soak found at step 680): the weights that held 6 are gone, so 6 is redone once."""
    metrics = _commits((0, range(0, 7)), (1, range(6, 10)))
    applied = {(0, s): {"p0", "p1", "p2", "p3"} for s in range(6)} | {(0, 6): {"p1", "p2"}}
    applied |= {(1, s): {"p0", "p3", "s4", "s5"} for s in range(6, 10)}
    events = [_published(1.0, 0, ROSTER), {**_published(5.0, 1, ["p0", "s4", "s5", "p3"], lost=[1, 2]), "step": 6}]
    assert timeline(metrics, events, applied) == ([], [], [], [6])


def test_a_step_whose_applier_survived_into_an_epoch_that_resumed_at_it_is_repeated():
    """p1 applied step 6 and is in epoch 1's roster, which resumes at 6: p1 applies it twice."""
    metrics = _commits((0, range(0, 7)), (1, range(6, 10)))
    applied = {(0, s): {"p0", "p1", "p2", "p3"} for s in range(6)} | {(0, 6): {"p1"}}
    applied |= {(1, s): {"p0", "p1", "s5", "p3"} for s in range(6, 10)}
    events = [_published(1.0, 0, ROSTER), {**_published(5.0, 1, ["p0", "p1", "s5", "p3"], lost=[2]), "step": 6}]
    assert timeline(metrics, events, applied) == ([6], [], [], [])
