"""The local launcher's failure clock: iterations are observed committed steps, redone steps included."""

from checkfree.core.failures import Failure
from launcher.local import advance_iterations, next_batch
from launcher.report import recoveries


def test_iterations_follow_the_observed_steps_and_count_redone_steps_again():
    seen, it = -1, -1
    drawn = []
    for step in [0, 0, 3, 5, 2, 2, 4, 9]:  # polled past some steps; rolled back from 5 to 2
        seen, first, it = advance_iterations(seen, it, step)
        drawn += list(range(first, it + 1))
    # 0..5 as steps 0..5, nothing on the rollback poll, then steps 3, 4 (redone) and 5..9 as 6..12
    assert drawn == list(range(13))
    assert (seen, it) == (9, 12)


def test_without_rollbacks_an_iteration_is_the_step():
    seen, it = -1, -1
    for step in [0, 1, 4, 4, 7]:
        seen, first, it = advance_iterations(seen, it, step)
        assert it == step


def _ev(t, event, **kw):
    return {"time": t, "event": event, **kw}


def test_stages_killed_in_one_poll_share_the_recovery_that_followed():
    events = [
        _ev(10.0, "failure", stage=1, peer="p1", signal="SIGKILL", step=3, epoch=0, iteration=3),
        _ev(10.01, "failure", stage=2, peer="p2", signal="SIGKILL", step=3, epoch=0, iteration=3),
        _ev(10.1, "step_aborted", error="StageLostError", epoch=0),
        # no epoch 0 in the log: its roster is unknown, each kill is paired by stage
        _ev(12.0, "epoch_published", lost=[1, 2], new_epoch=1, roster=["p0", "n1", "n2", "p3"], rollback_to=None),
        _ev(
            13.0,
            "rebuilt",
            stage=1,
            epoch=1,
            peer="n1",
            method="weighted_average",
            path="fallback:nearest",
            sources=[0, 3],
            weights=[0.5, 0.5],
            duration_s=0.1,
        ),
        _ev(
            13.1,
            "rebuilt",
            stage=2,
            epoch=1,
            peer="n2",
            method="weighted_average",
            path="fallback:nearest",
            sources=[0, 3],
            weights=[0.5, 0.5],
            duration_s=0.1,
        ),
        _ev(14.0, "resumed", epoch=1),
        _ev(20.0, "failure", stage=0, peer="p0", signal="SIGKILL", step=9, epoch=1, iteration=9),
        _ev(20.1, "step_aborted", error="StageLostError", epoch=1),
        _ev(22.0, "epoch_published", lost=[0], new_epoch=2, roster=["n0", "n1", "n2", "p3"], rollback_to=None),
        _ev(
            23.0,
            "rebuilt",
            stage=0,
            epoch=2,
            peer="n0",
            method="copy",
            path="primary",
            sources=[1],
            weights=[1.0],
            duration_s=0.1,
        ),
        _ev(24.0, "resumed", epoch=2),
    ]
    rows = recoveries(events)
    assert [(r["stage"], r["new_peer"], r["path"]) for r in rows] == [
        (1, "n1", "fallback:nearest"),
        (2, "n2", "fallback:nearest"),
        (0, "n0", "primary"),
    ]
    assert [round(r["detect_s"], 2) for r in rows] == [0.1, 0.09, 0.1]
    assert all(r["resume_s"] is not None for r in rows)


def test_a_checkpoint_rollback_counts_as_the_recovery_of_the_lost_stage():
    events = [
        _ev(10.0, "failure", stage=2, peer="p2", signal="SIGKILL", step=5, epoch=0, iteration=5),
        _ev(10.1, "step_aborted", error="StageLostError", epoch=0),
        _ev(12.0, "epoch_published", lost=[2], new_epoch=1, roster=["p0", "p1", "n2", "p3"], rollback_to=4),
        *[
            _ev(12.5 + k / 10, "rolled_back", peer=p, epoch=1, to_step=4, restore_s=0.02)
            for k, p in enumerate(["p0", "p1", "n2", "p3"])
        ],
        _ev(13.0, "resumed", epoch=1),
    ]
    (row,) = recoveries(events)
    assert (row["new_peer"], row["method"], row["path"]) == ("n2", "checkpoint", "rollback to step 4")
    assert (
        row["transfer_and_rebuild_s"] == 0.02 and round(row["rebuild_s"], 2) == 2.6 and round(row["resume_s"], 2) == 0.3
    )


def test_failures_of_one_iteration_land_together_later_ones_wait_their_turn():
    queued = [
        Failure(64, 1, "mid_forward", 0.5),
        Failure(62, 2, "mid_forward", 0.5),
        Failure(62, 0, "mid_backward", 0.1),
    ]
    batch, rest = next_batch(queued)
    assert sorted(f.stage for f in batch) == [0, 2] and {f.iteration for f in batch} == {62}
    batch, rest = next_batch(rest)
    assert [(f.iteration, f.stage) for f in batch] == [(64, 1)] and rest == []
    assert next_batch([]) == ([], [])
