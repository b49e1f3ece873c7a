"""
Leaving
=======

How a peer leaves the swarm other than by finishing or dying: a signal (``checkfree peer`` maps SIGINT and
SIGTERM to ``request_stop``) or a preemption notice, acted on at a step boundary (``TrainingLoop`` asks
``_should_leave`` after every commit; a peer between epochs stops at once).

- Ctrl-C (SIGINT): save this stage's state as of its last committed step (a checkpoint payload into
  ``checkpoint.dir``, default RUN_DIR/checkpoints, also with ``checkpoint.every_steps=0``, and its weights
  part), exit 130.
- SIGTERM: a preemption notice (``NoticeWatcher.notify``): hand the stage's exact state to a spare in view
  (``preemption``), else save it as on Ctrl-C; exit 143, never 0 (a managed-job system reads 0 as finished).
- A preemption notice: hand the stage over; exit 0 (the swarm goes on; the machine goes away).

``Leaving`` is a part of ``Peer`` (a mixin over its state: ``worker``, ``status``, the epoch ``slot``,
``notice``, ``training``, ``membership``, ``cfg``), kept apart so that the peer's lifecycle module stays
about the lifecycle.
"""

from __future__ import annotations

import logging
import time

from checkfree.core.exit_codes import ExitCode
from checkfree.swarm.membership import DHTUnavailable
from checkfree.swarm.preemption import HandoffServer
from checkfree.swarm.states import PeerState

logger = logging.getLogger(__name__)


class Leaving:
    def request_stop(self, kind: str) -> None:
        """From a signal handler: ``interrupt`` (SIGINT, Ctrl-C): stop at the next step boundary and save this
        stage's state; ``terminate`` (SIGTERM): leave the swarm, handing the stage to a spare in view as on a
        preemption notice, else saving it as on an interrupt. The first signal decides."""
        if self._stop_kind is not None:
            return
        self._stop_kind, self._stop_at = kind, time.monotonic()
        if kind == "terminate":
            self.notice.notify("SIGTERM")  # the DHT thread looks for a spare that can take the stage
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """A signal asked this peer to stop (``request_stop``)."""
        return self._stop_kind is not None

    def _should_leave(self) -> str | None:
        """After a commit: why this peer stops training now (a signal; a preemption notice, and a spare to take
        its stage or no time left), else None."""
        if self._stop_kind == "interrupt":
            return "interrupted (SIGINT)"
        n = self.notice
        if n.noticed is None:
            return None
        if self._spare_in_view or n.deadline_passed():
            return f"preemption notice: {n.text}"
        if self._stop_kind == "terminate" and time.monotonic() - self._stop_at > 2 * self.cfg.membership.period_s:
            return "terminated (SIGTERM) with no spare in view"  # the DHT thread has looked twice
        return None

    def _stop_code(self) -> ExitCode:
        """The exit code of a peer that stops now: what its signal asked for, else the run is done (OK)."""
        return {"interrupt": ExitCode.INTERRUPTED, "terminate": ExitCode.TERMINATED}.get(self._stop_kind, ExitCode.OK)

    def _leave(self, reason: str) -> ExitCode:
        """Leave the swarm at a step boundary: hand the stage over (a preemption notice, or SIGTERM with a spare
        in view and an epoch to hand it in), else save it (a signal)."""
        handing = self._stop_kind is None or (self._stop_kind == "terminate" and self._spare_in_view)
        if handing and self.worker is not None and self.slot.joined is not None:
            if self._hand_over(reason) or self._stop_kind is None:
                return self._stop_code()
        return self._stop_and_save(reason)

    def _stop_and_save(self, reason: str) -> ExitCode:
        """Stop for a signal: write this stage's state as of its last committed step (a checkpoint payload
        into ``checkpoint.dir`` when one is configured, and its weights part), so that the run can go on
        from it, and return the signal's exit code."""
        w, step = self.worker, self.status.step
        self._settle_writes()
        rec = self.slot.leave()
        self.slot.close_group(f"stage {w.index if w else None} stops: {reason[:100]}")  # the others stop waiting
        # the leader counts a leaving member's stage as lost at once, without waiting for it to abort a step
        self.status.move(PeerState.LEAVING)
        self._serve_now()
        if rec is not None:
            self.prober.knock([a for pid, a in zip(rec.roster, rec.probes) if pid != self.peer_id])
        saved = ""
        if w is not None and w.lineage.kind != "none":
            try:
                self.training.save_now(w, step)
                self._save_part(step)
                saved = f"; stage {w.index} saved at step {step}"
            except (OSError, RuntimeError, ValueError) as e:
                saved = f"; saving stage {w.index} at step {step} failed: {e}"
        self.emit("left", reason=f"{reason[:200]}{saved}", step=step)
        logger.warning("[peer %s] %s%s", self.peer_id, reason, saved)
        return self._stop_code()

    def _save_part(self, step: int) -> None:
        """Write this stage's weights as the run's part of the model (``RUN_DIR/weights``; ``checkfree swarm``
        joins the parts into ``model.safetensors``)."""
        from checkfree.core.weights import save_stage_part

        w = self.worker
        lineage = f"swarm run {self.run_id}, peer {self.peer_id}: {w.lineage.describe(step)}"
        meta = {"run_id": self.run_id, "peer": self.peer_id, "epoch": self.status.epoch, "run_name": self.cfg.run_name}
        save_stage_part(self.run_dir, w.index, w.stage.state_dict(), self.cfg.model, step, lineage, meta)

    def _hand_over(self, reason: str) -> bool:
        """Serve this stage's exact state (as of the last committed step) until the spare that the next epoch
        names has it and trains, or the notice's time is up; returns whether a spare took it."""
        w, cfg, step = self.worker, self.cfg, self.status.step
        self.emit("preempted", reason=reason[:300], step=step, spare_in_view=self._spare_in_view)
        self._settle_writes()  # a save started at this step would otherwise die with the process
        rec = self.slot.leave()
        self.slot.close_group(f"stage {w.index} leaves: {reason[:100]}")  # the others stop waiting on it now
        if self.notice.deadline_passed():
            self.emit("left", reason=f"{reason[:200]}; no spare took stage {w.index} in time")
            return False
        m = cfg.membership
        limit = cfg.swarm.preemption.handoff_timeout_s
        server = HandoffServer(m.host, m.port_range, self.membership.admission, w.payload(step), limit)
        self._handoff_port = server.port
        self.status.move(PeerState.LEAVING)
        self._serve_now()
        if rec is not None:
            self.prober.knock([a for pid, a in zip(rec.roster, rec.probes) if pid != self.peer_id])
        self.dht.store_now.set()
        successor = None
        try:
            while successor is None and not self.notice.deadline_passed():
                time.sleep(m.poll_s)
                try:
                    members, current = self.membership.members_and_epoch()
                except DHTUnavailable:
                    continue
                if current is None or current.epoch <= self.status.epoch or w.index >= len(current.roster):
                    continue
                pid = current.roster[w.index]
                r = members.get(pid)
                if pid in server.served and r is not None and r.epoch >= current.epoch and r.state == "running":
                    successor = pid
        finally:
            server.close(wait_s=3.0)  # its threads end before the process does
        self._handoff_port = 0
        if successor is not None:
            self.emit("handed_over", to=successor, step=step, stage=w.index)
            logger.warning("[peer %s] %s: stage %d handed over to %s", self.peer_id, reason, w.index, successor)
            return True
        self.emit("left", reason=f"{reason[:200]}; the hand-over of stage {w.index} did not finish in time")
        return False

    def _try_save_part(self) -> None:
        """``_save_part`` of the committed weights this peer holds, if any; a failure is logged (the launcher
        says in its summary that the part is missing or old)."""
        w = self.worker
        if w is None or w.lineage.kind == "none":
            return
        try:
            self._save_part(self.status.step)
        except (OSError, ValueError) as e:
            logger.error("[peer %s] cannot write the weights of stage %d: %s", self.peer_id, w.index, e)
