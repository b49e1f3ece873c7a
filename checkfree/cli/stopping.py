"""
Stopping on a signal
====================

Ctrl-C (SIGINT) and SIGTERM end a long command cleanly: the first asks it to stop at the next step boundary
(it then saves what a resume needs and exits 130), a second one aborts at once (``KeyboardInterrupt``).
Managed-job systems and spot VMs send SIGTERM before they kill a process, so both signals mean the same.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


class GracefulStop:
    """While entered, the first SIGINT or SIGTERM calls ``on_stop(signal_name)`` and says so on stderr; the
    next raises ``KeyboardInterrupt``. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_stop: Callable[[str], None], what: str = "the run"):
        self.on_stop, self.what = on_stop, what
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise KeyboardInterrupt(f"{name} again")
        self.received = name
        print(
            f"\n{name}: {self.what} stops at the next step boundary and saves its state; {name} again aborts at once",
            file=sys.stderr,
            flush=True,
        )
        self.on_stop(name)

    def __enter__(self) -> GracefulStop:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
