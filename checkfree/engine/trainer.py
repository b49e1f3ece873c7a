"""
Trainer
=======

The training loop of the single-process engine: draw failures, run the step, and either commit it or,
when a stage was lost, discard the step, rebuild the lost stages with the configured strategy (or roll
everything back to a checkpoint) and redo it. Writes the run directory: ``config.yaml``,
``metrics.jsonl``, ``events.jsonl``, ``trace.jsonl``, ``summary.json`` and ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkfree import __version__
from checkfree.config import TrainConfig, to_yaml
from checkfree.core.checkpoint import AsyncSaver, CheckpointStore, payload_bytes
from checkfree.core.data import Batches
from checkfree.core.devices import check_device, cuda_count
from checkfree.core.events import EventLog
from checkfree.core.failures import Failure, FailureInjector, write_trace
from checkfree.core.metrics import MetricLogger, check_trackers, event_scalars
from checkfree.core.model import block_state, build_stages
from checkfree.core.rebuild import RebuildInputs, RebuildSpec, rebuild_stage, restore_stage
from checkfree.core.recovery import (
    beyond_rebuild,
    edge_kind,
    edge_replicas_on,
    plan_recovery,
    replica_holder,
)
from checkfree.core.redundancy import param_bytes
from checkfree.core.schedule import schedule_for
from checkfree.core.stage_step import NonFiniteGuard
from checkfree.core.weights import save_weights
from checkfree.engine import resume
from checkfree.engine.pipeline import PipelineEngine, StepInterrupted, interrupt_index
from checkfree.engine.shadows import Shadows

logger = logging.getLogger(__name__)

STOP_STORE = resume.STOP_STORE
RunDirError = resume.RunDirError


@dataclass
class RunState:
    step: int = 0  # next step to run; also the number of committed steps
    iteration: int = 0  # step attempts executed, including interrupted ones
    failures: int = 0
    recoveries: int = 0
    train_s: float = 0.0  # wall-clock spent training, recovering and checkpointing (evaluation excluded)
    last_loss: float = math.nan
    last_val_loss: float | None = None
    first_loss: float | None = None
    tokens_per_s: float = 0.0
    measured_iteration_s: float | None = None
    val_history: list[tuple[int, float]] = field(default_factory=list)


def _on(obj, device: torch.device):
    """Tensors in ``obj`` (nested dicts and tuples) on ``device``; Adam's ``step`` counts stay where Adam keeps them."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: v if k == "step" else _on(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_on(v, device) for v in obj)
    return obj


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None):
        self.cfg = cfg
        check_device(cfg.device, cuda_count())  # DeviceError (a ValueError) names what this host has
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        L = cfg.model.num_stages
        self.injector = FailureInjector(cfg.failures, L)
        self.nonfinite = NonFiniteGuard(cfg.optim)
        self.batches = Batches(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.seed)
        self.config_yaml = to_yaml(cfg)
        self.ckpt_root = cfg.checkpoint.dir or self.run_dir / "checkpoints"
        check_trackers(cfg.metrics)  # a missing tracker package fails before overwrite=true deletes anything
        resume_from = self._prepare_run_dir()  # only once the inputs are known to be good
        self.schedule = schedule_for(cfg.pipeline, L, cfg.swap_enabled)
        self.engine = PipelineEngine(
            build_stages(cfg.model, cfg.seed),
            self.schedule,
            self.batches,
            cfg.optim,
            cfg.recovery.norm_ema_beta,
            cfg.device,
            cfg.recovery.norm_scope,
            cfg.precision,
        )
        if cfg.recovery.strategy == "redundant":
            eng = self.engine
            eng.shadows = Shadows(
                eng.stages, eng.optimizers, eng.lrs, self.schedule, self.batches, cfg.optim, eng.devices, eng.precision
            )
        self.ckpt = None
        # written in the background: the hybrid's checkpoints, and every strategy's periodic resume state but the
        # checkpoint strategy's (whose synchronous saves are part of what it costs)
        self.saver = None
        if cfg.checkpoint.every_steps or cfg.recovery.strategy == "hybrid":
            self.ckpt = self._store()
            if cfg.recovery.strategy != "checkpoint":
                self.saver = AsyncSaver(self.ckpt, on_error=self._write_failed)
        self.stop_requested: str | None = None  # why the run stops at the next step boundary (request_stop)
        self.stopped_at: int | None = None
        self.replicas_on = edge_replicas_on(cfg.recovery)
        kept_events = resume.truncate_logs(self.run_dir, resume_from[0]) if resume_from is not None else []
        self.metrics = MetricLogger.from_config(
            self.run_dir / "metrics.jsonl", cfg.metrics, self.run_dir, cfg.run_name, run_config=cfg
        )
        for event in kept_events:  # the trackers' running counts go on from the resumed step's
            event_scalars(event, self.metrics.counts)
        self.events = EventLog(self.run_dir / "events.jsonl", tracker=self.metrics)  # failures reach the trackers
        self.state = RunState()
        self.spec = RebuildSpec.of(cfg)
        self.tokens_per_step = self.batches.tokens_per_microbatch() * cfg.pipeline.num_microbatches
        self.resumed_from: int | None = None
        if resume_from is not None:
            self._resume(*resume_from)

    def _store(self, sub: str | None = None) -> CheckpointStore:
        """The run's checkpoint store (``checkpoint.dir``, default RUN_DIR/checkpoints), or its sub-folder."""
        root = self.ckpt_root if sub is None else f"{str(self.ckpt_root).rstrip('/')}/{sub}"
        c = self.cfg.checkpoint
        return CheckpointStore(root, self.cfg.model.num_stages, c.keep, c.storage_mb_s, c.storage_options)

    def _prepare_run_dir(self) -> tuple[int, CheckpointStore, dict] | None:
        """Make the run directory ready by the one rule of both executors (``checkfree.core.run_dir``); returns
        where to resume from (step, store, resume state), or None for a fresh start."""
        found = resume.open_run_dir(self.cfg, self.run_dir, self._store)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
        except OSError as e:
            raise RunDirError(f"cannot write the run directory {self.run_dir}: {e.strerror or e}") from e
        return found

    def _resume(self, step: int, store: CheckpointStore, state: dict) -> None:
        for i in range(self.engine.num_stages):
            self.engine.install(i, restore_stage(self.spec, i, store.load_stage(step, i)))
        resume.restore(self, state)
        assert self.state.step == step, (self.state.step, step)
        self.resumed_from = step
        logger.warning("resuming run %s from step %d (%s)", self.run_dir, step, store.root)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, on_step=None) -> dict:
        """Train to ``num_steps`` committed steps; ``on_step(state)`` is called after each commit."""
        cfg, st = self.cfg, self.state
        self.start()
        try:
            while st.step < cfg.num_steps and self.stop_requested is None:
                self._one_iteration(on_step)
            if self.saver is not None:
                self.saver.wait()  # no write outlives the run (and a failed one is reported)
        finally:
            self.close()
            write_trace(self.run_dir / "trace.jsonl", self.injector.fired, cfg.model.num_stages)
        if st.last_val_loss is None or st.val_history[-1][0] != st.step:
            self._evaluate()
        # the weights first: a save that fails after them (a full disk) loses no trained step
        self.weights_path = save_weights(
            self.run_dir,
            self.engine.stages,
            cfg.model,
            st.step,
            {"run_name": cfg.run_name, "strategy": cfg.recovery.strategy, "data": self.batches.description},
        )
        try:
            if self.stop_requested is not None:
                self._save_resume_point()  # a failure is raised: the stop promised a resume
            elif self.ckpt is None or st.step not in resume.resumable_steps(self.ckpt):
                try:
                    self._save_resume_point()  # the end is resumable too: a longer num_steps continues from here
                except OSError as e:
                    logger.warning("the run finished but its end could not be saved for a longer run: %s", e)
        finally:
            self.metrics.close()
        summary = self._summary()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.events.emit("run_finished", **summary)
        self.events.close()
        return summary

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary (a signal handler may call this): the run saves what a resume needs,
        writes its summary and weights, and ``run`` returns with ``summary['stopped']`` set."""
        self.stop_requested = reason

    def _save_resume_point(self) -> None:
        """Save every stage and the resume state at the current step, synchronously, off the periodic schedule (a
        clean stop, or the end of a run that saves periodically), into the store's ``resume`` folder: a rollback
        never takes it for a periodic checkpoint, so a resumed run rolls back exactly as an uninterrupted one
        would. Only the newest such save is kept."""
        st = self.state
        store = self._store(STOP_STORE)
        t0 = time.perf_counter()
        for i in range(self.engine.num_stages):
            store.save_stage(self.engine.payload(i, st.step))
        store.save_extra(st.step, resume.ENGINE_FILE, resume.capture(self))
        for old in store.complete_steps():
            if old != st.step:
                store.delete_step(old)
        if self.stop_requested is not None:
            self.stopped_at = st.step
            self.events.emit(
                "run_stopped",
                step=st.step,
                signal=self.stop_requested,
                save_s=time.perf_counter() - t0,
                dir=store.root,
            )

    def close(self) -> None:
        """Wait for a background checkpoint write (hybrid) even when the run ends with an error; a failed
        write is logged here, not raised over the error that ended the run."""
        if self.saver is not None:
            try:
                self.saver.wait()
            except OSError as e:
                logger.error("background checkpoint write failed: %s", e)

    def start(self) -> None:
        """What ``run`` does before its first step (scripts that drive the loop with ``continue_for`` call it)."""
        cfg = self.cfg
        self.events.emit(
            "run_started",
            data=self.batches.description,
            num_stages=cfg.model.num_stages,
            strategy=cfg.recovery.strategy,
            schedule=cfg.pipeline.schedule,
            swap=cfg.swap_enabled,
        )
        if self.resumed_from is not None:
            self.events.emit("run_resumed", step=self.state.step, iteration=self.state.iteration)
            return
        if self.replicas_on:
            self.engine.refresh_replicas(0)
        if self.ckpt:
            self._save_checkpoint()

    def continue_for(self, num_steps: int, on_step=None) -> None:
        """Train ``num_steps`` more committed steps after ``run`` or ``start`` (scripts: recovery experiments)."""
        target = self.state.step + num_steps
        self.cfg.num_steps = max(self.cfg.num_steps, target)
        while self.state.step < target:
            self._one_iteration(on_step)

    def _one_iteration(self, on_step) -> None:
        st = self.state
        failures = self.injector.failures_at(st.iteration, st.measured_iteration_s)
        interrupt = min((interrupt_index(self.schedule, f) for f in failures), default=None)
        t0 = time.perf_counter()
        try:
            loss = self.engine.run_step(st.step, interrupt)
        except StepInterrupted as e:
            st.iteration += 1
            self._handle_failures(failures, e, st.train_s + time.perf_counter() - t0)
            st.train_s += time.perf_counter() - t0
            return
        st.iteration += 1
        if not self.engine.commit():
            stages = self.engine.nonfinite_stages
            reason = f"non-finite gradient on stages {stages}"
            self.events.emit("step_discarded", step=st.step, iteration=st.iteration - 1, reason=reason)
            st.train_s += time.perf_counter() - t0
            if self.nonfinite.discarded(st.step, stages):  # raises NonFiniteSteps unless skipping
                attempts = self.cfg.optim.nonfinite_attempts
                self.events.emit("step_skipped", step=st.step, stages=stages, attempts=attempts)
                st.step += 1
            return
        step_s = time.perf_counter() - t0
        mean = st.measured_iteration_s  # running mean over committed steps
        st.measured_iteration_s = step_s if mean is None else mean + (step_s - mean) / (st.step + 1)
        st.step += 1
        st.last_loss = loss
        st.first_loss = loss if st.first_loss is None else st.first_loss
        extra_t0 = time.perf_counter()
        if self.replicas_on and st.step % self.cfg.recovery.edge_replica_every_steps == 0:
            self.engine.refresh_replicas(st.step)
        every = self.cfg.checkpoint.every_steps
        if self.saver is not None:
            # every k steps, or (k = 0) as soon as the last write has finished: with no stall, the newer the
            # checkpoint the less a rollback loses (the cost model's optimum for saves that cost nothing)
            if (st.step % every == 0) if every else not self.saver.busy:
                self._save_async()
        elif self.ckpt and st.step % every == 0:
            self._save_checkpoint()
        elapsed = step_s + time.perf_counter() - extra_t0
        st.train_s += elapsed
        st.tokens_per_s = self.tokens_per_step / elapsed
        record = {
            "step": st.step - 1,
            "loss/train": loss,
            "throughput/tokens_per_s": st.tokens_per_s,
            "time/train_s": st.train_s,
            "time/step_s": step_s,
            "iteration": st.iteration - 1,
        }
        every = self.cfg.eval_every_steps
        if (every and st.step % every == 0) or st.step == self.cfg.num_steps:
            record["loss/val"] = self._evaluate()
        for i in range(self.engine.num_stages):
            record[f"stage/{i}/lr"] = self.engine.lrs[i]
            record[f"stage/{i}/grad_norm_raw"] = self.engine.grad_norm_raw[i]
            record[f"stage/{i}/grad_norm_smoothed"] = self.engine.grad_norm_smoothed[i]
        self.metrics.write(record)
        if on_step:
            on_step(st)

    def _evaluate(self) -> float:
        val = self.engine.evaluate(self.cfg.data.num_val_batches)
        self.state.last_val_loss = val
        self.state.val_history.append((self.state.step, val))
        return val

    # ---- failures and recovery -----------------------------------------------------------------
    def _handle_failures(self, failures: list[Failure], interrupted: StepInterrupted, lost_at_s: float) -> None:
        st = self.state
        lost = sorted({f.stage for f in failures})
        for f in failures:
            st.failures += 1
            self.events.emit(
                "failure",
                stage=f.stage,
                step=st.step,
                iteration=f.iteration,
                phase=f.phase,
                at=f.at,
                op_index=interrupted.op_index,
                train_s=lost_at_s,  # training wall-clock at the loss: the loss plot marks it there
            )
            logger.info("stage %d lost at step %d (%s)", f.stage, st.step, f.phase)
        self.engine.discard()
        self.events.emit("step_discarded", step=st.step, iteration=st.iteration - 1, reason="stage lost", stages=lost)
        self.recover(lost)

    def recover(self, lost: list[int]) -> None:
        """Lose ``lost`` stages (weights poisoned, optimizers gone) and recover with the configured strategy."""
        for s in lost:
            self.engine.destroy(s)
        if self.cfg.recovery.strategy == "checkpoint" or self._beyond_rebuild(lost):
            self._rollback(lost)
        else:
            self._rebuild(lost)
        self.state.recoveries += len(lost)

    def _rebuild(self, lost: list[int]) -> None:
        cfg, eng, st = self.cfg.recovery, self.engine, self.state
        L = eng.num_stages
        live_kinds = {k for k in eng.replicas if replica_holder(k, L) not in lost}
        ckpt = self.ckpt

        def has_checkpoint(s: int) -> bool:
            if self.saver is not None:
                self.saver.wait()  # a write in flight is the newest checkpoint
            return ckpt is not None and ckpt.latest_for_stage(s) is not None

        plans = plan_recovery(
            lost,
            L,
            cfg.strategy,
            cfg.adjacent_fallback,
            has_checkpoint=has_checkpoint,
            edge_replicas=live_kinds,
            partner_rule=cfg.partner_rule,
        )
        sources = {s for p in plans for s in p.sources}
        blocks = {s: block_state(eng.stages[s].state_dict()) for s in sources}  # live stages only
        norms = {s: eng.recovery_norm(s, cfg.norm_source) for s in sources}
        moments = {s: eng.block_moments(s) for s in sources} if cfg.optimizer_init == "neighbours" else {}
        for plan in plans:
            t0 = time.perf_counter()
            # stages may live on different GPUs (device=cuda): the rebuild reads its sources on the lost stage's
            target = eng.devices[plan.stage]
            inputs = RebuildInputs(blocks=_on(blocks, target), norms=norms, moments=_on(moments, target))
            kind = edge_kind(plan.stage, L)
            if kind and plan.edge == "replica":
                inputs.edge = _on(eng.replicas[kind], target)
            if plan.method == "checkpoint":
                inputs.checkpoint = ckpt.load_stage(ckpt.latest_for_stage(plan.stage), plan.stage)
            if plan.method == "shadow":
                inputs.full_state = eng.shadows.hand_over(plan.stage)
            rebuilt = rebuild_stage(dataclasses.replace(self.spec, device=str(target)), plan, st.step, inputs)
            eng.install(plan.stage, rebuilt)
            duration_s = time.perf_counter() - t0
            self.events.emit("rebuilt", **rebuilt.event_fields(plan, st.step, cfg.strategy, duration_s))
            logger.info("stage %d rebuilt: %s from %s (%s)", plan.stage, plan.method, list(plan.sources), plan.path)
        if self.replicas_on and any(replica_holder(k, L) in lost for k in ("embed", "head")):
            eng.refresh_replicas(st.step)  # a rebuilt holder fetches fresh copies from the live owners
        if eng.shadows is not None:  # shadows taken over or lost with their holder are made anew
            for t, shadow in enumerate(eng.shadows.stages):
                if shadow is None:
                    eng.shadows.copy_from(t, eng.stages[t], eng.optimizers[t], eng.lrs[t])

    def _beyond_rebuild(self, lost: list[int]) -> bool:
        """hybrid: a loss the rebuild cannot take from live neighbours (two neighbours lost, or all) rolls back."""
        if self.cfg.recovery.strategy != "hybrid":
            return False
        return beyond_rebuild(lost, self.engine.num_stages, self.cfg.recovery.partner_rule)

    def _write_failed(self, step: int, error: OSError) -> None:
        """A background checkpoint write failed: that step stays incomplete (a rollback takes an older one)
        and training goes on; said as an event and in the log, every time."""
        self.events.emit("checkpoint_failed", step=step, error=str(error)[:300])
        logger.error("background checkpoint write of step %d failed, training goes on: %s", step, error)

    def _save_async(self) -> None:
        """Serialise every stage's state now (between two steps) and write it in the background."""
        t0 = time.perf_counter()
        step = self.state.step
        blobs = [(i, payload_bytes(self.engine.payload(i, step))) for i in range(self.engine.num_stages)]
        self.saver.save(step, blobs, [(resume.ENGINE_FILE, resume.capture(self))])
        self.events.emit("checkpoint_save", step=step, save_s=time.perf_counter() - t0, background=True)

    def _save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        for i in range(self.engine.num_stages):
            self.ckpt.save_stage(self.engine.payload(i, self.state.step))
        self.ckpt.save_extra(self.state.step, resume.ENGINE_FILE, resume.capture(self))
        self.ckpt.prune()
        self.events.emit("checkpoint_save", step=self.state.step, save_s=time.perf_counter() - t0)

    def _rollback(self, lost: list[int]) -> None:
        st = self.state
        t0 = time.perf_counter()
        if self.saver is not None:
            self.saver.wait()  # a write in flight holds a state from before the loss: the newest to go back to
        target = self.ckpt.latest_complete()
        if target is None:
            raise RuntimeError(f"no complete checkpoint in {self.ckpt.root} to roll back to")
        for i in range(self.engine.num_stages):
            self.engine.install(i, restore_stage(self.spec, i, self.ckpt.load_stage(target, i)))
        self.events.emit(
            "rolled_back",
            step=st.step,
            to_step=target,
            lost_steps=st.step - target,
            stages=lost,
            strategy=self.cfg.recovery.strategy,
            restore_s=time.perf_counter() - t0,
        )
        st.step = target

    def _summary(self) -> dict:
        st = self.state
        return {
            "steps": st.step,
            "iterations": st.iteration,
            "failures": st.failures,
            "recoveries": st.recoveries,
            "first_train_loss": st.first_loss,
            "final_train_loss": st.last_loss,
            "final_val_loss": st.last_val_loss,
            "train_s": st.train_s,
            "tokens_per_step": self.tokens_per_step,
            "mean_tokens_per_s": self.tokens_per_step * st.step / st.train_s if st.train_s else None,
            "strategy": self.cfg.recovery.strategy,
            "run_dir": str(self.run_dir),
            "checkfree_version": __version__,
            "memory/param_bytes": sum(param_bytes(s) for s in self.engine.stages),
            "memory/shadow_param_bytes": self.engine.shadows.shadow_bytes() if self.engine.shadows else 0,
            "resumed_from": self.resumed_from,
            "stopped": self.stop_requested,
            "weights": str(self.weights_path),
        }
