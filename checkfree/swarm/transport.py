"""
Transport
=========

Activations and gradients between stage peers over torch.distributed, one process group per
membership epoch (gloo on CPU, NCCL on CUDA), built directly from a store and called as an object
(``pg.send([t], dst, tag)``) so that a dead peer breaks only this epoch's group, never a global one.

Every message carries a fixed-size int64 header (run tag, step, microbatch, hop, kind, dtype, rank, shape).
The receiver checks it against what its schedule expects (same step, microbatch, hop and kind, the expected
shape and dtype), so a confused or faulty peer is refused with an error that names what it sent. A training
step's activations and gradients over gloo travel *framed*: header and payload in one message, received into
a buffer with room for twice the expected payload. A separate header message cost 13% of the static
pipeline's step time on the bench config (two gloo operations and a wake-up per tensor; measured side by
side, 1.11-1.15x over 4 rounds). gloo accepts a message shorter than the posted buffer, but aborts the
receiving process on a longer one (``pair.cc``: "Received data size doesn't match expected size"): a wrong
shape up to twice the expected bytes is refused with the error above; beyond that only the config
fingerprint, which every peer of an epoch shares and which fixes every shape, stands in the way (as it
does for a header of the wrong size). Weights and states (rare, possibly large) and everything over NCCL
(whose receives must match the sent size exactly) send the header first, then the payload.

Activations and gradients travel in the run's wire dtype (bf16 with ``precision=bf16``), weights and states
in their own. Weights and states holding NaN/inf are refused too; activations and gradients holding them
are delivered, because the commit discards such a step on every stage. Every wait has a timeout; transport
failures and timeouts become ``StageLostError`` here, at the boundary. ``bytes_sent`` counts every byte
this end sent, headers included (all-reduces aside).

``abort`` releases every wait of the group at once, from another thread: the peer's heartbeat thread calls
it when a member of the epoch is known lost (its heartbeat expired: a hang; or a newer epoch exists), so a
survivor blocked on a frozen peer is released within the heartbeat TTL instead of ``transport.timeout_s``,
which stays the backstop. gloo has no abort that wakes a waiting receive (``ProcessGroupGloo.abort`` and
``shutdown`` do not, and a wait with a short timeout closes the pair), so the group remembers the TCP
connections it opened and shuts them down: every pending operation then fails at once with "connection
closed", in this process and in every peer connected to it. NCCL groups use ``ProcessGroupNCCL.abort``,
with the process's CUDA device set to the peer's and asynchronous error handling in its "clean up only"
mode (``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``, unless the user set another): a timed-out or aborted
collective raises in the waiting thread instead of the NCCL watchdog ending the process, so the peer
survives the loss of a neighbour like on gloo. (Not yet run on a GPU: scripts/gpu_check.py checks it.)
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from checkfree.swarm.config import TransportConfig

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64)
MAX_DIMS = 4
HEADER_LEN = 8 + MAX_DIMS
HEADER_BYTES = HEADER_LEN * 8
FRAME_SLACK = 2  # a framed message's buffer holds this many times the expected payload
KIND_CODES = {"act": 1, "grad": 2, "state": 3, "sgrad": 4, "shadow": 5}  # sgrad, shadow: redundant computation
STEP_KINDS = ("act", "grad", "sgrad")  # a training step's messages (weights and states are the other kinds)


class StageLostError(RuntimeError):
    """A peer stopped answering (crash, hang, network) while this stage was talking to it."""

    def __init__(self, stage: int | None, step: int, cause: str):
        who = f"stage {stage}" if stage is not None else "a stage"
        super().__init__(f"{who} lost at step {step}: {cause}")
        self.stage, self.step, self.cause = stage, step, cause


def _tcp_connections() -> dict[int, tuple]:
    """fd -> (local address, remote address) of this process's connected TCP sockets (Linux /proc)."""
    out = {}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in fds:
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                out[fd] = (s.getsockname(), s.getpeername())  # raises on a listening socket
        except OSError:
            pass
        finally:
            s.close()
    return out


class PeerProtocolError(ValueError):
    """A peer sent a tensor that does not match the schedule (wrong step, shape, dtype, or not finite)."""


def resolve_backend(cfg: TransportConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def _nccl_group(store, rank: int, world: int, device: torch.device, timeout: timedelta):
    """A NCCL group of this epoch, bound to this peer's GPU, whose errors raise instead of ending the process."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # read when the group is made
    torch.cuda.set_device(device)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world, opts)


class EpochGroup:
    """The process group of one membership epoch; rank ``r`` runs stage ``stage_of_rank[r]``."""

    def __init__(
        self,
        store: dist.Store,
        epoch: int,
        rank: int,
        stage_of_rank: list[int],
        cfg: TransportConfig,
        run_tag: int = 0,
        device: torch.device | str = "cpu",
        host: str | None = None,
    ):
        """``host``: the address gloo binds and announces (see ``addressing``); None: gloo's default (the
        address this machine's hostname resolves to)."""
        self.epoch, self.rank, self.cfg, self.run_tag = epoch, rank, cfg, run_tag
        self.device = torch.device(device)
        self.stage_of_rank = list(stage_of_rank)
        self.rank_of_stage = {s: r for r, s in enumerate(stage_of_rank)}
        self.timeout = timedelta(seconds=cfg.timeout_s)
        prefix = dist.PrefixStore(f"checkfree/epoch{epoch}", store)
        world = len(stage_of_rank)
        self._lock = threading.Lock()
        self.aborted: str | None = None  # why the group was aborted
        self.nccl = resolve_backend(cfg, self.device) == "nccl"
        before = {} if self.nccl else _tcp_connections()
        if self.nccl:
            self.pg = _nccl_group(prefix, rank, world, self.device, self.timeout)
        elif host is not None:
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            opts._timeout = self.timeout
            self.pg = dist.ProcessGroupGloo(prefix, rank, world, opts)
        else:
            self.pg = dist.ProcessGroupGloo(prefix, rank, world, self.timeout)
        # the group's own connections (gloo connects the full mesh while it is constructed)
        self._conns = {fd: c for fd, c in _tcp_connections().items() if before.get(fd) != c}
        self._pending: list[tuple[object, int, int, list[torch.Tensor]]] = []  # (work, stage, step, keep-alive)
        self.nonfinite_received = 0  # step messages that held NaN/inf (delivered; the commit discards the step)
        self.bytes_sent = 0  # headers and payloads this end has started to send

    @property
    def stage(self) -> int:
        return self.stage_of_rank[self.rank]

    def _tag(self, mb: int, hop: int, kind: str) -> int:
        return (KIND_CODES[kind] << 24) | (mb << 8) | hop

    def _header(self, t: torch.Tensor, step: int, mb: int, hop: int, kind: str) -> torch.Tensor:
        if t.dim() > MAX_DIMS or t.dtype not in DTYPES:
            raise ValueError(f"cannot send a tensor of {t.dim()} dims and dtype {t.dtype}")
        shape = list(t.shape) + [0] * (MAX_DIMS - t.dim())
        fields = [self.run_tag, step, mb, hop, KIND_CODES[kind], DTYPES.index(t.dtype), self.rank, t.dim(), *shape]
        return torch.tensor(fields, dtype=torch.int64, device=self.device)

    def send(self, t: torch.Tensor, dst_stage: int, step: int, mb: int, hop: int, kind: str) -> None:
        """Start sending ``t`` to ``dst_stage``; completion is awaited by ``wait_sends``."""
        dst = self.rank_of_stage[dst_stage]
        payload = t.detach().contiguous()
        header = self._header(payload, step, mb, hop, kind)
        tag = self._tag(mb, hop, kind)
        if self._framed(kind):
            messages = [torch.cat([header.view(torch.uint8), payload.view(-1).view(torch.uint8)])]
        else:
            messages = [header, payload]
        try:
            works = [self.pg.send([m], dst, tag) for m in messages]
        except RuntimeError as e:
            raise StageLostError(dst_stage, step, f"send failed: {e}") from e
        self.bytes_sent += header.nbytes + payload.nbytes
        for w in works:
            self._pending.append((w, dst_stage, step, messages))

    def _framed(self, kind: str) -> bool:
        """Whether messages of ``kind`` travel as one framed message (see the module doc)."""
        return kind in STEP_KINDS and not self.nccl

    def wait_sends(self) -> None:
        pending, self._pending = self._pending, []
        for work, stage, step, _ in pending:
            self._wait(work, stage, step, "send")

    def _wait(self, work, stage: int | None, step: int, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as e:
            if self.aborted is not None:
                raise StageLostError(None, step, f"{what}: epoch {self.epoch} aborted: {self.aborted}") from e
            raise StageLostError(stage, step, f"{what}: {e}") from e
        if ok is False:
            raise StageLostError(stage, step, f"{what} timed out after {self.cfg.timeout_s} s")

    def recv(
        self,
        src_stage: int,
        step: int,
        mb: int,
        hop: int,
        kind: str,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Receive the tensor the schedule expects from ``src_stage``, checked before use.

        Raises:
            StageLostError: the peer is gone or silent past the timeout.
            PeerProtocolError: the peer sent something else than expected.
        """
        src = self.rank_of_stage[src_stage]
        tag = self._tag(mb, hop, kind)
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if self._framed(kind):
            frame = torch.empty(HEADER_BYTES + FRAME_SLACK * nbytes, dtype=torch.uint8, device=self.device)
            self._wait(self._recv_work(frame, src, tag, src_stage, step), src_stage, step, "receive")
            header = frame[:HEADER_BYTES].view(torch.int64)
        else:
            frame = None
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            self._wait(self._recv_work(header, src, tag, src_stage, step), src_stage, step, "receive header")
        h = header.tolist()
        got_shape = tuple(h[8 : 8 + h[7]]) if 0 <= h[7] <= MAX_DIMS else None
        got_dtype = DTYPES[h[5]] if 0 <= h[5] < len(DTYPES) else None
        expected = (self.run_tag, step, mb, hop, KIND_CODES[kind])
        if tuple(h[:5]) != expected or got_shape != tuple(shape) or got_dtype != dtype:
            raise PeerProtocolError(
                f"stage {src_stage} sent run {h[0]} step {h[1]} mb {h[2]} hop {h[3]} kind {h[4]} shape {got_shape} "
                f"dtype {got_dtype}; expected run {self.run_tag} step {step} mb {mb} hop {hop} {kind} "
                f"shape {tuple(shape)} dtype {dtype}"
            )
        if frame is not None:  # a copy: the frame's slack is not kept alive with the tensor
            buf = frame[HEADER_BYTES : HEADER_BYTES + nbytes].view(dtype).view(shape).clone()
        else:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self._wait(self._recv_work(buf, src, tag, src_stage, step), src_stage, step, "receive payload")
        if buf.is_floating_point() and not torch.isfinite(buf).all():
            if kind in STEP_KINDS:
                # numbers, not a protocol breach: the step's gradients turn non-finite and its commit discards
                # it on every stage (optim.nonfinite_attempts bounds the retries); refusing it here would
                # break the epoch and redo the same step in a new one, forever
                self.nonfinite_received += 1
                return buf
            raise PeerProtocolError(f"stage {src_stage} sent a non-finite {kind} for step {step} mb {mb} hop {hop}")
        return buf

    def _recv_work(self, buf: torch.Tensor, src: int, tag: int, src_stage: int, step: int):
        try:
            return self.pg.recv([buf], src, tag)
        except RuntimeError as e:
            raise StageLostError(src_stage, step, f"receive failed: {e}") from e

    def all_reduce(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """Sum ``t`` over every stage of the epoch (the step's commit point)."""
        try:
            work = self.pg.allreduce([t])
        except RuntimeError as e:
            raise StageLostError(None, step, f"all-reduce failed: {e}") from e
        self._wait(work, None, step, "all-reduce")
        return t

    def send_state(self, tensors: list[torch.Tensor], dst_stage: int, step: int, kind: str = "state") -> None:
        """Send a list of tensors (a state dict's values in key order) and wait for delivery."""
        for i, t in enumerate(tensors):
            self.send(t, dst_stage, step, mb=i, hop=self.stage, kind=kind)
        self.wait_sends()

    def recv_state(
        self, like: list[torch.Tensor], src_stage: int, step: int, kind: str = "state"
    ) -> list[torch.Tensor]:
        """Receive tensors shaped like ``like`` from ``src_stage`` (each checked like any message)."""
        return [self.recv(src_stage, step, i, src_stage, kind, tuple(t.shape), t.dtype) for i, t in enumerate(like)]

    def abort(self, reason: str) -> bool:
        """Fail every pending and future operation of this group now (thread-safe; see the module doc).
        Returns False when the group was already aborted or closed."""
        with self._lock:
            if self.pg is None or self.aborted is not None:
                return False
            self.aborted = reason
            if self.nccl:
                self.pg.abort()  # every pending and future work of the group fails; the watchdog never kills us
                return True
            live = _tcp_connections()
            for fd, conn in self._conns.items():
                if live.get(fd) != conn:
                    continue  # closed already, and the number may belong to another socket now
                try:
                    s = socket.socket(fileno=os.dup(fd))
                except OSError:
                    continue
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                finally:
                    s.close()
            return True

    def close(self) -> None:
        """Drop this epoch's group; its connections close, so peers still waiting on us fail fast."""
        with self._lock:
            self._pending.clear()
            self._conns = {}
            if self.nccl and self.pg is not None and self.aborted is None:
                self.pg.abort()  # NCCL frees its communicators only when told (its shutdown may wait on peers)
            self.pg = None
