"""The swarm's secrets leave a peer's environment once read: no process it starts afterwards (a plain child, the
DHT's p2p daemon) inherits ``$CHECKFREE_JOIN_TOKEN`` or ``$CHECKFREE_PEER_KEY``."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from checkfree.swarm.admission import KEY_ENV, TOKEN_ENV, new_token
from tests.helpers import descendants

PEER_SCRIPT = """
import json, subprocess, sys
from checkfree.swarm.admission import Admission, Identity, find_token, scrub_secrets
from checkfree.swarm.config import MembershipConfig
from checkfree.swarm.membership import Membership

token = find_token()
identity = Identity.from_env("p")
before = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
scrub_secrets()
after = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
# the DHT forks after the scrub, as in Peer.__init__, and its process starts p2pd
m = Membership(MembershipConfig(), "t-secret-env", "fp", admission=Admission(token, identity))
print(json.dumps({"before": before, "after": after, "seed": identity.seed_hex() if identity else ""}), flush=True)
sys.stdin.readline()  # hold the DHT up until the test has read its daemon's environment
m.shutdown()
"""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def test_no_process_started_after_the_scrub_inherits_the_token_or_the_key():
    token, seed = new_token(), "42" * 32
    env = {**os.environ, TOKEN_ENV: token, KEY_ENV: seed}
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER_SCRIPT],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, f"the peer script ended early (exit {proc.wait(timeout=30)})"
        seen = json.loads(line)
        assert seen["seed"] == seed  # the key was read before the scrub
        assert token in seen["before"] and seed in seen["before"]  # the check would see a leak
        assert token not in seen["after"] and seed not in seen["after"]
        # Processes forked from the peer (its DHT process) share its memory, secrets included, and show the
        # environment it was started with; a program exec'd afterwards (p2pd) gets the scrubbed one.
        peer_cmdline = _cmdline(proc.pid)
        started = {pid: _cmdline(pid) for pid in descendants(proc.pid)}
        execd = {pid: cmd for pid, cmd in started.items() if cmd and cmd != peer_cmdline}
        assert any(b"p2pd" in cmd for cmd in execd.values()), f"no p2p daemon among {started}"
        for pid, cmd in execd.items():
            environ = _environ(pid)
            assert token.encode() not in environ and seed.encode() not in environ, f"pid {pid} {cmd!r} inherited"
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait(timeout=10)
