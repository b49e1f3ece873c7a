"""
Saving
======

What the engine saves of a run, and when. Periodic checkpoints (``checkpoint.every_steps``, and the hybrid's):
synchronous under the ``checkpoint`` strategy, whose saves are part of what it costs, in the background
(``AsyncSaver``) under every other; ``save_due`` is the rule for when one is due. The resume point: every
stage and the resume state saved at once, off the periodic schedule, into the store's ``resume`` folder (a
clean stop, or the end of a run). Each save writes every stage's ``StagePayload`` first and the trainer's
resume state (``checkfree.engine.resume``) last, so a step that has the latter is complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from checkfree.config import TrainConfig
from checkfree.core.checkpoint import AsyncSaver, CheckpointStore, payload_bytes
from checkfree.core.events import EventLog
from checkfree.engine import resume
from checkfree.engine.pipeline import PipelineEngine

logger = logging.getLogger(__name__)

SYNC = "sync"
BACKGROUND = "background"


def open_store(cfg: TrainConfig, root: str | Path, sub: str | None = None) -> CheckpointStore:
    """The run's checkpoint store at ``root`` (``checkpoint.dir``, default RUN_DIR/checkpoints), or its
    sub-folder ``sub``."""
    where = root if sub is None else f"{str(root).rstrip('/')}/{sub}"
    c = cfg.checkpoint
    return CheckpointStore(where, cfg.model.num_stages, c.keep, c.storage_mb_s, c.storage_options)


def save_due(step: int, every: int, has_store: bool, background: bool, busy: bool) -> str | None:
    """Which periodic save (``SYNC``, ``BACKGROUND``) is due after ``step`` committed steps, or None.

    Args:
        every: ``checkpoint.every_steps``; 0 with background saves: save as soon as the last write has finished.
        has_store: the run keeps periodic checkpoints.
        background: they are written in the background (``busy``: the last write is still going).
    """
    if background:
        # every k steps, or (k = 0) as soon as the last write has finished: with no stall, the newer the
        # checkpoint the less a rollback loses (the cost model's optimum for saves that cost nothing)
        return BACKGROUND if ((step % every == 0) if every else not busy) else None
    return SYNC if has_store and step % every == 0 else None


def report_failed_write(events: EventLog, step: int, error: OSError) -> None:
    """A background checkpoint write failed: that step stays incomplete (a rollback takes an older one)
    and training goes on; said as an event and in the log, every time."""
    events.emit("checkpoint_failed", step=step, error=str(error)[:300])
    logger.error("background checkpoint write of step %d failed, training goes on: %s", step, error)


def wait_quietly(saver: AsyncSaver | None) -> None:
    """Wait for a background checkpoint write even when the run ends with an error; a failed write is
    logged here, not raised over the error that ended the run."""
    if saver is not None:
        try:
            saver.wait()
        except OSError as e:
            logger.error("background checkpoint write failed: %s", e)


@dataclass
class Saves:
    """The saves of the engine's stages at one step, each followed by the trainer's resume state."""

    engine: PipelineEngine
    events: EventLog
    capture: Callable[[], bytes]  # the trainer's resume state (``resume.capture``), taken at each save

    def checkpoint(self, store: CheckpointStore, step: int) -> None:
        """A periodic checkpoint, written now; older ones pruned."""
        t0 = time.perf_counter()
        for i in range(self.engine.num_stages):
            store.save_stage(self.engine.payload(i, step))
        store.save_extra(step, resume.ENGINE_FILE, self.capture())
        store.prune()
        self.events.emit("checkpoint_save", step=step, save_s=time.perf_counter() - t0)

    def background(self, saver: AsyncSaver, step: int) -> None:
        """A periodic checkpoint: every stage's state serialised now (between two steps), written in the
        background."""
        t0 = time.perf_counter()
        blobs = [(i, payload_bytes(self.engine.payload(i, step))) for i in range(self.engine.num_stages)]
        saver.save(step, blobs, [(resume.ENGINE_FILE, self.capture())])
        self.events.emit("checkpoint_save", step=step, save_s=time.perf_counter() - t0, background=True)

    def resume_point(self, store: CheckpointStore, step: int) -> float:
        """Every stage and the resume state at ``step`` into ``store`` (the ``resume`` folder: a rollback never
        takes it for a periodic checkpoint), synchronously; only the newest such save is kept. Returns its
        seconds."""
        t0 = time.perf_counter()
        for i in range(self.engine.num_stages):
            store.save_stage(self.engine.payload(i, step))
        store.save_extra(step, resume.ENGINE_FILE, self.capture())
        for old in store.complete_steps():
            if old != step:
                store.delete_step(old)
        return time.perf_counter() - t0
