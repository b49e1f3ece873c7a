"""
Log sync
========

A spot VM takes its disk with it: with ``swarm.log_url`` set, a peer copies its folder (``events.jsonl``,
``metrics.jsonl``) and its own log (``peer.log``, everything it logs) to ``LOG_URL/peers/<peer id>/`` every
``swarm.log_every_s`` and once more when it ends, so that the run's record stays in one place the user can
read (``launcher.report.merge_run`` reads such a folder like a run directory's ``peers/``).

A copy that fails (the bucket unreachable, credentials expired) is logged once a minute and tried again at
the next round: training never waits for it. A peer killed without warning loses what it wrote since its
last copy (at most ``log_every_s``). The copy happens in a thread of its own; ``close`` gives the
last copy ``CLOSE_TIMEOUT_S`` before the process goes on exiting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from checkfree.core.storage import open_storage

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0
LOG_FILE = "peer.log"


class LogSync:
    def __init__(
        self, url: str, peer_dir: Path, peer_id: str, every_s: float, options: Mapping[str, Any] | None = None
    ):
        """Raises ValueError when ``url`` names no filesystem fsspec knows or can open (at start, not later)."""
        self.fs, root = open_storage(url, options, what="swarm.log_url")
        self.dest = f"{root}/peers/{peer_id}"
        self.peer_dir, self.every_s = Path(peer_dir), every_s
        self._sent: dict[str, tuple[int, int]] = {}  # file -> (size, mtime_ns) last copied
        self._failed_at = -1e9
        self.failures = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._handler = logging.FileHandler(self.peer_dir / LOG_FILE)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._handler)
        self.thread = threading.Thread(target=self._loop, name="log-sync", daemon=True)
        self.thread.start()

    def sync(self) -> int:
        """Copy every file of the peer's folder that changed since its last copy; the number copied (one copy
        at a time: the thread's and a caller's never interleave)."""
        with self._lock:
            return self._sync()

    def _sync(self) -> int:
        import time

        copied = 0
        try:
            self.fs.makedirs(self.dest, exist_ok=True)
            for f in sorted(self.peer_dir.iterdir()):
                if not f.is_file():
                    continue
                st = f.stat()
                key = (st.st_size, st.st_mtime_ns)
                if self._sent.get(f.name) == key:
                    continue
                self.fs.put_file(str(f), f"{self.dest}/{f.name}")
                self._sent[f.name] = key
                copied += 1
        except Exception as e:  # any filesystem's errors: the copy is retried at the next round
            self.failures += 1
            now = time.monotonic()
            if now - self._failed_at > 60:
                self._failed_at = now
                logger.warning("could not copy this peer's logs to %s (retrying): %s", self.dest, e)
        return copied

    def _loop(self) -> None:
        self.sync()  # at once: a VM reclaimed without notice loses at most every_s of its record
        while not self._stop.wait(self.every_s):
            self.sync()
        self.sync()  # the last copy, once the peer is done

    def close(self) -> None:
        self._handler.flush()
        self._stop.set()
        self.thread.join(timeout=CLOSE_TIMEOUT_S)
        if self.thread.is_alive():
            logger.warning(
                "the last copy of this peer's logs to %s did not finish in %.0f s", self.dest, CLOSE_TIMEOUT_S
            )
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()
