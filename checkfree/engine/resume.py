"""
Resume
======

What the engine writes beside its stages' checkpoint files so that a run continues exactly where it was
saved: the loop's counters (committed steps, iterations, failures, recoveries, seconds), the failures that
fired so far, the non-finite guard, the edge replicas (CheckFree+), the shadows (``redundant``) and the
config the run was started with. Stage weights, Adam state, learning rates and gradient norms are the
stages' own ``StagePayload`` files of the same step.

Failures are keyed by iteration and batches by step, so a run resumed from step ``s`` at iteration ``i``
draws exactly the failures and data the uninterrupted run drew from there: its losses are the same, step
for step. The file is written after every stage's file of its step (``AsyncSaver`` extras, or last in a
synchronous save), so a step that has it is complete.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch

from checkfree.config import ConfigError, TrainConfig, config_from_yaml, resume_mismatch
from checkfree.core.checkpoint import CheckpointStore
from checkfree.core.failures import Failure
from checkfree.core.run_dir import FRESH, REFUSE, RunDirState, inside, plan_run_dir

logger = logging.getLogger(__name__)

ENGINE_FILE = "engine.pt"
FORMAT = 1
STOP_STORE = "resume"  # the sub-folder of the checkpoint store that a clean stop (or a run's end) saves into


class RunDirError(ValueError):
    """A run directory that cannot be used as asked: it holds a run that cannot be resumed, holds another
    config's run, or cannot be written. Nothing in it was changed."""


def resumable_steps(store: CheckpointStore) -> list[int]:
    """The complete steps of ``store`` that also hold the engine's resume state, oldest first."""
    return [step for step in store.complete_steps() if store.load_extra(step, ENGINE_FILE) is not None]


def open_run_dir(
    cfg: TrainConfig, run_dir: Path, store: Callable[[str | None], CheckpointStore]
) -> tuple[int, CheckpointStore, dict] | None:
    """Carry out ``plan_run_dir`` for the engine: returns (step, store, resume state) to resume from, or None
    for a fresh start (after deleting what ``overwrite=true`` deletes, said as a warning).

    Args:
        store: opens the run's checkpoint store (None) or its ``STOP_STORE`` sub-folder.

    Raises:
        RunDirError: refused, or the saved run was trained with another config (the keys named).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"the run directory {run_dir} is a file, not a folder; choose another out_dir or run_name")
    holds = run_dir.is_dir() and any(run_dir.iterdir())
    root = str(cfg.checkpoint.dir or run_dir / "checkpoints")
    outside = not inside(root, str(run_dir))
    try:
        stores = [store(None), store(STOP_STORE)] if holds or outside else []
        steps = {s: st for st in reversed(stores) for s in resumable_steps(st)}  # the periodic store wins a tie
        present = sorted({s for st in stores for s in st.steps_present()})
    except OSError as e:
        raise RunDirError(f"cannot read the checkpoint store {root}: {e}") from e
    stray = tuple(s for s in present if s not in steps)
    state = RunDirState(str(run_dir), root, holds, outside, tuple(sorted(steps)), stray)
    plan = plan_run_dir(state, cfg.resume, cfg.overwrite, cfg.num_steps)
    if plan.action == REFUSE:
        raise RunDirError(plan.message)
    if plan.action == FRESH:
        if plan.message:
            logger.warning("%s", plan.message)
        if plan.clear_store:
            for st in stores:
                st.clear()
        if plan.delete_run_dir:
            try:
                shutil.rmtree(run_dir)
            except OSError as e:
                raise RunDirError(f"overwrite=true cannot delete the run directory {run_dir}: {e}") from e
        return None
    for st in stores:  # files a killed run wrote after the resumed step must never serve a rollback
        st.delete_after(plan.step)
    where = steps[plan.step]
    label = f"{where.root} (step {plan.step})"
    saved = read(where.load_extra(plan.step, ENGINE_FILE), label)
    try:
        saved_cfg = config_from_yaml(saved["config"], label)
    except ConfigError as e:
        raise RunDirError(str(e)) from e
    diff = resume_mismatch(saved_cfg, cfg)
    if diff:
        raise RunDirError(
            f"the run saved in {label} was trained with another config ({'; '.join(diff)}); resume it with the "
            "same config, or pass overwrite=true to start afresh or another run_name"
        )
    return plan.step, where, saved


def capture(trainer) -> bytes:
    """The trainer's resume state as bytes (tensors and plain values only: read back with weights_only)."""
    eng = trainer.engine
    shadows = None
    if eng.shadows is not None:
        shadows = [
            None if stage is None else {"model": stage.state_dict(), "optim": opt.state_dict(), "lr": lr}
            for stage, opt, lr in zip(eng.shadows.stages, eng.shadows.optimizers, eng.shadows.lrs)
        ]
    state = {
        "format": FORMAT,
        "config": trainer.config_yaml,
        "run_state": {f.name: getattr(trainer.state, f.name) for f in fields(trainer.state)},
        "fired": [asdict(f) for f in trainer.injector.fired],
        "nonfinite": [trainer.nonfinite.step, trainer.nonfinite.attempts],
        "replicas": {kind: [step, sd] for kind, (step, sd) in eng.replicas.items()},
        "shadows": shadows,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def read(data: bytes, where: str) -> dict:
    """``capture``'s bytes back, checked; ``RuntimeError`` names ``where``."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise RuntimeError(f"cannot load the resume state {where}: {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise RuntimeError(f"{where} is not a resume state of this checkfree version (format {got}, expected {FORMAT})")
    return state


def restore(trainer, state: dict) -> None:
    """Put the counters, fired failures, guard, replicas and shadows of ``state`` (``read``) into ``trainer``,
    whose stages were already restored from the same step's payloads."""
    for name, value in state["run_state"].items():
        if name == "val_history":
            value = [tuple(v) for v in value]
        setattr(trainer.state, name, value)
    trainer.injector.fired = [Failure(**f) for f in state["fired"]]
    trainer.nonfinite.step, trainer.nonfinite.attempts = state["nonfinite"]
    eng = trainer.engine
    eng.replicas = {kind: (step, sd) for kind, (step, sd) in state["replicas"].items()}
    if eng.shadows is not None and state["shadows"] is not None:
        for t, saved in enumerate(state["shadows"]):
            if saved is None:
                eng.shadows.stages[t] = None
                continue
            eng.shadows.stages[t].load_state_dict(saved["model"])
            eng.shadows.optimizers[t].load_state_dict(saved["optim"])
            eng.shadows.lrs[t] = saved["lr"]


def truncate_logs(run_dir: Path, step: int) -> list[dict]:
    """Cut ``metrics.jsonl`` and ``events.jsonl`` back to the resumed ``step`` (a resumed run writes what came
    after again, as it was); returns the events kept. Metrics: the records of steps before ``step``. Events:
    those up to the save of ``step`` (its last ``checkpoint_save`` or ``run_stopped``, or the
    ``run_finished`` of a run that ended there). A line torn by a kill is dropped; each file is rewritten
    whole or not at all."""
    metrics = _read_lines(run_dir / "metrics.jsonl")
    _rewrite(run_dir / "metrics.jsonl", [r for r in metrics if isinstance(r.get("step"), int) and r["step"] < step])
    events = _read_lines(run_dir / "events.jsonl")
    cut = len(events)
    for i, e in enumerate(events):
        saved = e.get("event") in ("checkpoint_save", "run_stopped") and e.get("step") == step
        if saved or (e.get("event") == "run_finished" and e.get("steps") == step):
            cut = i + 1
    kept = events[:cut]
    _rewrite(run_dir / "events.jsonl", kept)
    return kept


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # torn by a kill or a full disk
        if isinstance(record, dict):
            out.append(record)
    return out


def _rewrite(path: Path, records: list[dict]) -> None:
    if not path.is_file():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
