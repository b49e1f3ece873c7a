"""
Trainer
=======

The training loop of the single-process engine: draw failures, run the step, and either commit it or,
when a stage was lost, discard the step, recover (``checkfree.engine.recovery``: rebuild the lost stages
with the configured strategy, or roll everything back to a checkpoint) and redo it; save periodically and
at a clean stop (``checkfree.engine.saving``). Writes the run directory: ``config.yaml``,
``metrics.jsonl``, ``events.jsonl``, ``trace.jsonl``, ``summary.json`` and ``loss.png``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from checkfree import __version__
from checkfree.config import TrainConfig, to_yaml
from checkfree.core.checkpoint import AsyncSaver, CheckpointStore
from checkfree.core.data import Batches
from checkfree.core.devices import check_device, cuda_count
from checkfree.core.events import EventLog
from checkfree.core.failures import FailureInjector, write_trace
from checkfree.core.metrics import MetricLogger, check_trackers, event_scalars
from checkfree.core.model import build_stages
from checkfree.core.rebuild import RebuildSpec, restore_stage
from checkfree.core.recovery import edge_replicas_on
from checkfree.core.redundancy import param_bytes
from checkfree.core.schedule import schedule_for
from checkfree.core.stage_step import NonFiniteGuard
from checkfree.core.weights import save_weights
from checkfree.engine import resume
from checkfree.engine.pipeline import PipelineEngine, StepInterrupted, interrupt_index
from checkfree.engine.records import RunState, run_summary, running_mean, step_record
from checkfree.engine.recovery import Recovery
from checkfree.engine.saving import BACKGROUND, SYNC, Saves, open_store, report_failed_write, save_due, wait_quietly
from checkfree.engine.shadows import Shadows

logger = logging.getLogger(__name__)

STOP_STORE = resume.STOP_STORE
RunDirError = resume.RunDirError


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
        self.engine = self._build_engine()
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

    def _build_engine(self) -> PipelineEngine:
        cfg = self.cfg
        eng = PipelineEngine(
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
            eng.shadows = Shadows(
                eng.stages, eng.optimizers, eng.lrs, self.schedule, self.batches, cfg.optim, eng.devices, eng.precision
            )
        return eng

    def _store(self, sub: str | None = None) -> CheckpointStore:
        """The run's checkpoint store (``checkpoint.dir``, default RUN_DIR/checkpoints), or its sub-folder."""
        return open_store(self.cfg, self.ckpt_root, sub)

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

    # ---- the parts each job gets, as they are now (scripts swap a trainer's engine, state and config) ----
    def _recovery(self) -> Recovery:
        return Recovery(
            self.engine, self.spec, self.cfg.recovery, self.events, self.state, self.ckpt, self.saver, self.replicas_on
        )

    def _saves(self) -> Saves:
        return Saves(self.engine, self.events, lambda: resume.capture(self))

    def _write_failed(self, step: int, error: OSError) -> None:
        report_failed_write(self.events, step, error)  # the saver's on_error: the events the trainer has then

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
        save_s = self._saves().resume_point(store, st.step)
        if self.stop_requested is not None:
            self.stopped_at = st.step
            self.events.emit("run_stopped", step=st.step, signal=self.stop_requested, save_s=save_s, dir=store.root)

    def close(self) -> None:
        """Wait for a background checkpoint write (hybrid) even when the run ends with an error; a failed
        write is logged here, not raised over the error that ended the run."""
        wait_quietly(self.saver)

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
            self._saves().checkpoint(self.ckpt, self.state.step)

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
            self._recovery().after_failures(failures, e, st.train_s + time.perf_counter() - t0)
            st.train_s += time.perf_counter() - t0
            return
        st.iteration += 1
        if not self.engine.commit():
            self._discard_nonfinite(t0)
            return
        self._committed(loss, time.perf_counter() - t0)
        if on_step:
            on_step(st)

    def _discard_nonfinite(self, t0: float) -> None:
        """The step that began at ``t0`` had a non-finite gradient: discarded, then redone or (as configured)
        skipped."""
        st = self.state
        stages = self.engine.nonfinite_stages
        reason = f"non-finite gradient on stages {stages}"
        self.events.emit("step_discarded", step=st.step, iteration=st.iteration - 1, reason=reason)
        st.train_s += time.perf_counter() - t0
        if self.nonfinite.discarded(st.step, stages):  # raises NonFiniteSteps unless skipping
            attempts = self.cfg.optim.nonfinite_attempts
            self.events.emit("step_skipped", step=st.step, stages=stages, attempts=attempts)
            st.step += 1

    def _committed(self, loss: float, step_s: float) -> None:
        """Count the step just committed, refresh replicas and save as due, evaluate as due, write its record."""
        st = self.state
        st.measured_iteration_s = running_mean(st.measured_iteration_s, step_s, st.step + 1)
        st.step += 1
        st.last_loss = loss
        st.first_loss = loss if st.first_loss is None else st.first_loss
        extra_t0 = time.perf_counter()
        if self.replicas_on and st.step % self.cfg.recovery.edge_replica_every_steps == 0:
            self.engine.refresh_replicas(st.step)
        self._periodic_save()
        elapsed = step_s + time.perf_counter() - extra_t0
        st.train_s += elapsed
        st.tokens_per_s = self.tokens_per_step / elapsed
        every = self.cfg.eval_every_steps
        val = self._evaluate() if (every and st.step % every == 0) or st.step == self.cfg.num_steps else None
        eng = self.engine
        self.metrics.write(step_record(st, loss, step_s, val, eng.lrs, eng.grad_norm_raw, eng.grad_norm_smoothed))

    def _periodic_save(self) -> None:
        st, saver = self.state, self.saver
        background = saver is not None
        due = save_due(
            st.step, self.cfg.checkpoint.every_steps, self.ckpt is not None, background, background and saver.busy
        )
        if due == BACKGROUND:
            self._saves().background(saver, st.step)
        elif due == SYNC:
            self._saves().checkpoint(self.ckpt, st.step)

    def _evaluate(self) -> float:
        val = self.engine.evaluate(self.cfg.data.num_val_batches)
        self.state.last_val_loss = val
        self.state.val_history.append((self.state.step, val))
        return val

    # ---- failures and recovery -----------------------------------------------------------------
    def recover(self, lost: list[int]) -> None:
        """Lose ``lost`` stages (weights poisoned, optimizers gone) and recover with the configured strategy."""
        self._recovery().recover(lost)

    def _summary(self) -> dict:
        eng = self.engine
        return run_summary(
            self.state,
            tokens_per_step=self.tokens_per_step,
            strategy=self.cfg.recovery.strategy,
            run_dir=str(self.run_dir),
            version=__version__,
            param_bytes=sum(param_bytes(s) for s in eng.stages),
            shadow_param_bytes=eng.shadows.shadow_bytes() if eng.shadows else 0,
            resumed_from=self.resumed_from,
            stopped=self.stop_requested,
            weights=str(self.weights_path),
        )
