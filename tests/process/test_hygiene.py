"""The suite's own process hygiene: a test that leaves a process behind is caught, orphans included."""

import os
import subprocess

from tests.helpers import descendants, kill_and_reap, processes_left


def test_a_child_left_running_is_found_and_killed():
    before = descendants(os.getpid())
    proc = subprocess.Popen(["sleep", "30"])
    assert processes_left(before, grace_s=0.2) == {proc.pid}
    kill_and_reap({proc.pid}, keep=before)
    proc.wait(timeout=5)
    assert processes_left(before, grace_s=0.2) == set()


def test_an_orphaned_grandchild_is_found_too():
    """A shell that starts ``sleep`` in the background and exits orphans it; the test process is a child
    subreaper (conftest), so the orphan is re-parented here and the check still sees it."""
    before = descendants(os.getpid())
    subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 &"], check=True, timeout=10)
    left = processes_left(before, grace_s=0.2)
    assert len(left) == 1
    (orphan,) = left
    assert open(f"/proc/{orphan}/cmdline", "rb").read().startswith(b"sleep")
    kill_and_reap(left, keep=before)
    assert processes_left(before, grace_s=0.5) == set()
