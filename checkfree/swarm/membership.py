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

Every record is sealed (see ``admission``): ``SwarmValidator`` runs in every node of the swarm and neither
stores nor returns a record that is not signed by a holder of the join token under its own peer id, within
the size and expiration bounds and the records' schema. The records a peer serves on its probe port and the
epoch records a leader pushes with its knocks are sealed the same way (``seal_*``/``open_*``).

Pitfalls handled (see HIVEMIND-NOTES): every DHT call goes through ``return_future=True`` and
``.result(timeout)``; a watchdog coroutine inside the forked DHT process shuts it (and its p2pd) down
when the peer process that owns it dies, so a SIGKILL leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from checkfree.swarm.addressing import free_port
from checkfree.swarm.admission import Admission, ForeignToken, RateLimitedLog, dht_context
from checkfree.swarm.config import EPOCH_TTL_CAP_S, MEMBER_TTL_CAP_S, MembershipConfig, parse_port_range
from checkfree.swarm.records import EpochRecord, MemberRecord, chain_head

logger = logging.getLogger(__name__)
# what one store may carry through hivemind's pipe to its DHT process (see ``Membership._store``); below
# the OS pipe buffer, and far below the sealed-record bound every node enforces (``MAX_SEALED_BYTES``)
MAX_STORE_BYTES = 60_000

FINISHED = "finished"  # the subkey, beside the epochs' zero-padded numbers, that marks the run finished


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


CLOCK_SKEW_S = 60.0  # how far ahead of this node's clock a record's expiration may lie beyond the longest TTL
_EPOCH_SUBKEY = re.compile(r"^[0-9]{8}$")


class RecordTally:
    """What this node's validator saw, counted in memory shared with hivemind's DHT process (forked after
    this is made, where records are validated): records refused as sealed with another join token, and
    records of other peers admitted. A peer that sees only the former holds a token other than the swarm's
    (``foreign_token_only``)."""

    def __init__(self) -> None:
        import multiprocessing as mp

        # one writer (the DHT process's validator), one reader (the peer): no lock needed for a count
        self._foreign = mp.RawValue("q", 0)
        self._admitted = mp.RawValue("q", 0)

    def foreign(self) -> None:
        self._foreign.value += 1

    def admitted(self) -> None:
        self._admitted.value += 1

    def counts(self) -> tuple[int, int]:
        """(records refused for another join token, records of other peers admitted)."""
        return self._foreign.value, self._admitted.value


def make_validator(admission: Admission, run_id: str, fingerprint: str | None):
    """The hivemind record validator of this swarm's DHT nodes (see the module doc); ``fingerprint`` None:
    an observer's node, which accepts this run's sealed epoch records of any fingerprint."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import RecordValidatorBase
    from hivemind.utils import MSGPackSerializer, get_dht_time

    members_key = DHTID.generate(source=f"{run_id}/members").to_bytes()
    epoch_key = DHTID.generate(source=f"{run_id}/{fingerprint}/epoch").to_bytes() if fingerprint else None
    refused = RateLimitedLog()
    tally = RecordTally()

    class SwarmValidator(RecordValidatorBase):
        def sign_value(self, record) -> bytes:
            return admission.seal(dht_context(record.key, record.subkey, record.expiration_time), record.value)

        def strip_value(self, record) -> bytes:
            # only called on records that passed ``validate`` (or that this node sealed itself)
            return msgpack_body(record.value)

        def validate(self, record) -> bool:
            try:
                signer = self._check(record)
            except ForeignToken as e:
                tally.foreign()
                refused(str(e))
                return False
            except ValueError as e:
                refused(str(e))
                return False
            if signer != admission.peer_id:
                tally.admitted()
            return True

        def _check(self, record) -> str:
            """The signer of a record this swarm admits; ``ValueError`` saying why it does not."""
            context = dht_context(record.key, record.subkey, record.expiration_time)
            signer, body = admission.open(context, record.value)
            ttl_s = MEMBER_TTL_CAP_S if record.key == members_key else EPOCH_TTL_CAP_S
            if record.expiration_time > get_dht_time() + ttl_s + CLOCK_SKEW_S:
                raise ValueError(f"record of {signer!r} expires too far ahead (more than {ttl_s:.0f} s)")
            try:
                subkey = MSGPackSerializer.loads(record.subkey)
                value = MSGPackSerializer.loads(body)
            except Exception as e:
                raise ValueError(f"record of {signer!r} cannot be decoded: {type(e).__name__}") from e
            if record.key == members_key:
                if subkey != signer:
                    raise ValueError(f"{signer!r} stored a member record under another id ({str(subkey)[:40]!r})")
                if value is not None:
                    rec = _schema(MemberRecord, value, signer)
                    if rec.peer_id != signer or rec.run_id != run_id:
                        raise ValueError(f"member record of {signer!r} names {rec.peer_id!r} of run {rec.run_id!r}")
            elif record.key == epoch_key or (epoch_key is None and isinstance(subkey, str)):
                if subkey == FINISHED:
                    if not (isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], int)):
                        raise ValueError(f"finish mark of {signer!r} is not [epoch, peer]")
                    if value[1] != signer:
                        raise ValueError(f"finish mark of {signer!r} names {str(value[1])[:40]!r}")
                    return signer
                if not isinstance(subkey, str) or not _EPOCH_SUBKEY.match(subkey):
                    raise ValueError(f"epoch record of {signer!r} under subkey {str(subkey)[:40]!r}")
                rec = _schema(EpochRecord, value, signer)
                if rec.epoch != int(subkey) or rec.run_id != run_id:
                    raise ValueError(f"epoch record of {signer!r} is epoch {rec.epoch} of run {rec.run_id!r}")
                if fingerprint is not None and rec.fingerprint != fingerprint:
                    raise ValueError(f"epoch record of {signer!r} has fingerprint {rec.fingerprint}")
                _check_epoch_signer(rec, signer)
            else:
                raise ValueError(f"record of {signer!r} under a key this swarm does not use")
            return signer

    validator = SwarmValidator()
    validator.tally = tally
    return validator


def msgpack_body(blob: bytes) -> bytes:
    import msgpack

    try:
        return msgpack.unpackb(blob, raw=False)[1]
    except Exception:
        return blob


def _schema(model, value, signer: str):
    if not isinstance(value, dict):
        raise ValueError(f"record of {signer!r} is a {type(value).__name__}, expected a {model.__name__}")
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise ValueError(f"record of {signer!r} fails the {model.__name__} schema: {str(e).splitlines()[0]}") from e


def _check_epoch_signer(rec: EpochRecord, signer: str) -> None:
    """An epoch (or stop) record counts only from its leader or a member of its roster."""
    if signer != rec.leader and signer not in rec.roster:
        raise ValueError(f"epoch {rec.epoch} signed by {signer!r}, neither its leader nor in its roster")


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
    admission: Admission | None = None  # the swarm's join token and this node's identity (required)

    def __post_init__(self) -> None:
        import hivemind  # late: importing hivemind imports torch (~2 s)
        from hivemind.utils import get_dht_time

        self._now = get_dht_time
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._blind_until = time.monotonic() + self.cfg.fault_blind_s
        self.known_epoch: EpochRecord | None = None  # the newest epoch accepted: the chain goes on from it
        if self.admission is None:
            raise ValueError("Membership needs the swarm's admission (its join token and this node's identity)")
        validator = make_validator(self.admission, self.run_id, self.fingerprint)
        self.tally: RecordTally = validator.tally
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
            record_validators=[validator],
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
        except Exception as e:  # hivemind's own errors (e.g. P2PDaemonError: no bootstrap peer answered)
            self._end_stuck_process()
            where = f" through {', '.join(self.initial_peers)}" if self.initial_peers else ""
            raise DHTUnavailable(f"could not join the DHT{where}: {str(e).strip()[:300]}") from e
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
        """False, without calling the DHT, for a value over ``MAX_STORE_BYTES``. A message larger than the OS
        pipe buffer (64 KiB) reaches hivemind's DHT process in pieces, and its non-blocking read of one once
        failed mid-message (EAGAIN, then a torn pickle): the DHT process died and the send to it blocked
        forever, past every timeout (seen in CI with a 140 KB value). Records of a swarm are a few KB."""
        size = len(json.dumps(value, default=str))
        if size > MAX_STORE_BYTES:
            logger.warning("not storing %s/%s: %d bytes, over the bound of %d", key, subkey, size, MAX_STORE_BYTES)
            return False
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

    # ---- records off the DHT: probe answers and pushed epochs, sealed like the DHT's ------------------
    def seal_member(self, record: MemberRecord) -> bytes:
        return self.admission.seal(b"probe", record.model_dump_json().encode())

    def open_member(self, blob: bytes, peer_id: str) -> MemberRecord | None:
        """The member record a peer's probe port served: None unless sealed by ``peer_id`` itself."""
        _, value = self._open(b"probe", blob, peer_id)
        rec = self._validate(MemberRecord, value, peer_id) if value is not None else None
        return rec if rec is not None and rec.peer_id == peer_id else None

    def seal_epoch(self, record: EpochRecord) -> bytes:
        return self.admission.seal(b"epoch", record.model_dump_json().encode())

    def open_epoch(self, blob: bytes) -> EpochRecord | None:
        """An epoch record pushed with a leader's knock: None unless sealed by its leader or a roster member."""
        signer, value = self._open(b"epoch", blob, None)
        rec = self._validate(EpochRecord, value, "pushed epoch") if value is not None else None
        if rec is not None:
            try:
                _check_epoch_signer(rec, signer)
            except ValueError as e:
                self._refused(f"pushed {e}")
                return None
        return rec

    def _open(self, context: bytes, blob: bytes, signer: str | None) -> tuple[str, dict | None]:
        """(signer, JSON body) of a sealed record; (``""``, None), logged once per reason, if refused."""
        try:
            who, body = self.admission.open(context, blob)
            if signer is not None and who != signer:
                raise ValueError(f"record of {signer!r} signed by {who!r}")
            value = json.loads(body)
        except ValueError as e:
            self._refused(f"{context.decode()} record: {e}")
            return "", None
        return who, value if isinstance(value, dict) else None

    def _refused(self, reason: str) -> None:
        if reason not in self.ignored:
            self.ignored.add(reason)
            logger.warning("refused a %s", reason)

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
        """The swarm's current epoch: the head of the chain of records (``records.chain_head``: each from a
        leader the epoch before allows, from the newest this node accepted on), marked finished when a member
        of the finished epoch's roster said so."""
        records, mark = {}, None
        for name, value in raw.items():
            if name == FINISHED:
                mark = value if isinstance(value, list | tuple) and len(value) == 2 else None
                continue
            rec = self._validate(EpochRecord, value, f"epoch {name}") if value is not None else None
            if rec is not None:
                records[rec.epoch] = rec
        best = chain_head(records, self.known_epoch)
        if best is not None and (self.known_epoch is None or best.epoch > self.known_epoch.epoch):
            self.known_epoch = best.model_copy(update={"finished": False})
        if best is not None and mark is not None:
            done = records.get(mark[0]) or (best if best.epoch == mark[0] else None)
            if done is not None and mark[0] >= best.epoch and mark[1] in done.roster:
                best = best.model_copy(update={"finished": True})
        return best

    def mark_finished(self, epoch: int) -> bool:
        """Record that the run finished in ``epoch``: a subkey of its own, so that a member re-storing the
        epoch record at that moment (to extend its expiry) cannot erase the mark."""
        return self._store(self._epoch_key(), FINISHED, [epoch, self.admission.peer_id], self.cfg.epoch_ttl_s)

    def shutdown(self) -> None:
        try:
            self.dht.shutdown()
        except Exception:
            logger.debug("DHT shutdown failed", exc_info=True)
