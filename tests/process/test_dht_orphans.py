"""A peer process SIGKILLed with its DHT running leaves nothing behind: its DHT process and p2p daemon end."""

import os
import signal
import subprocess
import sys

from tests.helpers import alive, descendants, poll

ORPHAN_SCRIPT = """
import sys, time
from checkfree.swarm.config import MembershipConfig
from checkfree.swarm.admission import Admission, new_token
from checkfree.swarm.membership import Membership
m = Membership(MembershipConfig(), "t-orphan", "fp", admission=Admission(new_token()))
print("ready", flush=True)
time.sleep(120)
"""


def test_no_orphans_after_sigkill():
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = descendants(proc.pid)
        assert len(children) >= 2  # the DHT process and its p2p daemon (and torch's shm manager)
        proc.kill()
        proc.wait(timeout=5)
        assert poll(lambda: not any(alive(c) for c in children), timeout_s=10), (
            f"left behind: {[c for c in children if alive(c)]}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in descendants(proc.pid):
            os.kill(c, signal.SIGKILL)
