"""
Local swarm
===========

``checkfree swarm``: every stage peer and spare as a separate OS process on this machine, plus this
launcher, which bootstraps the DHT, shows a live status line, injects failures (SIGKILL, or SIGSTOP for a
hang) into the peer that holds a stage, starts a fresh spare a while after each kill (a new spot instance
arriving), and at the end merges every peer's events and metrics into the run directory and computes
each recovery's detect / rebuild / resume seconds.

The launcher is not a coordinator: the peers elect their leader and recover among themselves; the
launcher's DHT node is only a bootstrap address and an observer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from checkfree.config import TrainConfig, to_yaml
from checkfree.core.devices import cuda_count, peer_device
from checkfree.core.events import EventLog
from checkfree.core.exit_codes import ExitCode
from checkfree.core.failures import Failure, FailureInjector, write_trace
from checkfree.core.metrics import read_jsonl
from checkfree.swarm.admission import (
    KEY_ENV,
    SWARM_ENV,
    TOKEN_ENV,
    Admission,
    Identity,
    find_token,
    new_swarm_id,
    new_token,
    write_swarm_id,
    write_token,
)
from checkfree.swarm.config import config_fingerprint
from checkfree.swarm.injection import LINK_DOWN, read_marker
from checkfree.swarm.membership import DHTUnavailable, Membership
from launcher.chaos import Chaos, Effects
from launcher.netns import Host, Hosts
from launcher.report import count_recoveries, merge_run
from launcher.status import LiveStatus

logger = logging.getLogger(__name__)

VANISHED = LINK_DOWN  # a failure's "signal" when its host's link was cut instead (swarm.vanish_fraction)


def advance_iterations(last_seen_step: int, iteration: int, step: int) -> tuple[int, int, int]:
    """Iterations are committed steps as the launcher observes them, redone steps included (as in the
    engine, work redone after a checkpoint rollback is exposed to failures again); steps it polled past
    are drawn too. Returns (new last seen step, first new iteration, last new iteration): no new
    iteration when first > last."""
    if step < last_seen_step:  # rolled back: the steps up to the old one will be run, and exposed, again
        return step, iteration + 1, iteration
    return step, iteration + 1, iteration + (step - last_seen_step)


def next_batch(queued: list[Failure]) -> tuple[list[Failure], list[Failure]]:
    """(the queued failures of the earliest drawn iteration, the rest). Failures of one iteration land
    together, as in the engine; a later iteration's wait until the swarm has recovered and
    ``swarm.min_gap_s`` has passed, so that failures drawn while the swarm recovered (or between two polls)
    are not turned into simultaneous ones."""
    if not queued:
        return [], []
    first = min(f.iteration for f in queued)
    return [f for f in queued if f.iteration == first], [f for f in queued if f.iteration != first]


class LocalSwarm:
    def __init__(self, cfg: TrainConfig, run_dir: Path, status: bool = True):
        self.cfg, self.run_dir, self.show_status = cfg, Path(run_dir), status
        self.run_id = cfg.swarm.run_id or cfg.run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.run_dir / "config.yaml"
        peer_cfg = cfg
        if not cfg.num_threads:
            # every peer of this machine shares its cores: oversubscribed intra-op threads slow each step ~7x
            peer_cfg = dataclasses.replace(cfg, num_threads=max(1, (os.cpu_count() or 1) // cfg.model.num_stages))
        self.config_path.write_text(to_yaml(peer_cfg))
        self.events = EventLog(self.run_dir / "launcher-events.jsonl")
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopped: set[str] = set()  # peers frozen with SIGSTOP, killed once replaced
        self.killed: set[str] = set()  # peers the injector failed
        self.crashed: set[str] = set()  # peers that exited with an error on their own
        self.injector = FailureInjector(cfg.failures, cfg.model.num_stages)
        self.rng = random.Random(cfg.failures.seed)
        self.pending_spares: list[float] = []  # times at which to start a spare
        self.queued: list[Failure] = []  # failures drawn, not injected yet (see next_batch)
        self.met: list[Failure] = []  # failures injected (by us or, swarm.inject=peer, by the peers themselves)
        self.dropped: list[Failure] = []  # inject=launcher: drawn for a peer that was gone when its turn came
        self.last_seen_step = -1  # the swarm's step when failures were last drawn
        self.iteration = -1  # the last iteration failures were drawn for
        self.kill_epoch = -1
        self.counter = 0
        self.live_status = LiveStatus(cfg.num_steps)
        self.stop_signal: str | None = None  # the signal that asked the swarm to stop (``request_stop``)
        self.signalled: set[str] = set()  # peers sent SIGINT to stop (each once)
        self.chaos = (
            Chaos(cfg.swarm.chaos, cfg.model.num_stages, self.run_dir / "peers", cfg.membership.hang_s)
            if cfg.swarm.chaos.events
            else None
        )
        self.effects = Effects(cfg.swarm.chaos)  # chaos's benign kinds under way (floods, starvations)
        self.gpus = cuda_count()
        for k in range(max(1, len(cfg.swarm.devices))):
            self.device_of(k)  # a device this host does not have is refused before anything starts
        self.hosts: Hosts | None = None
        self.host_of: dict[str, Host] = {}  # peer id -> the emulated host it runs on (swarm.hosts=netns)
        membership_cfg = cfg.membership
        if cfg.swarm.hosts == "netns":
            # the launcher is the host at the bridge's address; every peer gets a host of its own
            self.hosts = Hosts(f"cf{os.getpid() % 10000:04d}", cfg.swarm.host_rate_mbit)
            membership_cfg = dataclasses.replace(cfg.membership, host=self.hosts.gateway, announce_host=None)
        # the swarm's secret: from $CHECKFREE_JOIN_TOKEN, else new; handed to every peer through its environment,
        # never on a command line (other users can read those) nor in a log
        self.token = find_token(None, self.run_dir) or new_token()
        self.token_path = write_token(self.run_dir, self.token)
        # a new swarm, a new id (whatever swarm ran in this directory before): no record of another run passes
        self.swarm_id = new_swarm_id()
        write_swarm_id(self.run_dir, self.swarm_id)
        try:
            self.membership = Membership(
                membership_cfg,
                self.run_id,
                config_fingerprint(cfg),
                admission=Admission(self.token, Identity("launcher"), self.swarm_id),
            )
        except BaseException:
            if self.hosts is not None:
                self.hosts.close()
            raise
        self.maddrs = self.membership.visible_maddrs()
        # how to reach this swarm from elsewhere: checkfree peer ... --initial-peers $(cat RUN_DIR/maddrs.txt)
        (self.run_dir / "maddrs.txt").write_text(" ".join(self.maddrs) + "\n")
        if status:
            # the token itself only on a terminal: a redirected stderr is a log, and logs never hold it
            shown = self.token if sys.stderr.isatty() else f"in {self.token_path} (mode 0600)"
            print(
                f"join token: {shown}\nswarm id: {self.swarm_id}\nother hosts join with: {TOKEN_ENV}=... "
                f"{SWARM_ENV}={self.swarm_id} checkfree peer {self.config_path} "
                f"--initial-peers $(cat {self.run_dir / 'maddrs.txt'}) --spare",
                file=sys.stderr,
            )

    def device_of(self, k: int) -> str:
        """The device of the k-th peer started (spares included): ``swarm.devices`` in turn, else with
        ``device=cuda`` every visible GPU in turn (``checkfree.core.devices.peer_device``)."""
        return peer_device(self.cfg.device, list(self.cfg.swarm.devices), k, self.gpus)

    def _start(self, stage: int | None) -> str:
        self.counter += 1
        # the launcher makes each peer's key, so that it knows the peer's id (NAME.HASH) before the peer starts
        identity = Identity(f"{'s' + str(stage) if stage is not None else 'spare'}-{self.counter:02d}")
        peer_id = identity.peer_id
        args = [
            sys.executable,
            "-m",
            "checkfree",
            "peer",
            str(self.config_path),
            "--run-dir",
            str(self.run_dir),
            "--peer-id",
            identity.name,
            "--parent-pid",
            str(os.getpid()),
            "--initial-peers",
            *self.maddrs,
        ]
        args += ["--stage", str(stage)] if stage is not None else ["--spare"]
        args += ["--device", self.device_of(self.counter - 1)]
        if self.cfg.swarm.inject == "peer" and self.cfg.failures.mode != "none" and self.chaos is None:
            args.append("--inject-failures")  # the peers draw the run's failures and die at their own
        if self.hosts is not None:  # on a host of its own, listening on that host's address
            host = self.host_of[peer_id] = self.hosts.add()
            where = args.index(str(self.config_path)) + 1
            args[where:where] = [f"membership.host={host.address}", "membership.announce_host=null"]
            args = [*host.exec_prefix(), *args]
        (self.run_dir / "peers").mkdir(parents=True, exist_ok=True)
        log = open(self.run_dir / "peers" / f"{peer_id}.log", "w")
        # its own session: the launcher can end the peer's whole process group (DHT, p2pd) by PID
        env = {**os.environ, TOKEN_ENV: self.token, SWARM_ENV: self.swarm_id, KEY_ENV: identity.seed_hex()}
        self.procs[peer_id] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        log.close()
        self.events.emit("peer_spawned", peer=peer_id, stage=stage, pid=self.procs[peer_id].pid)
        return peer_id

    def request_stop(self, signal_name: str) -> None:
        """From a signal handler (Ctrl-C, SIGTERM): every peer stops at a step boundary and saves its stage, then
        the report and the weights are written; the same command continues the run (``resume=auto``)."""
        if self.stop_signal is None:
            self.stop_signal = signal_name
            self._signal_peers(signal.SIGINT)  # at once: a toy swarm runs hundreds of steps in the main loop's poll

    def run(self) -> ExitCode:
        cfg = self.cfg
        t0, started = time.time(), time.monotonic()
        for s in range(cfg.model.num_stages):
            self._start(s)
        for _ in range(cfg.swarm.num_spares):
            self._start(None)
        code, last_status, current = ExitCode.CRASHED, 0.0, None
        try:
            members, last_read = {}, 0.0
            while True:
                # an armed chaos trigger watches the peers' events closely; the DHT is read every 0.5 s at most
                # (the members' records change no faster than membership.period_s)
                time.sleep(0.02 if self.chaos is not None and self.chaos.armed else 0.2)
                if self.stop_signal is not None:  # before any DHT read: a terminal's Ctrl-C may have ended our DHT
                    print(f"\n{self.stop_signal}: every peer stops at a step boundary and saves", file=sys.stderr)
                    code = ExitCode.INTERRUPTED
                    self._stop_peers()
                    break
                if time.monotonic() - last_read >= min(cfg.membership.period_s, 0.5):
                    try:
                        members, newest = self.membership.members_and_epoch()
                        # the newest epoch seen: once every peer has exited nobody re-stores the record, and
                        # it expires (membership.epoch_ttl_s)
                        current = newest or current
                        last_read = time.monotonic()
                    except DHTUnavailable as e:  # transient: the peers go on; look again at the next poll
                        logger.warning("launcher: DHT read failed: %s", e)
                        continue
                now = time.time()
                if current is not None and current.stop:
                    print(f"\nswarm stopped: {current.stop}", file=sys.stderr)
                    code = ExitCode.SWARM_STOPPED
                    # every live peer reads the stop record and exits saying why; end them only after that
                    grace = time.monotonic() + 10
                    while time.monotonic() < grace and any(
                        p.poll() is None for pid, p in self.procs.items() if pid not in self.stopped
                    ):
                        time.sleep(0.2)
                    break
                if self._finished(members, current):
                    code = ExitCode.OK
                    break
                if time.monotonic() - started > cfg.swarm.run_timeout_s:
                    print(f"\nswarm.run_timeout_s={cfg.swarm.run_timeout_s} s reached; stopping", file=sys.stderr)
                    code = ExitCode.TIMED_OUT
                    break
                self._reap_replaced(current)
                if cfg.swarm.inject == "peer":
                    self._own_failures(current, now)  # before _replace_crashed: such a death is no crash
                refused = self._replace_crashed(now)
                if refused is not None:
                    print(f"\n{refused}", file=sys.stderr)
                    code = ExitCode.BAD_INPUT
                    break
                if self.chaos is not None:
                    self._chaos(members, current, now)
                elif cfg.swarm.inject == "launcher":
                    self._inject(members, current, now)
                while self.pending_spares and self.pending_spares[0] <= now:
                    self.pending_spares.pop(0)
                    self._start(None)
                if self.show_status and now - last_status >= cfg.swarm.status_interval_s:
                    last_status = now
                    self._status(members, current, now - t0)
        except KeyboardInterrupt:  # a second signal, or one not routed to ``request_stop``: no waiting
            print("\ninterrupted: ending every peer at once", file=sys.stderr)
            code = ExitCode.INTERRUPTED
        finally:
            self._shutdown()
        summary = self._report(code, time.time() - t0)
        if code == ExitCode.OK and summary["steps"] < cfg.num_steps:
            return ExitCode.INCOMPLETE
        return code

    def _finished(self, members, current) -> bool:
        """Done once a stage reported the last step and every peer of the final roster has exited."""
        if current is None:
            return False
        done = any(r.state == "done" for r in members.values()) or any(
            (self.run_dir / "peers" / pid / "done").exists() for pid in current.roster
        )
        return done and all(self.procs[pid].poll() is not None for pid in current.roster if pid in self.procs)

    def _inject(self, members, current, now: float) -> None:
        cfg = self.cfg
        if cfg.failures.mode == "none" or current is None or current.epoch <= self.kill_epoch:
            return
        roster = current.roster
        healthy = all(
            pid in members and members[pid].state == "running" and members[pid].epoch == current.epoch for pid in roster
        )
        if not healthy or (current.epoch > 0 and now - current.time < cfg.swarm.min_gap_s):
            return  # min_gap_s counts from the last resume; the first epoch resumes nothing
        step = max(members[pid].step for pid in roster)
        if step >= cfg.num_steps - 1:
            return
        self.last_seen_step, first, self.iteration = advance_iterations(self.last_seen_step, self.iteration, step)
        if first <= self.iteration:
            mean_step_s = None
            rates = [members[pid].tokens_per_s for pid in roster if members[pid].tokens_per_s]
            if rates:
                mean_step_s = cfg.data.microbatch_size * cfg.model.seq_len * cfg.pipeline.num_microbatches / min(rates)
            self.queued += [
                f for it in range(first, self.iteration + 1) for f in self.injector.failures_at(it, mean_step_s)
            ]
        batch, self.queued = next_batch(self.queued)
        for f in batch:
            pid = roster[f.stage]
            proc = self.procs.get(pid)
            if proc is None or proc.poll() is not None:
                self.dropped.append(f)  # not ours to kill, or already gone
                continue
            if pid in self.host_of and self.rng.random() < cfg.swarm.vanish_fraction:
                # its host vanishes: the link goes down, no TCP reset; the process is ended once replaced
                self.hosts.cut(self.host_of[pid])
                how = VANISHED
                self.stopped.add(pid)
            else:
                sig = signal.SIGSTOP if self.rng.random() < cfg.swarm.hang_fraction else signal.SIGKILL
                os.kill(proc.pid, sig)
                how = sig.name
                if sig == signal.SIGSTOP:
                    self.stopped.add(pid)
            self.killed.add(pid)
            self.kill_epoch = current.epoch
            self.events.emit(
                "failure",
                stage=f.stage,
                peer=pid,
                pid=proc.pid,
                signal=how,
                step=step,
                epoch=current.epoch,
                iteration=f.iteration,
                phase=f.phase,
                at=f.at,
                injected_by="launcher",
                # drawn for an iteration the swarm had passed when it could be injected (recovery, min_gap_s)
                delay_iterations=self.iteration - f.iteration,
            )
            self.met.append(f)
            self._replace(now)

    def _own_failures(self, current, now: float) -> None:
        """swarm.inject=peer: log the failures peers injected into themselves (``swarm.injection``), cut the
        link of a vanishing one's host, and bring a new machine as for a kill of ours."""
        for pid, proc in self.procs.items():
            if pid in self.killed or pid in self.crashed:
                continue
            marker = read_marker(self.run_dir / "peers" / pid)
            if marker is None:
                continue
            how = marker["signal"]
            if how == LINK_DOWN and pid in self.host_of:
                self.hosts.cut(self.host_of[pid])
            if how != signal.SIGKILL.name:
                self.stopped.add(pid)  # frozen (or cut off): ended once the swarm replaced it
            self.killed.add(pid)
            self.events.emit(
                "failure",
                stage=marker["stage"],
                peer=pid,
                pid=proc.pid,
                signal=how,
                step=marker["step"],
                epoch=current.epoch if current is not None else -1,
                iteration=marker["iteration"],
                phase=marker["phase"],
                at=marker["at"],
                injected_by="peer",
                delay_iterations=0,
                time=marker.get("time", time.time()),  # the moment it died (detection is timed from it)
            )
            self.met.append(Failure(marker["iteration"], marker["stage"], marker["phase"], marker["at"]))
            self._replace(now)

    def _replace(self, now: float) -> None:
        """A machine was lost: a new one (a spare) arrives after ``swarm.spare_delay_s``, as a provider's
        autoscaler would bring the fleet back to its size (the stages plus ``swarm.num_spares``), never above
        it: a fleet that grew with every replacement of a replacement would bury a small machine."""
        cfg = self.cfg
        gone = self.stopped | self.killed  # a killed process may not be reaped yet
        live = sum(1 for pid, p in self.procs.items() if p.poll() is None and pid not in gone)
        if live + len(self.pending_spares) < cfg.model.num_stages + cfg.swarm.num_spares:
            self.pending_spares.append(now + cfg.swarm.spare_delay_s)

    def _chaos(self, members, current, now: float) -> None:
        live = {pid for pid, p in self.procs.items() if p.poll() is None and pid not in self.stopped}
        action = self.chaos.poll(time.monotonic(), members, current, live)
        if action is None:
            return
        if action.benign:
            self._benign(action)
            return
        # spares: live peers outside the roster (the launcher's own count; its DHT view may be partial)
        roster = set(current.roster) if current is not None else set()
        waiting = sum(1 for pid in live if pid not in roster)
        started = action.spares if waiting < 2 * self.cfg.swarm.num_spares else 0
        for _ in range(started):
            self._start(None)  # spare_arrival, up to twice the configured spares waiting
        epoch, roster, step = action.epoch or (
            (current.epoch, current.roster, current.step) if current is not None else (-1, [], 0)
        )
        for pid in action.victims:
            proc = self.procs[pid]
            self.effects.hold(proc)  # a pulse under way never continues a peer hung (nor signals one killed)
            os.kill(proc.pid, action.sig)
            self.killed.add(pid)
            if action.sig == signal.SIGSTOP:
                self.stopped.add(pid)
            if pid in roster:
                rec = members.get(pid)
                self.events.emit(
                    "failure",
                    stage=roster.index(pid),
                    peer=pid,
                    pid=proc.pid,
                    signal=action.sig.name,
                    step=max(step, rec.step if rec else step),
                    epoch=epoch,
                    iteration=-1,
                    kind=action.kind,
                )
        for _ in action.victims:
            self._replace(now)  # a new machine for each lost one, up to the fleet's size
        self.events.emit("chaos", kind=action.kind, peers=action.victims, signal=action.sig.name, spares=started)

    def _benign(self, action) -> None:
        """A probe flood or a starvation: no failure, nothing to replace; carried out in the background."""
        nets = [self.hosts.net] if self.hosts is not None else []
        try:
            self.effects.start(action, [self.procs[pid] for pid in action.victims], nets)
        except ValueError as e:  # an address chaos may not flood
            logger.warning("launcher: chaos %s skipped: %s", action.kind, e)
            return
        self.events.emit(
            "chaos",
            kind=action.kind,
            peers=action.victims,
            signal=action.sig.name if action.sig else "none",
            spares=0,
            benign=True,
            duration_s=action.duration_s,
            target=action.target,
            pulses=action.pulses,
            busy_s=action.busy_s,
        )

    def _replace_crashed(self, now: float) -> str | None:
        """A peer that died on its own (not by the injector) is a lost machine too: a new one arrives. A peer
        that refused its input (exit code BAD_INPUT) is not replaced: every replacement would refuse it too.
        Returns why the swarm must stop then (the peer's last log line), else None."""
        for pid, p in list(self.procs.items()):
            if p.poll() not in (None, 0) and pid not in self.crashed and pid not in self.killed:
                if read_marker(self.run_dir / "peers" / pid) is not None:
                    continue  # it died at its own drawn failure: _own_failures logs and replaces it
                self.crashed.add(pid)
                self.events.emit("peer_exited", peer=pid, returncode=p.returncode)
                if p.returncode == ExitCode.BAD_INPUT:
                    log = self.run_dir / "peers" / f"{pid}.log"
                    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                    return f"peer {pid} refused its input: {lines[-1] if lines else '(no output)'} (see {log})"
                self._replace(now)
        return None

    def _reap_replaced(self, current) -> None:
        """A frozen peer stays frozen; once the swarm has replaced it, end it as its provider would."""
        if current is None:
            return
        for pid in list(self.stopped):
            if pid not in current.roster:
                self._kill_group(self.procs[pid])
                self.stopped.discard(pid)
                self.events.emit("reaped", peer=pid)

    def _status(self, members, current, elapsed: float) -> None:
        kills = sum(1 for e in read_jsonl(self.events.path) if e["event"] == "failure")
        # counted as summary.json counts them (losses whose new peer resumed training), so both agree
        line = self.live_status(members, current, elapsed, len(self.procs), kills, count_recoveries(self.run_dir))
        print("\r" + line, end="", file=sys.stderr, flush=True)

    def _signal_peers(self, sig: signal.Signals) -> None:
        """Send ``sig`` once to every live peer not signalled yet (a second SIGINT would abort a peer's stop)."""
        for pid, p in list(self.procs.items()):
            if p.poll() is None and pid not in self.stopped and pid not in self.signalled:
                self.signalled.add(pid)
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def _stop_peers(self) -> None:
        """Ask every live peer to stop at a step boundary and save its stage (SIGINT, as a Ctrl-C on
        ``checkfree peer``), and wait for them; ``_shutdown`` ends whatever is left."""
        self._signal_peers(signal.SIGINT)  # the peers started since (a spare arriving)
        # a step boundary comes within a step, a stalled step within the transport's timeout
        deadline = time.monotonic() + self.cfg.transport.timeout_s + 10
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def _shutdown(self) -> None:
        self.effects.close()  # floods close their sockets, starved peers are continued, busy loops end
        for pid, p in self.procs.items():
            if p.poll() is None:
                if pid in self.stopped:
                    self._kill_group(p)
                else:
                    p.terminate()  # peers tombstone and exit on SIGTERM
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():  # whatever is left of each peer's group (DHT process, p2pd)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if p.poll() is None:
                p.wait(timeout=10)
        self.membership.shutdown()
        if self.hosts is not None:
            self.hosts.close()  # whatever still runs on a host is killed with it
        if self.show_status:
            print(file=sys.stderr)

    def _report(self, code: int, wall_s: float) -> dict:
        # the failures the swarm met (replayable by the engine); with inject=launcher, also what it could not
        # inject in time: drawn and still queued at the end, or dropped because the victim was already gone
        write_trace(self.run_dir / "trace.jsonl", self.met, self.cfg.model.num_stages)
        self.events.close()
        summary = merge_run(self.run_dir, self.cfg)
        delays = [e.get("delay_iterations", 0) for e in read_jsonl(self.events.path) if e["event"] == "failure"]
        summary.update(
            exit_code=int(code),
            wall_s=wall_s,
            exit_codes={p: pr.returncode for p, pr in self.procs.items()},
            failure_injection=self.cfg.swarm.inject,
            failures_met=len(self.met),
            failures_not_injected=len(self.queued) + len(self.dropped),
            failures_delayed=sum(1 for d in delays if d),
            failure_delay_iterations_max=max(delays, default=0),
            **weights_summary(self.run_dir),
        )
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def weights_summary(run_dir: Path) -> dict:
    """Join the stage parts the peers wrote (at the end of the run, or when they stopped on a signal) into
    ``RUN_DIR/model.safetensors``; the summary's fields about it. Parts missing or at different steps (a stage
    lost since its holder wrote, a peer killed) are said instead: ``weights`` None and ``weights_note`` why."""
    from checkfree.core.weights import INFO_FILE, WeightsError, assemble_parts

    try:
        path = assemble_parts(run_dir)
    except (WeightsError, OSError) as e:
        print(f"\nno model.safetensors: {e}", file=sys.stderr)
        return {"weights": None, "weights_step": None, "weights_note": str(e)}
    info = json.loads(path.with_name(INFO_FILE).read_text())
    return {"weights": str(path), "weights_step": info["step"], "weights_note": None}


def run_local_swarm(cfg: TrainConfig, run_dir: Path, status: bool = True) -> tuple[int, dict]:
    swarm = LocalSwarm(cfg, run_dir, status)
    code = swarm.run()
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return code, summary
