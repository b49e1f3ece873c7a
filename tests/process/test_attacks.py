"""The attacks of a stranger on the ports and of a replayed run, all at once, against one training swarm with
failures off, from this test process:

- a flood at every stage peer's probe port: idle and trickling connections and 200 knocks a second;
- connect-and-close, over and over, on every port the stage peers listen on (gloo's listeners among them);
- clients trickling one byte at a time into the leader's rendezvous gate;
- an insider of another run: the swarm's own token (a reused exported token) but another swarm id, heartbeating
  and publishing a stop record at the next epoch.

The swarm trains to the end: every step committed once, no epoch lists a lost stage, nobody replaced; the
peers counted what reached them (knocks limited, foreign records) in their counters."""

import socket
import threading
import time

import pytest

from checkfree.core.metrics import read_jsonl
from tests.helpers import check_every_step_once, kill_groups, poll, run_swarm, spawned_pids

# ~45 s: each attack also has a default-run test of its own part (tests/integration: test_gate's handshake
# deadline, test_slow_clients' floods, test_gloo_listener's 2000 connect-and-closes, test_membership's foreign
# records), and the soak lands floods beside failures; keeps the default run well under 15 minutes
pytestmark = [pytest.mark.process, pytest.mark.slow, pytest.mark.long]


class ConnectClose:
    """Connect and close at once, round after round, on every address given (what leaked a descriptor per
    attempt in a gloo listener)."""

    def __init__(self, addresses: list[tuple[str, int]], per_s: float):
        self.addresses, self.per_s, self.done, self.stop = addresses, per_s, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for address in self.addresses:
                try:
                    socket.create_connection(address, timeout=0.5).close()
                    self.done += 1
                except OSError:
                    pass
            self.stop.wait(len(self.addresses) / self.per_s)


class Trickle:
    """``n`` clients that send one byte every ``every_s`` and never finish their handshake."""

    def __init__(self, address: tuple[str, int], n: int, every_s: float):
        self.address, self.n, self.every_s, self.stop = address, n, every_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conns: list[socket.socket] = []
        try:
            while not self.stop.is_set():
                conns = [c for c in conns if self._poke(c)]
                while len(conns) < self.n:
                    try:
                        conns.append(socket.create_connection(self.address, timeout=0.5))
                    except OSError:
                        break
                self.stop.wait(self.every_s)
        finally:
            for c in conns:
                c.close()

    @staticmethod
    def _poke(c: socket.socket) -> bool:
        try:
            c.send(b"\x00")
            return True
        except OSError:
            c.close()
            return False


def _listening(pid: int) -> list[tuple[str, int]]:
    import psutil

    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return []
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def test_every_attack_at_once_leaves_the_swarm_training(tmp_path):
    from checkfree.swarm.admission import Admission, Identity, new_swarm_id
    from checkfree.swarm.config import MembershipConfig
    from checkfree.swarm.membership import Membership
    from checkfree.swarm.records import EpochRecord, MemberRecord
    from launcher.effects import ProbeFlood

    steps = 200
    proc = run_swarm(tmp_path, "attacked", f"num_steps={steps}", "swarm.num_spares=1", background=True)
    run_dir = tmp_path / "attacked"
    effects, insider, observer = [], None, None
    try:
        deadline = time.monotonic() + 90
        while not list((run_dir / "peers").glob("*/metrics.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.2)
        token = (run_dir / "join_token").read_text().strip()
        swarm_id = (run_dir / "swarm_id").read_text().strip()
        maddrs = (run_dir / "maddrs.txt").read_text().split()
        cfg = MembershipConfig(period_s=0.5, ttl_s=3.0)
        observer = Membership(cfg, "attacked", None, maddrs, admission=Admission(token, Identity("obs"), swarm_id))

        def seen():
            members = observer.members()
            epochs = [observer.current_epoch(f) for f in {r.fingerprint for r in members.values()}]
            epochs = [e for e in epochs if e is not None]
            return (members, max(epochs, key=lambda e: e.epoch)) if epochs else None

        members, current = poll(seen, timeout_s=20, every_s=0.5) or (None, None)
        assert current is not None, "the observer saw no epoch"
        stage_peers = [r for r in members.values() if r.peer_id in current.roster]
        # strangers on the ports
        for r in stage_peers:
            effects.append(ProbeFlood(("127.0.0.1", r.probe_port), 200, 200.0, 12.0).start())
        ports = [a for pid in spawned_pids(run_dir) for a in _listening(pid)]
        effects.append(ConnectClose([("127.0.0.1", port) for _, port in ports], per_s=100.0))
        effects.append(Trickle((current.store_host, current.store_port), 50, 0.5))
        # an insider of another run: this swarm's token, another swarm's id
        other = Admission(token, Identity("insider"), new_swarm_id())
        insider = Membership(cfg, "attacked", current.fingerprint, maddrs, admission=other)
        me = other.peer_id
        for _ in range(20):
            insider.heartbeat(
                MemberRecord(
                    run_id="attacked",
                    fingerprint=current.fingerprint,
                    peer_id=me,
                    stage=-1,
                    epoch=-1,
                    state="spare",
                    step=0,
                )
            )
            stop = EpochRecord(
                run_id="attacked",
                fingerprint=current.fingerprint,
                epoch=current.epoch + 1,
                roster=[],
                store_host="",
                store_port=0,
                step=0,
                leader=me,
                stop="replayed from another run",
            )
            insider.publish_epoch(stop)
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=300)
    finally:
        for e in effects:
            if isinstance(e, ProbeFlood):
                e.stop()
                e.join(10)
            else:
                e.stop.set()
                e.thread.join(10)
        for m in (insider, observer):
            if m is not None:
                m.shutdown()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        kill_groups(spawned_pids(run_dir))
    assert proc.returncode == 0, out[-3000:]
    summary, _ = check_every_step_once(run_dir, steps)
    events = read_jsonl(run_dir / "events.jsonl")
    published = [e for e in events if e["event"] == "epoch_published"]
    assert [e["lost"] for e in published if e["lost"]] == [] and not any(e.get("stop") for e in published)
    assert [e for e in events if e["event"] in ("replaced", "swarm_stopped")] == []
    assert summary["attacks"]["num_healthy_evictions"] == 0
    counters = summary["attacks"]["counters"]
    assert counters.get("knocks", 0) >= 200 and counters.get("records_foreign", 0) > 0, counters
    connect_close = next(e for e in effects if isinstance(e, ConnectClose))
    assert connect_close.done >= 500, connect_close.done  # each peer's listeners were hit hundreds of times
    print(f"\nattacks: {connect_close.done} connect-and-close, counters {counters}")
