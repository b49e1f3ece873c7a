"""
Checkpoints
===========

Per-stage checkpoints on disk, for the ``checkpoint`` strategy (roll every stage back to the last step
for which *all* stages saved) and for the adjacent-failure fallback (restore one lost stage).

Layout: ``DIR/step_{t:08d}/stage_{i}.pt``; a step folder is complete when every stage's file is there.
Files are written to a temporary name and renamed, so a crash mid-save never leaves a torn file that
looks complete. The newest ``keep`` complete steps are kept.

``storage_mb_s`` emulates slower storage than the local disk (a network file system, object storage):
each save and each load then takes at least its file size divided by that throughput, the remainder
spent waiting. Small models on a local disk checkpoint in milliseconds, which makes checkpointing look
nearly free; this knob shows how the comparison moves when it is not. It is an emulation, reported as
such in the config, not a measurement of any storage.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every stage every k committed steps; 0: never
    dir: str | None = None  # where; None: RUN_DIR/checkpoints
    keep: int = 2  # complete checkpoints kept on disk
    storage_mb_s: float = 0.0  # emulated storage throughput for saves and loads (MB/s); 0: the disk as it is

    def __post_init__(self) -> None:
        if self.storage_mb_s < 0:
            raise ValueError(f"checkpoint.storage_mb_s={self.storage_mb_s} must be >= 0 (0: no emulation)")
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps={self.every_steps} must be >= 0")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep={self.keep} must be >= 1")


class CheckpointStore:
    def __init__(self, root: str | Path, num_stages: int, keep: int = 2, storage_mb_s: float = 0.0):
        self.root, self.num_stages, self.keep, self.storage_mb_s = Path(root), num_stages, keep, storage_mb_s
        self.root.mkdir(parents=True, exist_ok=True)

    def _throttle(self, path: Path, started: float) -> None:
        """Wait out the rest of the time ``path`` would take at the emulated storage throughput."""
        if self.storage_mb_s > 0:
            left = path.stat().st_size / (self.storage_mb_s * 1e6) - (time.perf_counter() - started)
            if left > 0:
                time.sleep(left)

    def _step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save_stage(self, step: int, stage: int, payload: dict) -> None:
        d = self._step_dir(step)
        d.mkdir(exist_ok=True)
        tmp = d / f".stage_{stage}.pt.tmp"
        t0 = time.perf_counter()
        torch.save(payload, tmp)
        self._throttle(tmp, t0)
        os.replace(tmp, d / f"stage_{stage}.pt")

    def complete_steps(self) -> list[int]:
        steps = []
        for d in self.root.glob("step_*"):
            if all((d / f"stage_{i}.pt").is_file() for i in range(self.num_stages)):
                steps.append(int(d.name.split("_")[1]))
        return sorted(steps)

    def latest_complete(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def latest_for_stage(self, stage: int) -> int | None:
        steps = [int(d.name.split("_")[1]) for d in self.root.glob("step_*") if (d / f"stage_{stage}.pt").is_file()]
        return max(steps) if steps else None

    def load_stage(self, step: int, stage: int) -> dict:
        path = self._step_dir(step) / f"stage_{stage}.pt"
        t0 = time.perf_counter()
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError) as e:
            raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e
        self._throttle(path, t0)
        return payload

    def prune(self) -> None:
        complete = self.complete_steps()
        for step in complete[: -self.keep]:
            shutil.rmtree(self._step_dir(step), ignore_errors=True)
