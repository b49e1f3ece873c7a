"""
Checkpoints
===========

Per-stage checkpoints on disk, for the ``checkpoint`` strategy (roll every stage back to the last step
for which *all* stages saved) and for the adjacent-failure fallback (restore one lost stage).

Layout: ``DIR/step_{t:08d}/stage_{i}.pt``; a step folder is complete when every stage's file is there.
Files are written to a temporary name and renamed, so a crash mid-save never leaves a torn file that
looks complete. The newest ``keep`` complete steps are kept.

Both executors save the same ``StagePayload`` (weights, Adam state, learning rate, tracked gradient
norms, step) and load it with ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain
values only, never pickled objects that could run code when read.

``storage_mb_s`` emulates slower storage than the local disk (a network file system, object storage):
each save and each load then takes at least its file size divided by that throughput, the remainder
spent waiting. Small models on a local disk checkpoint in milliseconds, which makes checkpointing look
nearly free; this knob shows how the comparison moves when it is not. It is an emulation, reported as
such in the config, not a measurement of any storage.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from dataclasses import dataclass, fields
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


@dataclass
class StagePayload:
    """Everything needed to restore one stage exactly, as both executors save it."""

    stage: int
    step: int  # committed steps the weights include
    model: dict[str, torch.Tensor]  # the stage's state dict
    optim: dict  # its optimizer's state dict
    lr: float
    grad_norm_raw: float
    grad_norm_smoothed: float | None

    @classmethod
    def from_dict(cls, d: object, where: str) -> StagePayload:
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict) or set(d) != set(names):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise RuntimeError(f"{where} is not a stage checkpoint: holds {got}, expected keys {names}")
        return cls(**d)


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

    def save_stage(self, payload: StagePayload) -> None:
        step, stage = payload.step, payload.stage
        d = self._step_dir(step)
        d.mkdir(exist_ok=True)
        tmp = d / f".stage_{stage}.pt.tmp"
        t0 = time.perf_counter()
        torch.save({f.name: getattr(payload, f.name) for f in fields(payload)}, tmp)  # asdict would copy
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

    def load_stage(self, step: int, stage: int) -> StagePayload:
        """The payload stage ``stage`` saved at ``step``.

        Raises:
            RuntimeError: the file is missing, unreadable, not a stage checkpoint, or of another stage/step.
        """
        path = self._step_dir(step) / f"stage_{stage}.pt"
        t0 = time.perf_counter()
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
            raise RuntimeError(f"cannot load checkpoint {path}: {detail}") from e
        payload = StagePayload.from_dict(raw, str(path))
        if (payload.stage, payload.step) != (stage, step):
            raise RuntimeError(
                f"{path} holds stage {payload.stage} at step {payload.step}, expected stage {stage} at step {step}"
            )
        self._throttle(path, t0)
        return payload

    def prune(self) -> None:
        complete = self.complete_steps()
        for step in complete[: -self.keep]:
            shutil.rmtree(self._step_dir(step), ignore_errors=True)
