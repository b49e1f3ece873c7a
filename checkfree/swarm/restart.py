"""
Restart
=======

A swarm whose every process is gone (the launcher's process group killed, every machine lost, a clean stop)
is started again on the same run: with ``resume=auto`` its first epoch restores every stage from the newest
complete checkpoint in ``checkpoint.dir`` and trains on from that step (``coordinator.decide_epoch``'s
``resume_step``). The new swarm has a new DHT, which remembers nothing of the old one, so what it needs of
the old run comes from the disk:

- ``resume_step``: the newest step every stage saved (the checkpoint store is the swarm's memory);
- ``previous_epoch``: the newest epoch the old peers of this run directory logged. The first epoch of the
  restart is numbered after it, so that the merged metrics (keyed by epoch and step) and the report's
  timeline read the restart as a rollback of the old epochs' later steps, and the files written after it
  belong to a newer timeline than any of the old run's (``CheckpointStore.rollbacks``).
"""

from __future__ import annotations

import json
from pathlib import Path

from checkfree.core.checkpoint import CheckpointStore

EPOCH_FIELDS = ("epoch", "new_epoch", "joined_epoch")


def checkpoint_store(cfg, run_dir: str | Path, keep: int = 1 << 30) -> CheckpointStore:
    """The run's checkpoint store (``checkpoint.dir``, default ``RUN_DIR/checkpoints``). Every run has one, even
    with ``checkpoint.every_steps=0``: a clean stop saves every stage there, so that the same command goes on
    (opening it writes nothing)."""
    return CheckpointStore(
        cfg.checkpoint.dir or Path(run_dir) / "checkpoints",
        cfg.model.num_stages,
        keep=keep,
        storage_mb_s=cfg.checkpoint.storage_mb_s,
        storage_options=cfg.checkpoint.storage_options,
    )


def resume_step(cfg, ckpt: CheckpointStore | None) -> int | None:
    """The step a new swarm of this run starts at: the newest complete checkpoint with ``resume=auto``, else
    None (step 0)."""
    if ckpt is None or cfg.resume != "auto":
        return None
    return ckpt.latest_complete()


def previous_epoch(run_dir: str | Path) -> int:
    """The newest epoch any peer of ``run_dir`` logged an event in (-1: none). A line torn by a SIGKILL is
    skipped."""
    newest = -1
    for path in Path(run_dir).glob("peers/*/events.jsonl"):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            for key in EPOCH_FIELDS:
                value = event.get(key) if isinstance(event, dict) else None
                if isinstance(value, int) and value > newest:
                    newest = value
    return newest
