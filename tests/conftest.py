"""
Test configuration
==================

- Folders are the groups: ``unit/`` (pure functions and the in-process engine, milliseconds to a second),
  ``integration/`` (thread ranks over real gloo groups, real DHT nodes), ``process/`` (tests that start OS
  processes: the CLI, swarms, scripts). Each test is marked with its folder's name, so
  ``-m unit``, ``-m "not process"`` and so on select groups; ``slow`` marks the long ones within them.
- Every test runs torch on one thread.
- No test may leave a process behind: this process becomes a child subreaper (Linux), so even peers
  whose launcher died are re-parented to it, and a test that leaves any descendant running fails (the
  descendants are then killed).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import descendants, kill_and_reap, processes_left

GROUPS = ("unit", "integration", "process")
_HERE = Path(__file__).parent


def pytest_configure(config):
    try:  # PR_SET_CHILD_SUBREAPER = 36: orphaned descendants are re-parented here, where the check sees them
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = Path(item.fspath).resolve().relative_to(_HERE.resolve())
        if rel.parts and rel.parts[0] in GROUPS:
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    before = descendants(os.getpid())
    yield
    left = processes_left(before, grace_s=20.0)  # processes told to exit get a moment (a loaded machine: longer)
    named = {pid: _cmdline(pid) for pid in sorted(left)}
    kill_and_reap(left, keep=before)
    if left:
        pytest.fail(f"the test left processes running: {named} (killed now)")


def _cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]).decode(errors="replace")
    except OSError:
        return "?"
