"""
Reporting
=========

What a peer tells the others, as a part of ``Peer`` (a mixin over its state: ``worker``, ``status``, the
``probes`` server, ``membership``, ``view``, ``leader``, the epoch ``slot``): its member record (served on
its probe port at every watch round, stored in the DHT every heartbeat period), the counts of what reached
its open ports, its events, and what it does when its probe port is knocked or pushed an epoch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from checkfree.core.events import EventLog
from checkfree.core.metrics import MetricLogger
from checkfree.swarm.logsync import LogSync
from checkfree.swarm.records import Lineage, MemberRecord, follows

logger = logging.getLogger(__name__)


class Reporting:
    def _open_logs(self) -> None:
        cfg = self.cfg
        self.dir = self.run_dir / "peers" / self.peer_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.dir / "events.jsonl")
        tb_dir = None
        if cfg.metrics.tensorboard:
            tb_dir = Path(cfg.metrics.tensorboard_dir or self.run_dir / "tensorboard") / self.peer_id
        self.metrics = MetricLogger(self.dir / "metrics.jsonl", tb_dir)
        sw = cfg.swarm
        self.logsync = (
            LogSync(sw.log_url, self.dir, self.peer_id, sw.log_every_s, sw.log_storage_options) if sw.log_url else None
        )

    def _close_logs(self) -> None:
        self.events.close()
        self.metrics.close()
        if self.logsync is not None:
            self.logsync.close()  # the last copy, with every event and metric written

    def _say_started(self) -> None:
        self.emit(
            "peer_started",
            role="stage" if self.asked_stage >= 0 else "spare",
            asked_stage=self.asked_stage,
            pid=os.getpid(),
            maddrs=self._maddrs,
            device=self.cfg.device,
            memory_plan_bytes=self.memory_plan.total,
        )

    def record(self) -> MemberRecord:
        w, st = self.worker, self.status
        return MemberRecord(
            run_id=self.run_id,
            fingerprint=self.fingerprint,
            peer_id=self.peer_id,
            stage=w.index if w is not None else self.asked_stage,
            epoch=st.epoch,
            state=st.state,
            step=st.step,
            iteration=st.iteration,
            pending=bool(w is not None and w.pending_step is not None),
            grad_norm=w.recovery_norm(self.cfg.recovery.norm_source) if w is not None else 0.0,
            host=self.cfg.membership.announce_host or self.cfg.membership.host,
            loss=st.loss,
            tokens_per_s=st.tokens_per_s,
            pid=os.getpid(),
            note=self.leader.reason,
            lineage=w.lineage if w is not None else Lineage(),
            error=self.last_error,
            blame=self.blame,
            shadow_ok=w.shadow_ok if w is not None else True,
            probe_port=self.probes.port,
            counters=self.counters(),
            maddrs=self._maddrs,
            handoff_port=self._handoff_port,
        )

    def counters(self) -> dict[str, int]:
        """What reached this peer's open ports (heartbeated, and written at exit: see ``peer_counters``)."""
        out = dict(self.probes.counts)
        out["records_foreign"] = self.membership.tally.counts()[0]
        out["revived"] = self.view.revived
        for gate in list(self.leader.gates.values()):
            for k, v in getattr(gate, "counts", {}).items():
                out[f"gate_{k}"] = out.get(f"gate_{k}", 0) + v
        return out

    def _serve_now(self) -> MemberRecord:
        """Refresh the record served on the probe port (its ``time`` is new: the members watching this peer
        see that it lives)."""
        rec = self.record()
        rec.time = self.membership.now
        self.probes.served = self.membership.seal_member(rec)
        return rec

    def _beat_now(self) -> None:
        self.membership.heartbeat(self._serve_now())

    def _on_knock(self) -> None:
        """A knock on the probe port (rate-limited by the server, see ``probe``): wake the main thread (a new
        epoch, a member's report) and the watch."""
        self._wake.set()
        self.watch.knocked.set()

    def _take_pushed(self, sealed: bytes) -> bool:
        """The epoch record a leader pushed with its knock, checked like one read from the DHT; a malformed or
        unsealed one is refused (the DHT still has the real one)."""
        rec = self.membership.open_epoch(sealed)
        leader = getattr(self, "leader", None)  # a push may come in before the peer is fully built
        known = [self.membership.known_epoch, self.slot.pushed, self.slot.joined, leader and leader.published]
        base = max((r for r in known if r is not None), key=lambda r: r.epoch, default=None)
        if rec is None or (base is not None and rec.epoch > base.epoch and not follows(base, rec)):
            return False  # not an epoch the swarm's last one allows (a token holder's stop record, say)
        self.slot.push(rec)
        return True

    def _look_for_spare(self) -> None:
        """From the DHT thread: after a preemption notice, the stage is handed over once a spare can take it."""
        if self.notice.noticed is not None and not self._spare_in_view and self.status.state == "running":
            self._spare_in_view = any(r.state == "spare" for r in self.membership.members().values())

    def _maybe_cut(self) -> None:
        t = self.cfg.transport
        named = t.fault_cut_peer in (self.peer_id, self.peer_id.rpartition(".")[0])  # its id or its name
        if self._cut or not named or self.status.step < t.fault_cut_at_step:
            return
        self._cut = True
        reason = f"data plane cut at step {self.status.step} (transport.fault_cut_peer={self.peer_id})"
        logger.warning("[peer %s] fault injection: %s", self.peer_id, reason)
        with self.slot.lock:
            group = self.slot.group
        if group is not None:
            group.abort(reason)

    def emit(self, event: str, **fields) -> None:
        # while a new peer joins, the stage it is taking is the one its group serves
        group = self.slot.group
        stage = self.worker.index if self.worker is not None else group.stage if group is not None else None
        self.events.emit(event, peer=self.peer_id, stage_held=stage, epoch=self.status.epoch, **fields)
