"""Peak memory a peer logs is its own, not its launcher's."""

import subprocess
import sys

from checkfree.core.metrics import peak_rss_mb


def test_a_started_process_reports_its_own_peak_memory_not_its_parents():
    """getrusage's ru_maxrss survives fork + exec, so every peer would report its launcher's peak; the
    peak the peers log must be their own."""
    ballast = bytearray(400 * 2**20)  # this process now holds 400 MB more than its child will
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    out = subprocess.run(
        [sys.executable, "-c", "from checkfree.core.metrics import peak_rss_mb; print(peak_rss_mb())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert peak_rss_mb() > 400
    assert float(out.stdout) < 200, out.stdout
    del ballast
