"""
Rendezvous
==========

Forming an epoch's process group: join the epoch's rendezvous store (through a ``gate.Tunnel``: the store
admits the roster only) and build the group, in a helper thread that is abandoned as soon as the epoch is
known to be over (a member lost, the leader hosting the store included), so that no peer waits out
``transport.rendezvous_timeout_s`` for a dead one. An abandoned attempt ends by itself at that timeout.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from checkfree.swarm.addressing import data_host
from checkfree.swarm.admission import Admission
from checkfree.swarm.gate import Tunnel
from checkfree.swarm.records import EpochRecord
from checkfree.swarm.transport import EpochGroup, StageLostError
from checkfree.swarm.watch import EpochSlot


class Rendezvous:
    def __init__(self, cfg, admission: Admission, fingerprint: str, device: torch.device, slot: EpochSlot):
        self.cfg, self.admission, self.device, self.slot = cfg, admission, device, slot
        self.run_tag = int(fingerprint[:6], 16)
        self._tunnels: dict[int, Tunnel] = {}  # epoch -> the relay to its rendezvous store

    def form(self, rec: EpochRecord, stage: int, hosted: dist.TCPStore | None = None) -> EpochGroup:
        """The group of epoch ``rec`` for ``stage``; ``hosted``: the store, when this peer hosts it (leads).

        Raises:
            StageLostError: the epoch ended meanwhile, or the rendezvous failed (the message says why).
        """
        out: dict[str, object] = {}
        thread = threading.Thread(target=self._form, args=(rec, stage, hosted, out), name=f"rendezvous-{rec.epoch}")
        thread.daemon = True
        thread.start()
        while thread.is_alive():
            thread.join(0.02)
            if self.slot.over is not None and thread.is_alive():
                raise StageLostError(None, rec.step, f"rendezvous of epoch {rec.epoch} abandoned: {self.slot.over}")
        if "error" in out:
            e = out["error"]
            raise StageLostError(None, rec.step, f"rendezvous of epoch {rec.epoch} failed: {e}") from e
        return out["group"]

    def _form(self, rec: EpochRecord, stage: int, store: dist.TCPStore | None, out: dict) -> None:
        cfg, L = self.cfg, self.cfg.model.num_stages
        try:
            if store is None:
                # the store admits members only: reach it through a tunnel that passes its gate (see gate)
                tunnel = Tunnel(rec.store_host, rec.store_port, self.admission, rec.leader, rec.epoch)
                with self.slot.lock:  # an abandoned, late attempt of an older epoch closes only older ones
                    self._tunnels[rec.epoch] = tunnel
                    old = [self._tunnels.pop(e) for e in list(self._tunnels) if e < rec.epoch]
                for t in old:
                    t.close()
                store = dist.TCPStore(
                    "127.0.0.1",
                    tunnel.port,
                    L,
                    is_master=False,
                    timeout=timedelta(seconds=cfg.transport.rendezvous_timeout_s),
                )
            out["group"] = EpochGroup(
                store,
                rec.epoch,
                stage,
                list(range(L)),
                cfg.transport,
                run_tag=self.run_tag,
                host=data_host(cfg.membership.host, cfg.membership.announce_host),
                device=self.device,
            )
        except Exception as e:  # handed to the main thread
            out["error"] = e

    def close(self) -> None:
        with self.slot.lock:
            tunnels, self._tunnels = list(self._tunnels.values()), {}
        for tunnel in tunnels:
            tunnel.close()
