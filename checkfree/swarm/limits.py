"""
Limits
======

A peer's open ports are reachable by anyone on its network, and one of them cannot be bounded from Python:
gloo's listener keeps one file descriptor for every connection that is opened and closed on its port
without a gloo handshake, and aborts the whole process (SIGABRT, ``accept: Too many open files``) when the
soft ``RLIMIT_NOFILE`` is reached. Distributions start processes with a soft limit of 1024 and a hard limit
far above it; ``raise_file_limit`` lifts the soft limit to the hard one at peer start, so that a flood of
connections has to be a thousand times larger before it kills a peer (the leak itself stays: see
``tests/integration/test_gloo_listener.py``).
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # not on Windows: nothing to raise there
    resource = None

logger = logging.getLogger(__name__)

MAX_FILES = 1 << 20  # the soft limit asked for when the hard one is unlimited (Linux's default nr_open)


def raise_file_limit(cap: int = MAX_FILES) -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit (at most ``cap`` when the hard limit
    is unlimited); never lowers it and never raises.

    Returns:
        (the soft limit before, the soft limit after); both -1 where the platform has no such limit. A
        failure is logged as a warning and leaves the limit as it was.
    """
    if resource is None:
        return -1, -1
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as e:
        logger.warning("cannot read the limit of open files: %s", e)
        return -1, -1
    if soft == resource.RLIM_INFINITY:
        return soft, soft
    target = cap if hard == resource.RLIM_INFINITY else hard
    error: Exception | None = None
    while target > soft:  # an unlimited hard limit may still be above the kernel's nr_open: halve until it fits
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (OSError, ValueError) as e:
            error, target = e, target // 2
    if error is not None:
        logger.warning("cannot raise the limit of open files above %d (hard limit %d): %s", soft, hard, error)
    return soft, soft
