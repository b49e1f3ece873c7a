"""The local launcher's failure clock: iterations are observed committed steps, redone steps included."""

from launcher.local import advance_iterations


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
