"""
Membership
==========

Who holds which stage, on a hivemind DHT. Every peer heartbeats a ``MemberRecord`` under
``{run_id}/members`` (subkey: its peer id) every ``period_s`` with an expiration ``ttl_s`` ahead; a peer
whose record expired is gone. The leader publishes ``EpochRecord``s under ``{run_id}/{fingerprint}/epoch`` (subkey:
the zero-padded epoch number): the roster of an epoch, its rendezvous address, the step to run and the
recovery plan. Records are schema-checked; a record of another run or another model/config fingerprint
is ignored and logged, and epochs are keyed by fingerprint so that such a peer can never overwrite
them. A clean exit stores a tombstone (value None) so peers see the departure at once.

Pitfalls handled (see HIVEMIND-NOTES): every DHT call goes through ``return_future=True`` and
``.result(timeout)``; a watchdog coroutine inside the forked DHT process shuts it (and its p2pd) down
when the peer process that owns it dies, so a SIGKILL leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ValidationError

from checkfree.swarm.addressing import free_port
from checkfree.swarm.config import MembershipConfig, parse_port_range

logger = logging.getLogger(__name__)

FINISHED = "finished"  # the subkey, beside the epochs' zero-padded numbers, that marks the run finished
STATES = ("waiting", "joining", "running", "recovering", "spare", "done")


class Lineage(BaseModel):
    """Where a holder's weights come from: what makes them valid (or not) for the step the swarm resumes at.

    kind: ``none`` (no weights for the stage: a spare, or a rebuild that broke off), ``initial`` (the seed's
    initial state, valid at step 0), ``rebuilt`` (assembled at ``step`` from ``sources`` by ``method``),
    ``restored`` (a checkpoint of ``step``). Training since then is the record's ``step`` and ``epoch``.
    """

    kind: Literal["none", "initial", "rebuilt", "restored"] = "none"
    step: int = 0  # the step the weights were made for
    epoch: int = -1  # the epoch in which they were made
    method: str | None = None
    sources: list[int] = []

    def describe(self, trained_to: int | None = None) -> str:
        if self.kind == "none":
            return "no weights"
        what = {
            "initial": "initial weights",
            "rebuilt": f"rebuilt at step {self.step} by {self.method} from stages {self.sources}",
            "restored": f"restored from the checkpoint of step {self.step}",
        }[self.kind]
        if self.epoch >= 0:
            what += f" (epoch {self.epoch})"
        if trained_to is not None and trained_to > self.step:
            what += f", trained through step {trained_to - 1}"
        return what


class MemberRecord(BaseModel):
    run_id: str
    fingerprint: str
    peer_id: str
    stage: int  # stage held (or asked for, before the first epoch); -1: spare
    epoch: int  # latest epoch this peer joined; -1: none yet
    state: Literal["waiting", "joining", "running", "recovering", "spare", "done"]
    step: int  # committed steps
    pending: bool = False  # holds finished, uncommitted gradients of step ``step``
    grad_norm: float = 0.0  # pre-clip gradient norm of the last committed step
    host: str = "127.0.0.1"
    loss: float | None = None
    tokens_per_s: float | None = None
    pid: int = 0
    note: str = ""  # what the peer is waiting for, when it is (shown by status)
    time: float = 0.0
    lineage: Lineage = Lineage()  # where the weights of the stage held come from
    error: str = ""  # why this peer's last epoch broke (its last step_aborted cause, shortened)
    blame: list[int] = []  # the stages its last epoch broke on, as far as this peer knows
    shadow_ok: bool = True  # redundant: the shadow held is up to date (False until a new peer's is sent)
    probe_port: int = 0  # a TCP port that refuses connections once this peer's process is gone
    maddrs: list[str] = []  # this peer's DHT addresses: any live peer bootstraps a new one (see status)

    def valid_for(self, step: int) -> bool:
        """Whether this holder's weights are the stage's weights for ``step`` (a finished, uncommitted step
        that another stage committed counts: the holder applies it when the next epoch names the step done)."""
        if self.lineage.kind == "none":
            return False
        return self.step == step or (self.pending and self.step + 1 == step)


class PlanRecord(BaseModel):
    stage: int
    method: str
    sources: list[int]
    path: str
    edge: str | None


class EpochRecord(BaseModel):
    run_id: str
    fingerprint: str
    epoch: int
    roster: list[str]  # peer id per stage
    store_host: str
    store_port: int
    step: int  # the step every stage runs next
    leader: str
    lost: list[int] = []  # stages whose peer was replaced in this epoch
    plans: list[PlanRecord] = []  # how each lost stage is rebuilt
    rollback_to: int | None = None  # checkpoint strategy: every stage restores this step
    stop: str | None = None  # set when the swarm gives up: every peer exits with this reason
    finished: bool = False  # set by the stages that ran the last step: the run is done, spares may leave
    probes: list[tuple[str, int]] = []  # each roster member's probe address (host, port)
    reforms: int = 0  # epochs in a row re-formed at this step with nothing lost (see swarm.max_reforms)
    stale_shadows: list[int] = []  # redundant: stages whose shadow must be sent anew to its holder
    time: float = 0.0


async def _watchdog(parent_pid: int, poll_s: float, dht, node) -> bool:
    """Runs inside the DHT process: starts a task that shuts the process (and its p2pd) down when the peer
    process that forked it is gone, and returns once that task runs, so that the caller can wait for it."""

    async def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                try:
                    await asyncio.wait_for(node.shutdown(), 5)
                finally:
                    os._exit(0)
            await asyncio.sleep(poll_s)

    dht.checkfree_watchdog = asyncio.create_task(watch())  # referenced, so it is not garbage-collected
    await asyncio.sleep(0)
    return True


class DHTUnavailable(RuntimeError):
    """The DHT did not answer within its timeout (transient: callers that loop try again later)."""


class DHTGone(DHTUnavailable):
    """This peer's DHT process has exited: the peer can neither heartbeat nor see the swarm."""


@dataclass
class Membership:
    cfg: MembershipConfig
    run_id: str
    fingerprint: str | None  # None: accept every fingerprint (read-only observers)
    initial_peers: list[str] = field(default_factory=list)
    client_mode: bool = False  # observe without serving DHT requests
    ignored: set[str] = field(default_factory=set)  # peer ids already logged as foreign

    def __post_init__(self) -> None:
        import hivemind  # late: importing hivemind imports torch (~2 s)
        from hivemind.utils import get_dht_time

        self._now = get_dht_time
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._blind_until = time.monotonic() + self.cfg.fault_blind_s
        # an explicit port: hivemind refuses announce addresses without one, and a firewall needs to know it
        port = free_port(self.cfg.host, parse_port_range(self.cfg.port_range))
        self.dht = hivemind.DHT(
            initial_peers=self.initial_peers or None,
            host_maddrs=[f"/ip4/{self.cfg.host}/tcp/{port}"],
            announce_maddrs=[f"/ip4/{self.cfg.announce_host}/tcp/{port}"] if self.cfg.announce_host else None,
            startup_timeout=self.cfg.startup_timeout_s,
            wait_timeout=self.cfg.rpc_timeout_s,
            ensure_bootstrap_success=bool(self.initial_peers),
            client_mode=self.client_mode,
            start=False,
        )
        # hivemind's own start waits for the DHT process without a limit; a process that never becomes ready
        # (p2pd stuck, or a lock shared with a killed sibling process) must not hang the peer forever
        limit = self.cfg.startup_timeout_s
        self.dht.run_in_background(await_ready=False)
        try:
            self.dht.wait_until_ready(timeout=2 * limit)
        except TimeoutError as e:
            self._end_stuck_process()
            raise DHTUnavailable(f"the DHT process was not ready within {2 * limit} s (2 x startup_timeout_s)") from e
        # wait until the watchdog runs: a peer killed right after this returns must not leave its DHT behind
        watching = self.dht.run_coroutine(functools.partial(_watchdog, os.getpid(), 0.25), return_future=True)
        try:
            watching.result(timeout=self.cfg.startup_timeout_s)
        except TimeoutError as e:
            self._end_stuck_process()
            raise DHTUnavailable(f"the DHT process did not start its watchdog within {limit} s") from e

    def _end_stuck_process(self) -> None:
        """Kill a DHT process that never became ready, with its p2p daemon (it cannot be asked to shut down)."""
        pid = self.dht.pid
        daemons = []
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                daemons = [int(c) for c in f.read().split()]
        except OSError:
            pass
        for p in [pid, *daemons]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.dht.join(5)

    @property
    def now(self) -> float:
        return self._now()

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def _call(self, fn, *args, **kwargs):
        """``fn`` on the DHT, limited by ``dht_timeout_s``; a timeout is retried ``dht_retries`` times with
        backoff before ``DHTUnavailable`` is raised (callers that loop catch it and try again later)."""
        for attempt in range(self.cfg.dht_retries + 1):
            if not self.dht.is_alive():
                raise DHTGone("this peer's DHT process has exited")
            try:
                if self._rng.random() < self.cfg.fault_timeout_rate:
                    raise TimeoutError("injected by membership.fault_timeout_rate")
                with self._lock:
                    future = fn(*args, return_future=True, **kwargs)
                return future.result(timeout=self.cfg.dht_timeout_s)
            except TimeoutError as e:
                if attempt == self.cfg.dht_retries:
                    raise DHTUnavailable(
                        f"DHT call failed {attempt + 1} times (limit {self.cfg.dht_timeout_s} s each): {e}"
                    ) from e
                time.sleep(0.1 * 2**attempt)

    def _store(self, key: str, subkey: str, value, ttl_s: float) -> bool:
        return bool(self._call(self.dht.store, key, value, self.now + ttl_s, subkey=subkey))

    def _get(self, key: str) -> dict:
        return self._subkeys(self._call(self.dht.get, key, latest=True))

    @staticmethod
    def _subkeys(entry) -> dict:
        if entry is None or not isinstance(entry.value, dict):
            return {}
        return {k: v.value for k, v in entry.value.items()}

    def _get_many(self, keys: list[str]) -> list[dict]:
        """``_get`` of several keys, sent at once: one DHT round trip instead of one per key (what a peer
        deciding after a failure waits for); a get that times out is retried alone, as ``_call`` does."""
        if not self.dht.is_alive():
            raise DHTGone("this peer's DHT process has exited")
        with self._lock:
            futures = [
                None
                if self._rng.random() < self.cfg.fault_timeout_rate
                else self.dht.get(key, latest=True, return_future=True)
                for key in keys
            ]
        out = []
        for key, future in zip(keys, futures):
            try:
                if future is None:
                    raise TimeoutError("injected by membership.fault_timeout_rate")
                entry = future.result(timeout=self.cfg.dht_timeout_s)
            except TimeoutError:
                entry = self._call(self.dht.get, key, latest=True)
            out.append(self._subkeys(entry))
        return out

    # ---- members -------------------------------------------------------------------------------
    def heartbeat(self, record: MemberRecord) -> bool:
        record.time = record.time or self.now  # a time already set is kept: the peer serves the same record
        return self._store(f"{self.run_id}/members", record.peer_id, record.model_dump(), self.cfg.ttl_s)

    def tombstone(self, peer_id: str) -> None:
        """Announce a clean departure (peers see it at once instead of after the TTL)."""
        try:
            self._store(f"{self.run_id}/members", peer_id, None, self.cfg.ttl_s)
        except DHTUnavailable:
            logger.warning("could not store the tombstone of %s", peer_id)

    def members(self) -> dict[str, MemberRecord]:
        """Live, valid member records of this run (expired ones are already dropped by the DHT)."""
        return self._members(self._get(f"{self.run_id}/members"))

    def members_and_epoch(self) -> tuple[dict[str, MemberRecord], EpochRecord | None]:
        """``members()`` and ``current_epoch()`` in one DHT round trip."""
        members, epochs = self._get_many([f"{self.run_id}/members", self._epoch_key()])
        return self._members(members), self._newest_epoch(epochs)

    def _members(self, raw: dict) -> dict[str, MemberRecord]:
        out = {}
        if time.monotonic() < self._blind_until:
            return out  # membership.fault_blind_s: no member in view, as a freshly joined node may see
        for peer_id, value in raw.items():
            if value is None:
                continue  # tombstone
            rec = self._validate(MemberRecord, value, peer_id)
            if rec is not None:
                out[peer_id] = rec
        return out

    def validate_member(self, value: dict, peer_id: str) -> MemberRecord | None:
        """A member record read from elsewhere than the DHT (a peer's probe port), checked like the DHT's."""
        rec = self._validate(MemberRecord, value, peer_id)
        return rec if rec is not None and rec.peer_id == peer_id else None

    def validate_epoch(self, value) -> EpochRecord | None:
        """An epoch record read from elsewhere than the DHT (pushed with a leader's knock), checked like the
        DHT's."""
        return self._validate(EpochRecord, value, "pushed epoch") if isinstance(value, dict) else None

    def _validate(self, model, value, name: str):
        try:
            rec = model.model_validate(value)
        except ValidationError as e:
            if name not in self.ignored:
                self.ignored.add(name)
                logger.warning("ignoring malformed record %s: %s", name, str(e).splitlines()[0])
            return None
        if rec.run_id != self.run_id or (self.fingerprint is not None and rec.fingerprint != self.fingerprint):
            if name not in self.ignored:
                self.ignored.add(name)
                logger.warning(
                    "ignoring record %s of run %r fingerprint %s (this swarm: run %r fingerprint %s)",
                    name,
                    rec.run_id,
                    rec.fingerprint,
                    self.run_id,
                    self.fingerprint,
                )
            return None
        return rec

    # ---- epochs --------------------------------------------------------------------------------
    def _epoch_key(self) -> str:
        # per fingerprint: a peer of another model can never overwrite this swarm's epochs
        return f"{self.run_id}/{self.fingerprint}/epoch"

    def publish_epoch(self, record: EpochRecord) -> bool:
        """Store (or re-store, to extend its expiry) an epoch record for ``membership.epoch_ttl_s``."""
        return self._store(self._epoch_key(), f"{record.epoch:08d}", record.model_dump(), self.cfg.epoch_ttl_s)

    def current_epoch(self, fingerprint: str | None = None) -> EpochRecord | None:
        """The newest epoch record of this swarm (of ``fingerprint``, for observers that have none)."""
        key = f"{self.run_id}/{fingerprint}/epoch" if fingerprint else self._epoch_key()
        return self._newest_epoch(self._get(key))

    def _newest_epoch(self, raw: dict) -> EpochRecord | None:
        best, finished = None, None
        for name, value in raw.items():
            if name == FINISHED:
                finished = value if isinstance(value, int) else None
                continue
            rec = self._validate(EpochRecord, value, f"epoch {name}") if value is not None else None
            if rec is not None and (best is None or rec.epoch > best.epoch):
                best = rec
        if best is not None and finished is not None and finished >= best.epoch:
            best = best.model_copy(update={"finished": True})
        return best

    def mark_finished(self, epoch: int) -> bool:
        """Record that the run finished in ``epoch``: a subkey of its own, so that a member re-storing the
        epoch record at that moment (to extend its expiry) cannot erase the mark."""
        return self._store(self._epoch_key(), FINISHED, epoch, self.cfg.epoch_ttl_s)

    def shutdown(self) -> None:
        try:
            self.dht.shutdown()
        except Exception:
            logger.debug("DHT shutdown failed", exc_info=True)
