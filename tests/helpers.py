"""
Test helpers
============

Shared by every test folder (import as ``from tests.helpers import ...``; ``pyproject.toml`` puts the
repository root on the path, so this works from any directory): the tiny config, thread ranks over real
gloo groups, polling with a deadline, and process-tree inspection.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from checkfree.config import TrainConfig, load_config
from checkfree.core.failures import write_trace
from checkfree.core.metrics import read_jsonl
from checkfree.swarm.admission import Admission, Identity, new_token
from checkfree.swarm.config import TransportConfig
from checkfree.swarm.transport import EpochGroup
from launcher import presets

# launcher.presets' toy model (the soak's and the scenario's too), quiet and validated once at the end
TINY = [*presets.TINY, "progress=false", "plot=false", "eval_every_steps=0"]


TEST_TOKEN = new_token()  # the join token of every swarm a test process builds in-process


def admission(name: str | None = None, token: str = TEST_TOKEN) -> Admission:
    """A new identity (id ``NAME.HASH``) holding ``token``."""
    return Admission(token, Identity(name))


def tiny_config(tmp_path, *overrides: str) -> TrainConfig:
    """A model small enough that a step takes milliseconds on one core, failures off by default."""
    return load_config([], [*TINY, "failures.mode=none", f"out_dir={tmp_path}", *overrides])


def run_ranks(world: int, fn, timeout_s: float = 2.0, epoch: int = 0):
    """Run ``fn(group)`` on ``world`` thread ranks (rank r = stage r); returns results or exceptions."""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    results: list = [None] * world
    cfg = TransportConfig(timeout_s=timeout_s)

    def target(rank):
        try:  # each rank its own store client, as separate processes would have
            client = dist.TCPStore("127.0.0.1", store.port, world, is_master=False, timeout=timedelta(seconds=10))
            group = EpochGroup(client, epoch, rank, list(range(world)), cfg, run_tag=7)
            results[rank] = fn(group)
        except Exception as e:
            results[rank] = e

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a rank hung past every timeout"
    return results


def poll(fn, timeout_s=5.0, every_s=0.05):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every_s)
    return fn()


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1])


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` in the process tree, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(entry.name)) is not None:
            children.setdefault(st[1], []).append(int(entry.name))
    out, frontier = set(), [pid]
    while frontier:
        for kid in children.get(frontier.pop(), []):
            out.add(kid)
            frontier.append(kid)
    return out


def alive(pid: int) -> bool:
    """Running or stopped, not gone and not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _interpreter_helper(pid: int) -> bool:
    """Python's multiprocessing resource tracker and torch's shared-memory manager: each started once (by the
    first spawned process, the first DHT node) and kept for the life of the interpreter by design (not
    something a test left behind)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"multiprocessing.resource_tracker" in cmdline or cmdline.startswith(b"torch_shm_manager")


def processes_left(before: set[int], grace_s: float) -> set[int]:
    """Descendants of this process that are alive and were not there ``before``, after waiting up to
    ``grace_s`` for them to end."""
    deadline = time.monotonic() + grace_s
    while True:
        left = {p for p in descendants(os.getpid()) - before if alive(p) and not _interpreter_helper(p)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def sigkill_dht_process(dht) -> None:
    """SIGKILL a DHT process forked from this one without leaving hivemind's cross-process lock held.

    Every DHT process forked from the test process shares ``MPFuture._update_lock`` with it; one killed
    between sending a result and releasing that lock would leave every later DHT of this process unable
    to report that it is ready (seen once in CI: a 300 s hang). Holding the lock while killing rules it out."""
    from hivemind.utils.mpfuture import MPFuture

    with MPFuture._update_lock:
        os.kill(dht.pid, signal.SIGKILL)


def kill_and_reap(pids: set[int], keep: set[int]) -> None:
    """SIGKILL ``pids``, then collect the exit status of every ended descendant not in ``keep`` (orphans
    re-parented to this process are ours to wait for)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.05 if pids else 0)
    for pid in descendants(os.getpid()) - keep:
        if not alive(pid):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


# ---- real swarms (tests/process) ------------------------------------------------------------------
SWARM = [*TINY, *presets.SWARM_2CORE, "swarm.min_gap_s=1"]


def check_every_step_once(run_dir, num_steps):
    """Every step of the run committed exactly once, with a finite loss; returns (summary, metrics)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(num_steps))
    assert all(math.isfinite(m["loss/train"]) for m in metrics)
    assert summary["repeated_steps"] == [] and summary["skipped_steps"] == []
    return summary, metrics


def spawned_pids(run_dir):
    return [e["pid"] for e in read_jsonl(run_dir / "launcher-events.jsonl") if e["event"] == "peer_spawned"]


def left_behind(pgids):
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True).stdout.split("\n")
    rows = [line.split() for line in out if line.strip()]
    return [r for r in rows if int(r[1]) in pgids and not r[2].startswith("Z")]


def kill_groups(pgids):
    for g in pgids:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_swarm(tmp_path, name, *overrides, failures=(), background=False, timeout_s=200):
    args = [*SWARM, f"run_name={name}", f"out_dir={tmp_path}", "progress=false", *overrides]
    if failures:
        trace = tmp_path / f"{name}-trace.jsonl"
        write_trace(trace, list(failures), 4)
        args += ["failures.mode=trace", f"failures.trace_path={trace}"]
    elif not any(o.startswith("failures.mode=") for o in overrides):
        args += ["failures.mode=none"]
    cmd = [sys.executable, "-m", "checkfree", "swarm", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if background:
        return proc
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        run_dir = tmp_path / name
        if (run_dir / "launcher-events.jsonl").exists():
            pgids = spawned_pids(run_dir)
            left = left_behind(pgids)
            kill_groups(pgids)
            assert not left, f"processes left behind: {left}"
    return proc.returncode, out, tmp_path / name
