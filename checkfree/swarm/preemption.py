"""
Preemption
==========

A spot instance is told before it is taken away (AWS: two minutes, through ``spot/instance-action``; GCP: 30
seconds, through ``instance/preempted``). A lost stage can be rebuilt, but a stage whose machine announced its
end need not be: its peer hands its exact state over and the swarm trains on as if nothing happened.

- ``NoticeWatcher`` polls the notice URL (``swarm.preemption``: off unless a provider is configured; tests
  serve the notice from a local HTTP server, never a metadata address).
- On a notice, at the next step boundary with a spare in view, the peer stops training with its state as of
  the last committed step, serves that state on a ``HandoffServer`` (members only: the gate's handshake), and
  heartbeats ``state="leaving"`` with the server's port. The leader plans the stage as a ``handoff``: a spare
  takes it, fetches the state (``fetch_handoff``) and installs it with ``rebuild_stage`` (weights, Adam
  moments, learning rate and norms, as a checkpoint restore does), so its first step is the step the leaving
  peer would have run.
- The peer leaves when its successor trains, or ``leave_within_s`` after the notice whatever happened (the
  swarm then rebuilds the stage as after any loss).
- SIGTERM on ``checkfree peer`` is a notice too (``NoticeWatcher.notify``): a scheduler that takes the
  machine back sends it. With no spare in view the peer saves its stage instead (``Peer.request_stop``).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
import urllib.error
import urllib.request

from checkfree.core.checkpoint import StagePayload, payload_bytes, payload_from_bytes
from checkfree.swarm.addressing import listen
from checkfree.swarm.admission import Admission
from checkfree.swarm.config import PreemptionConfig, parse_port_range
from checkfree.swarm.gate import Acceptor, GateRefused, admit, prove

logger = logging.getLogger(__name__)

MAX_STATE_BYTES = 1 << 40
CHUNK_BYTES = 1 << 20
MAX_TRANSFERS = 4  # transfers of the state at once (a spare fetches it once; more are retries)


class Preempted(Exception):
    """Raised at a step boundary: this peer's machine will be taken away; it hands its stage over."""


def read_notice(cfg: PreemptionConfig, url: str) -> str | None:
    """The notice, if the machine is to be preempted (its text), else None. Errors count as no notice: a
    metadata server that cannot be read says nothing."""
    headers = {"Metadata-Flavor": "Google"} if cfg.provider == "gcp" else {}
    if cfg.provider == "aws":
        token = _aws_token(url, cfg.request_timeout_s)
        if token:
            headers["X-aws-ec2-metadata-token"] = token
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=cfg.request_timeout_s) as r:
            body = r.read(4096).decode(errors="replace").strip()
    except (urllib.error.URLError, OSError, ValueError):
        return None  # AWS answers 404 until there is a notice
    if cfg.provider == "gcp":
        return body if body.upper() == "TRUE" else None
    try:
        action = json.loads(body).get("action", "")
    except (ValueError, AttributeError):
        return None
    return body if action in ("terminate", "stop", "hibernate") else None


def _aws_token(url: str, timeout_s: float) -> str | None:
    """An IMDSv2 session token from the notice's own host (instances that require IMDSv2 refuse reads
    without one); None where the host does not give one (IMDSv1, a test server)."""
    base = url.split("/latest/")[0] if "/latest/" in url else None
    if base is None:
        return None
    request = urllib.request.Request(
        f"{base}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.read(256).decode().strip() or None
    except (urllib.error.URLError, OSError, ValueError):
        return None


class NoticeWatcher:
    """Polls the notice in a thread of its own; ``noticed`` is the monotonic time of the first notice."""

    def __init__(self, cfg: PreemptionConfig, name: str):
        self.cfg, self.url = cfg, cfg.notice_url(name)
        self.noticed: float | None = None
        self.text = ""
        self._stop = threading.Event()
        if self.url is not None:
            threading.Thread(target=self._run, name="preemption", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            text = read_notice(self.cfg, self.url)
            if text is not None:
                self.text, self.noticed = text[:300], time.monotonic()
                logger.warning("preemption notice from %s: %s", self.url, self.text)
                return
            self._stop.wait(self.cfg.poll_s)

    def notify(self, text: str) -> None:
        """A notice from elsewhere than the URL (SIGTERM: a managed job's scheduler takes the machine back)."""
        if self.noticed is None:
            self.text, self.noticed = text[:300], time.monotonic()
            self._stop.set()

    def deadline_passed(self) -> bool:
        return self.noticed is not None and time.monotonic() - self.noticed >= self.cfg.leave_within_s

    def close(self) -> None:
        self._stop.set()


class HandoffServer(Acceptor):
    """Serves one stage's exact state to members of the swarm (checked like the rendezvous gate, and bounded
    like it: see ``gate``; at most ``MAX_TRANSFERS`` transfers at once). ``served`` is appended to by the
    connections' threads."""

    def __init__(
        self, host: str, port_range: str | None, admission: Admission, payload: StagePayload, timeout_s: float = 60.0
    ):
        """``timeout_s``: the limit of one transfer (``swarm.preemption.handoff_timeout_s``)."""
        self.admission, self.payload, self.timeout_s = admission, payload, timeout_s
        self.blob = payload_bytes(payload)
        self.served: list[str] = []  # the peers that fetched the state
        name = f"handoff-{payload.stage}"
        super().__init__(listen(host, parse_port_range(port_range)), name, max_sessions=MAX_TRANSFERS)

    def admit_connection(self, conn: socket.socket, deadline: float) -> str:
        return admit(conn, self.admission, lambda _: True, f"the hand-over of stage {self.payload.stage}", deadline)

    def serve(self, conn: socket.socket, who: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        blob = memoryview(self.blob)  # shared by the transfers, never copied
        conn.settimeout(min(self.timeout_s, 10.0))
        conn.sendall(struct.pack("!Q", len(blob)))
        for i in range(0, len(blob), CHUNK_BYTES):  # a limit per chunk (sendall's is for the whole call)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"hand-over of stage {self.payload.stage}: the receiver took more than {self.timeout_s} s"
                )
            conn.settimeout(min(left, 10.0))
            conn.sendall(blob[i : i + CHUNK_BYTES])
        conn.settimeout(max(deadline - time.monotonic(), 1.0))
        if conn.recv(1) == b"k":  # the receiver read it all
            self.served.append(who)


def fetch_handoff(
    host: str, port: int, admission: Admission, from_peer: str, stage: int, timeout_s: float
) -> StagePayload:
    """The state of ``stage`` from the leaving peer ``from_peer`` at ``host:port``.

    Raises:
        ConnectionError (GateRefused included): the peer is gone, is not ``from_peer``, or sent too little.
        RuntimeError: what it sent is not a stage's state.
    """
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=min(timeout_s, 5.0)) as up:
        signer = prove(up, admission, min(timeout_s, 5.0))
        if signer != from_peer:
            raise GateRefused(f"the hand-over of stage {stage} is served by {signer!r}, not {from_peer!r}")
        head = _recv_exact(up, 8, deadline)
        n = struct.unpack("!Q", head)[0]
        if n > MAX_STATE_BYTES:
            raise ConnectionError(f"hand-over of {n} bytes (at most {MAX_STATE_BYTES})")
        blob = _recv_exact(up, n, deadline)
        up.sendall(b"k")
    payload = payload_from_bytes(blob, f"the hand-over from {from_peer}")
    if payload.stage != stage:
        raise RuntimeError(f"the hand-over from {from_peer} holds stage {payload.stage}, expected stage {stage}")
    return payload


def _recv_exact(conn: socket.socket, n: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionError(f"hand-over incomplete: {got} of {n} bytes before the time limit")
        conn.settimeout(min(left, 5.0))
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError(f"hand-over incomplete: the peer closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
