"""
Checkpoints
===========

Per-stage checkpoints on shared storage, for the ``checkpoint`` strategy (roll every stage back to the
last step for which *all* stages saved) and for the adjacent-failure fallback (restore one lost stage).

Peers of a swarm run on separate hosts, so the store lives where all of them read and write: a shared
directory (a local path or ``file://`` URL) or object storage (``s3://bucket/prefix``, ``gs://...``),
reached through fsspec. ``storage_options`` go to the fsspec filesystem (an endpoint, a profile).

Layout: ``ROOT/step_{t:08d}/stage_{i}.pt``; a step is complete when every stage's file is there, and
each file appears whole or not at all: on a local filesystem it is written to a temporary name and
renamed; on object storage one PUT is atomic (and a rename would be a copy), so the object is written
directly. A crash mid-save never leaves a torn file that makes a step look complete. The newest ``keep``
complete steps are kept. Listings bypass fsspec's listings cache: other peers write to the same store.

After a swarm rolls back (in epoch E, to step r) its peers write ``stage_{i}.t{E}.pt``: the timeline a file
was written in is part of its name, and a file of a step after r written before E is ignored. A peer frozen
across the rollback that wakes and finishes an old write therefore never makes a step look complete beside
the new timeline's files (``CheckpointStore.rollbacks``, from ``EpochRecord.rollbacks``).

Both executors save the same ``StagePayload`` (weights, Adam state, learning rate, tracked gradient
norms, step) and load it with ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain
values only, never pickled objects that could run code when read. A loaded payload is restored only if its
weights and optimizer state are finite and its learning rate is a positive number, at most ``max_lr`` when
the caller gives one (``max_restored_lr`` of the run's config): a corrupt or diverged file is refused by
name (``CheckpointRejected``) instead of poisoning the stages trained from it.

``storage_mb_s`` emulates slower storage than the local disk (a network file system, object storage):
each save and each load then takes at least its file size divided by that throughput, the remainder
spent waiting. Small models on a local disk checkpoint in milliseconds, which makes checkpointing look
nearly free; this knob shows how the comparison moves when it is not. It is an emulation, reported as
such in the config, not a measurement of any storage.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem

from checkfree.core.storage import open_storage

logger = logging.getLogger(__name__)

# relative to the root; temporary names never match. ``.t{E}``: written in the timeline of the swarm's rollback
# in epoch E (none: timeline 0, before any rollback; the engine's files)
_STAGE_FILE = re.compile(r"step_(\d{8})/stage_(\d+)(?:\.t(\d+))?\.pt")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every stage every k committed steps; 0: never
    dir: str | None = None  # where: a path or an fsspec URL (s3://bucket/prefix); None: RUN_DIR/checkpoints
    keep: int = 2  # complete checkpoints kept on disk
    storage_mb_s: float = 0.0  # emulated storage throughput for saves and loads (MB/s); 0: the disk as it is
    # passed to the fsspec filesystem of `dir` (e.g. {client_kwargs: {endpoint_url: ...}} for s3); the resolved
    # config is written into the run directory, so give credentials through the environment, not here
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.storage_mb_s < 0:
            raise ValueError(f"checkpoint.storage_mb_s={self.storage_mb_s} must be >= 0 (0: no emulation)")
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps={self.every_steps} must be >= 0")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep={self.keep} must be >= 1")
        # the types only, never the values: they may hold credentials
        if not isinstance(self.storage_options, Mapping):
            raise ValueError(
                f"checkpoint.storage_options must be a mapping of option names to values, "
                f"got {type(self.storage_options).__name__}"
            )
        bad = sorted({type(k).__name__ for k in self.storage_options if not isinstance(k, str)})
        if bad:
            raise ValueError(f"checkpoint.storage_options must have string keys, got keys of type {bad}")


# what a loaded payload's structural fields must be before they are used (the scalars are used as they are)
_SHAPE = {
    "stage": lambda v: isinstance(v, int),
    "step": lambda v: isinstance(v, int),
    "model": lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
    "optim": lambda v: isinstance(v, dict),
    "warmup_steps": lambda v: isinstance(v, int),
    "warmup_done": lambda v: isinstance(v, int),
}


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
    grad_norm_post: float | None = None  # post-clip norm (``recovery.norm_source=post_clip``); older files lack it
    warmup_steps: int = 0  # the lr ramp of a stage rebuilt with ``recovery.warmup_steps`` (older files lack it)
    warmup_done: int = 0  # steps of that ramp taken: a restore goes on where the ramp was

    @classmethod
    def from_dict(cls, d: object, where: str) -> StagePayload:
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING]
        if not isinstance(d, dict) or not set(required) <= set(d) <= set(names):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise RuntimeError(f"{where} is not a stage checkpoint: holds {got}, expected keys {names}")
        wrong = [k for k, ok in _SHAPE.items() if k in d and not ok(d[k])]  # (optional keys may be absent)
        if wrong:
            got = ", ".join(f"{k}: {type(d[k]).__name__}" for k in wrong)
            raise RuntimeError(f"{where} is not a stage checkpoint: wrong types ({got})")
        return cls(**d)


class CheckpointRejected(RuntimeError, ValueError):
    """A stage payload that loads but must not be restored: a non-finite weight or optimizer state, or a
    learning rate out of range. A RuntimeError as every refused load is (callers that stop on an unloadable
    checkpoint stop on this one too), and a ValueError: what the file holds is a bad value."""


# slack over the configured lr: a float32 round trip, or a product computed in another order, is not a corruption
_LR_SLACK = 1e-4


def max_restored_lr(optim_lr: float, lr_factor: float) -> float:
    """The highest learning rate a stage restored under a config may carry: ``optim.lr``, or that times
    ``recovery.lr_factor`` for a stage rebuilt by averaging (its lr is always ``optim.lr * lr_factor``, never
    compounded), plus a relative slack of 1e-4."""
    return optim_lr * max(lr_factor, 1.0) * (1 + _LR_SLACK)


def check_restorable(payload: StagePayload, where: str, max_lr: float | None = None) -> None:
    """Refuse a payload whose restore would poison training.

    Args:
        payload: as loaded.
        where: what the message calls its source (``checkpoint PATH``).
        max_lr: the highest learning rate the run's config allows (``max_restored_lr``); None: any positive
            finite one.

    Raises:
        CheckpointRejected: a weight or optimizer-state tensor (or value) is NaN or infinite, or the lr is not
            a finite number in (0, ``max_lr``]; the message names ``where``, the key and what was expected.
    """
    lr = payload.lr
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        raise CheckpointRejected(f"{where}: lr is a {type(lr).__name__}, expected a number")
    if not (math.isfinite(lr) and lr > 0 and (max_lr is None or lr <= max_lr)):
        expected = (
            "a finite lr > 0"
            if max_lr is None
            else f"0 < lr <= {max_lr:.6g} (the config's optim.lr, times recovery.lr_factor for a rebuilt stage)"
        )
        raise CheckpointRejected(f"{where}: lr={lr!r}, expected {expected}")
    for part, what in (("model", "weights"), ("optim", "optimizer state")):
        found = _first_nonfinite(getattr(payload, part))
        if found is not None:
            key, detail = found
            raise CheckpointRejected(
                f"{where}: {part} {key!r} holds {detail}, expected finite {what} (the stage diverged before it "
                f"was saved, or the file is corrupt)"
            )


def _first_nonfinite(tree: object) -> tuple[str, str] | None:
    """(dotted key, what is wrong) of the first NaN/inf tensor or float in nested dicts, lists and tuples; None
    when all are finite. Walked with a stack, not recursion: a crafted file may nest without limit."""
    stack: list[tuple[str, object]] = [("", tree)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                bad = int((~torch.isfinite(value)).sum())
                if bad:
                    return key, f"{bad} NaN/inf of {value.numel()} values"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return key, repr(value)
        elif isinstance(value, dict | list | tuple):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            children = [(f"{key}.{k}" if key else str(k), v) for k, v in items]
            stack.extend(reversed(children))  # in order: the first bad key is the one reported
    return None


def payload_bytes(payload: StagePayload) -> bytes:
    """A stage's payload as bytes (what a checkpoint file and a preemption hand-over hold)."""
    buf = io.BytesIO()
    torch.save({f.name: getattr(payload, f.name) for f in fields(payload)}, buf)  # asdict would copy
    return buf.getvalue()


def payload_from_bytes(data: bytes, where: str, max_lr: float | None = None) -> StagePayload:
    """Read ``payload_bytes`` back with ``weights_only=True`` (no code runs) and check it can be restored
    (``check_restorable``, with ``max_lr``). RuntimeError (``CheckpointRejected`` for a bad value) names
    ``where``."""
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        lines = str(e).splitlines() or [type(e).__name__]
        detail = next((line.strip() for line in lines if "GLOBAL" in line), lines[0])
        raise RuntimeError(f"cannot load {where}: {detail}") from e
    payload = StagePayload.from_dict(raw, where)
    check_restorable(payload, where, max_lr)
    return payload


class CheckpointStore:
    """Per-stage checkpoints under ``root``, shared by every peer that opens the same ``root``.

    Args:
        root: a local path or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``).
        num_stages: stages a complete step holds.
        keep: complete steps ``prune`` keeps.
        storage_mb_s: emulated storage throughput (MB/s); 0: none.
        storage_options: passed to the fsspec filesystem (endpoint, region, profile...).
    """

    def __init__(
        self,
        root: str | Path,
        num_stages: int,
        keep: int = 2,
        storage_mb_s: float = 0.0,
        storage_options: Mapping[str, Any] | None = None,
    ):
        self.root, self.num_stages, self.keep, self.storage_mb_s = str(root), num_stages, keep, storage_mb_s
        self.fs, self.path = open_storage(root, storage_options)
        # a rename within a local filesystem is atomic; on object stores it is a copy, and one PUT is atomic
        self._local = isinstance(self.fs, LocalFileSystem)  # folders are made by the first save
        # the swarm's rollbacks so far, (epoch, to_step) each (``EpochRecord.rollbacks``); set by its peers
        self.rollbacks: list[tuple[int, int]] = []

    @property
    def timeline(self) -> int:
        """The epoch of the newest rollback (0: none): the timeline the files written now belong to."""
        return max((epoch for epoch, _ in self.rollbacks), default=0)

    def _valid(self, step: int, timeline: int) -> bool:
        """A file of ``step`` written in ``timeline`` belongs to the current timeline unless a later rollback
        went back before ``step`` (a peer frozen across that rollback may finish such a write after the
        rollback deleted the step's files: it must never make the step look complete)."""
        return all(epoch <= timeline or step <= to for epoch, to in self.rollbacks)

    def _throttle(self, num_bytes: int, started: float) -> None:
        """Wait out the rest of the time ``num_bytes`` would take at the emulated storage throughput."""
        if self.storage_mb_s > 0:
            left = num_bytes / (self.storage_mb_s * 1e6) - (time.perf_counter() - started)
            if left > 0:
                time.sleep(left)

    def _step_dir(self, step: int) -> str:
        return f"{self.path}/step_{step:08d}"

    def _file(self, step: int, stage: int, timeline: int = 0) -> str:
        return f"{self._step_dir(step)}/stage_{stage}{f'.t{timeline}' if timeline else ''}.pt"

    def _where(self, path: str) -> str:
        """``path`` as the user would write it: a plain path on the local filesystem, a URL elsewhere."""
        return path if self._local else self.fs.unstrip_protocol(path)

    def _listing(self) -> list[tuple[int, int, int]]:
        """(step, stage, timeline) of every stage file present; an empty or not yet created store has none."""
        # Other peers write here: drop every cached listing (some filesystems drop only the path and its
        # parents when given one, keeping stale listings of the step folders below it).
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.path)
        except FileNotFoundError:
            return []
        out = []
        for p in found:
            m = _STAGE_FILE.fullmatch(p[len(self.path) + 1 :]) if p.startswith(self.path + "/") else None
            if m:
                out.append((int(m[1]), int(m[2]), int(m[3] or 0)))
        return out

    def _timelines(self) -> dict[int, dict[int, int]]:
        """step -> stage -> the newest timeline of its valid files (``_valid``), step by step."""
        out: dict[int, dict[int, int]] = {}
        for step, stage, timeline in self._listing():
            if self._valid(step, timeline):
                stages = out.setdefault(step, {})
                stages[stage] = max(stages.get(stage, 0), timeline)
        return out

    def _stages_by_step(self) -> dict[int, set[int]]:
        """The stages with a valid file, step by step."""
        return {step: set(stages) for step, stages in self._timelines().items()}

    def save_stage(self, payload: StagePayload) -> None:
        self.save_bytes(payload.step, payload.stage, payload_bytes(payload))

    def save_bytes(self, step: int, stage: int, data: bytes, timeline: int | None = None) -> None:
        """Write one stage's serialised payload (``payload_bytes``) as the checkpoint of ``step``, in
        ``timeline`` (None: the current one; a background write passes the one of the moment it was asked)."""
        self._put(step, self._file(step, stage, self.timeline if timeline is None else timeline), data)

    def save_extra(self, step: int, name: str, data: bytes) -> None:
        """Write a file of the executor's own beside the stages of ``step`` (the engine's resume state): it does
        not count towards completeness, and ``prune`` deletes it with its step."""
        if not re.fullmatch(r"[a-z_]+\.pt", name) or _STAGE_FILE.fullmatch(f"step_00000000/{name}"):
            raise ValueError(f"extra checkpoint file name {name!r}: expected lowercase letters and _ then .pt")
        self._put(step, f"{self._step_dir(step)}/{name}", data)

    def load_extra(self, step: int, name: str) -> bytes | None:
        """The bytes ``save_extra`` wrote for ``step`` under ``name``, or None when there are none."""
        try:
            return self.fs.cat_file(f"{self._step_dir(step)}/{name}")
        except FileNotFoundError:
            return None

    def _put(self, step: int, final: str, data: bytes) -> None:
        """Write ``data`` at ``final`` whole or not at all: on a local filesystem through a temporary file that
        is renamed (and removed when the write fails, e.g. on a full disk), on object storage with one PUT."""
        t0 = time.perf_counter()
        tmp = None
        try:
            if self._local:
                self.fs.makedirs(self._step_dir(step), exist_ok=True)
                # unique per writer: two peers saving the same stage never write into one temporary file
                tmp = f"{self._step_dir(step)}/.{final.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
                self.fs.pipe_file(tmp, data)
                self._throttle(len(data), t0)
                os.replace(tmp, final)
                tmp = None
            else:
                self.fs.pipe_file(final, data)
                self._throttle(len(data), t0)
        except OSError as e:  # e.g. a full disk, a missing bucket or a refused write: say which file
            raise OSError(e.errno, f"cannot save checkpoint {self._where(final)}: {e}") from e
        finally:
            if tmp is not None:
                try:
                    os.remove(tmp)
                except OSError:
                    pass

    def complete_steps(self) -> list[int]:
        every = set(range(self.num_stages))
        return sorted(step for step, stages in self._stages_by_step().items() if every <= stages)

    def latest_complete(self, at_most: int | None = None) -> int | None:
        """The newest complete step, no later than ``at_most`` when given (a rollback never goes forward: a
        complete step beyond the swarm's own, left by another run or planted, is not one to roll back to)."""
        steps = [step for step in self.complete_steps() if at_most is None or step <= at_most]
        return steps[-1] if steps else None

    def latest_for_stage(self, stage: int, at_most: int | None = None) -> int | None:
        """The newest step with a valid file of ``stage``, no later than ``at_most`` when given."""
        steps = [
            step
            for step, stages in self._stages_by_step().items()
            if stage in stages and (at_most is None or step <= at_most)
        ]
        return max(steps) if steps else None

    def load_stage(self, step: int, stage: int, max_lr: float | None = None) -> StagePayload:
        """The payload stage ``stage`` saved at ``step``, checked before it is restored (``check_restorable``).

        Args:
            step: the checkpoint's step.
            stage: the stage to load.
            max_lr: the highest learning rate the run's config allows (``max_restored_lr``); None: any positive
                finite one.

        Raises:
            RuntimeError: the file is missing, unreadable, not a stage checkpoint, or of another stage/step;
                ``CheckpointRejected`` (a RuntimeError) when it holds a NaN/inf weight or optimizer state or
                an lr out of range. The message names the file.
        """
        timeline = self._timelines().get(step, {}).get(stage)
        if timeline is None and any(x[:2] == (step, stage) for x in self._listing()):
            raise RuntimeError(
                f"the checkpoint of stage {stage} at step {step} in {self._where(self.path)} belongs to a timeline "
                f"a rollback abandoned (rollbacks so far, epoch and step: {self.rollbacks})"
            )
        path = self._file(step, stage, timeline or 0)
        where = self._where(path)
        t0 = time.perf_counter()
        try:
            data = self.fs.cat_file(path)
        except OSError as e:
            raise RuntimeError(f"cannot load checkpoint {where}: {str(e).splitlines()[0] if str(e) else e}") from e
        payload = payload_from_bytes(data, f"checkpoint {where}", max_lr)
        if (payload.stage, payload.step) != (stage, step):
            raise RuntimeError(
                f"{where} holds stage {payload.stage} at step {payload.step}, expected stage {stage} at step {step}"
            )
        self._throttle(len(data), t0)
        return payload

    def drop_after(self, stage: int, step: int, before: int | None = None) -> list[int]:
        """Delete ``stage``'s files of steps after ``step`` written in a timeline older than ``before`` (None:
        every timeline): a rollback to ``step`` in epoch ``before`` abandons them (``_valid`` already ignores
        them; this frees their space). A peer that runs this late, after waking from a freeze, never
        deletes the newer timelines' files. Returns the steps deleted."""
        dropped = set()
        for s, i, timeline in sorted(self._listing()):
            if s > step and i == stage and (before is None or timeline < before):
                try:
                    self.fs.rm_file(self._file(s, stage, timeline))
                    dropped.add(s)
                except FileNotFoundError:
                    pass
        return sorted(dropped)

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete steps; another peer pruning the same ones is fine. Any
        failure is a warning: a failed delete costs space, not correctness, and the next prune retries (object
        stores raise more than OSError, e.g. NotImplementedError from a filesystem without deletes)."""
        try:
            old = self.complete_steps()[: -self.keep]
        except Exception as e:
            logger.warning("cannot list checkpoints in %s to prune them: %s", self._where(self.path), e)
            return
        for step in old:
            try:
                self.delete_step(step)
            except FileNotFoundError:
                pass
            except Exception as e:
                logger.warning("cannot delete checkpoint %s: %s", self._where(self._step_dir(step)), e)

    def steps_present(self) -> list[int]:
        """Every step with at least one stage file, valid or not."""
        return sorted({step for step, _, _ in self._listing()})

    def delete_after(self, step: int) -> list[int]:
        """Delete every file of the steps after ``step`` (a run resumed at ``step`` must never roll back into a
        later step a killed run left); returns those steps."""
        later = [s for s in self.steps_present() if s > step]
        for s in later:
            try:
                self.delete_step(s)
            except FileNotFoundError:
                pass
        return later

    def clear(self) -> list[int]:
        """Delete every step's files (``overwrite=true`` starting a run afresh in this store); returns the steps
        that had files. Raises what the filesystem raises: a store that cannot be cleared must not be mixed
        with a new run's files."""
        steps = sorted({step for step, _, _ in self._listing()})
        for step in steps:
            try:
                self.delete_step(step)
            except FileNotFoundError:
                pass
        return steps

    def delete_step(self, step: int) -> None:
        """Delete every file of ``step`` (FileNotFoundError when there are none)."""
        d = self._step_dir(step)
        if self._local:
            shutil.rmtree(d)
        else:
            # file by file, never fs.rm(d, recursive=True): that expands d as a glob pattern, and a root
            # such as s3://b/run[1] would then match, and delete, another run's steps
            for f in self.fs.find(d):
                self.fs.rm_file(f)


class AsyncSaver:
    """Writes checkpoints in a background thread (the hybrid strategy): the caller serialises every stage's
    state in memory between two steps (that copy is the only stall) and training goes on while the bytes go
    to storage. One write at a time (a save waits for the one before it); ``busy`` says whether the last is
    still going. A step counts as saved only once every stage's file is written (``latest_complete``), so a
    rollback never reads a half-written checkpoint.

    A failed write is handed, in the training thread, to ``on_error(step, error)`` by the next ``save`` or
    ``wait``; with no ``on_error`` it is raised there. The hybrid's trainers log it and go on: the checkpoint is
    a fallback, its step is simply incomplete, and a rollback uses an older one."""

    def __init__(self, store: CheckpointStore, on_error: Callable[[int, OSError], None] | None = None):
        self.store = store
        self.on_error = on_error
        self.thread: threading.Thread | None = None
        self.error: tuple[int, BaseException] | None = None

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def save(self, step: int, blobs: list[tuple[int, bytes]], extras: list[tuple[str, bytes]] = ()) -> None:
        """Start writing ``(stage, payload_bytes)`` of ``step`` (after the previous write has finished), then
        ``(name, bytes)`` extras (``CheckpointStore.save_extra``: written last, so their presence means the
        stages' files are there too).

        Raises:
            OSError: the previous background write failed and there is no ``on_error``.
        """
        self.wait()
        args = (
            step,
            blobs,
            list(extras),
            self.store.timeline,
        )  # the timeline now: a late write must not join a later one
        self.thread = threading.Thread(target=self._write, args=args, name=f"ckpt-{step}", daemon=True)
        self.thread.start()

    def _write(self, step: int, blobs: list[tuple[int, bytes]], extras: list[tuple[str, bytes]], timeline: int) -> None:
        try:
            for stage, data in blobs:
                self.store.save_bytes(step, stage, data, timeline)
            for name, data in extras:
                self.store.save_extra(step, name, data)
        except BaseException as e:  # handed to the training thread by the next save or wait
            self.error = (step, e)
            return
        self.store.prune()  # failures are warnings: the step is saved; old steps stay until a later prune

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            (step, error), self.error = self.error, None
            if self.on_error is None or not isinstance(error, OSError):
                raise error
            self.on_error(step, error)
