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
import pickle
from dataclasses import asdict, fields

import torch

from checkfree.core.checkpoint import CheckpointStore
from checkfree.core.failures import Failure

ENGINE_FILE = "engine.pt"
FORMAT = 1


def resumable_step(store: CheckpointStore) -> int | None:
    """The newest complete step of ``store`` that also holds the engine's resume state (None: none)."""
    for step in reversed(store.complete_steps()):
        if store.load_extra(step, ENGINE_FILE) is not None:
            return step
    return None


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
