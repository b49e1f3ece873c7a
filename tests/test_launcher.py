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


def test_a_started_process_reports_its_own_peak_memory_not_its_parents():
    """getrusage's ru_maxrss survives fork + exec, so every peer would report its launcher's peak; the
    peak the peers log must be their own."""
    import subprocess
    import sys

    from checkfree.metrics import peak_rss_mb

    ballast = bytearray(400 * 2**20)  # this process now holds 400 MB more than its child will
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page
    out = subprocess.run([sys.executable, "-c", "from checkfree.metrics import peak_rss_mb; print(peak_rss_mb())"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert peak_rss_mb() > 400
    assert float(out.stdout) < 200, out.stdout
    del ballast
