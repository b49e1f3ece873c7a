"""The swarm protocol as a Hypothesis state machine: a few simulated peers and spares (``tests/model_sim``)
crash, freeze, thaw, split and heal, see stale DHT views and old epoch records, answer probes late, and
train full or partial commits, while the real ``Leader.step``, ``View`` and ``decide_epoch`` decide the
epochs. After every rule: one roster per epoch number, one holder per stage and epoch, no committed step
skipped or redone (a rebuild or rollback resets a stage explicitly), every trainer's lineage valid for the
epoch's step, no peer that answers its probes declared lost; and a calm network recovers in bounded rounds.
The combinations that break a property on the real code (old epoch records, a split before the first epoch,
a missing record with a late probe, two gaps in one view) are kept out of the machine and pinned as strict
xfails at the end, each the shortest sequence found. Run with ``-s`` to see how much was explored."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from checkfree.swarm.records import EpochRecord, MemberRecord
from tests.model_sim import Swarm, quiet_leader

MAX_SPARES = 3
LIVENESS_ROUNDS = 12  # calm rounds (a tick, aborts, leader rounds, joins) within which the swarm must train

STOPS: dict[str, int] = {}  # why swarms stopped (the start of the reason), over every example
STATS = {"examples": 0, "steps": 0, "commits": 0, "epochs": 0, "recoveries": 0}


class ProtocolModel(RuleBasedStateMachine):
    strategy = "checkfree_plus"
    num_stages = 4
    # old epoch records fed as the newest: off here, they break the one-roster-per-epoch property (the bug of
    # test_a_peer_that_joined_a_newer_epoch_never_leads_on_an_older_record and the test after it)
    replays = False

    def __init__(self):
        super().__init__()
        self._quiet = quiet_leader()
        self._quiet.__enter__()
        self.swarm = Swarm(self.num_stages, self.strategy)
        self.stale_used = False
        STATS["examples"] += 1

    @initialize(n=st.integers(0, 2))
    def spares_at_start(self, n):
        for i in range(n):
            self.swarm.add(f"s{i}", stage=-1, state="spare")

    def teardown(self):
        STATS["commits"] += self.swarm.commits
        STATS["epochs"] += len(self.swarm.published)
        STATS["recoveries"] += sum(bool(rec.lost) for rec, _, _ in self.swarm.published)
        self._quiet.__exit__(None, None, None)

    def _after(self) -> None:
        STATS["steps"] += 1
        self.swarm.sync()
        self.swarm.check()

    def _pick(self, data, which) -> str | None:
        pids = sorted(p.pid for p in self.swarm.peers.values() if which(p))
        return data.draw(st.sampled_from(pids)) if pids else None

    # ---- what happens to the swarm ---------------------------------------------------------------
    @rule(dt=st.sampled_from([0.3, 1.0, 2.5]))
    def tick(self, dt):
        self.swarm.tick(dt)
        self._after()

    @rule(data=st.data())
    def train_step(self, data):
        swarm = self.swarm
        if swarm.trainers() is None:
            return
        if data.draw(st.booleans()):
            swarm.train()
        else:  # the commit point reached by some stages only: the others hold the step's gradients
            committed = data.draw(st.sets(st.integers(0, self.num_stages - 1), max_size=self.num_stages - 1))
            swarm.train(committed)
        self._after()

    @rule(data=st.data())
    def crash(self, data):
        pid = self._pick(data, lambda p: not p.crashed)
        if pid is not None:
            self.swarm.peers[pid].crashed = True
        self._after()

    @rule(data=st.data())
    def freeze(self, data):
        pid = self._pick(data, lambda p: p.up)
        if pid is not None:
            peer = self.swarm.peers[pid]
            peer.frozen, peer.frozen_since = True, self.swarm.clock.t
        self._after()

    @rule(data=st.data())
    def thaw(self, data):
        pid = self._pick(data, lambda p: p.frozen and not p.crashed)
        if pid is not None:
            peer = self.swarm.peers[pid]
            peer.frozen = False
            self.swarm.store(peer)  # it heartbeats at once on resuming
        self._after()

    # a split before the first epoch is the known bug of test_a_split_before_the_first_epoch_forms_two_epochs_0
    @precondition(lambda self: self.swarm.published)
    @rule(data=st.data())
    def partition(self, data):
        pids = sorted(self.swarm.peers)
        far = data.draw(st.sets(st.sampled_from(pids), min_size=1, max_size=len(pids) - 1))
        self.swarm.heal()
        self.swarm.partition(far)
        self._after()

    @precondition(lambda self: self.swarm.published)
    @rule(data=st.data(), rounds=st.integers(1, 6))
    def rounds_while_split(self, data, rounds):
        """A split that lasts: both sides tick, abort their broken steps and run leader rounds."""
        swarm = self.swarm
        pids = sorted(swarm.peers)
        far = data.draw(st.sets(st.sampled_from(pids), min_size=1, max_size=len(pids) - 1))
        swarm.heal()
        swarm.partition(far)
        for _ in range(rounds):
            swarm.tick(1.0)
            for peer in swarm.peers.values():
                if peer.up and peer.rec.state == "running" and swarm.broken(peer):
                    swarm.update(peer, state="recovering")
            swarm.leader_round(0)
            swarm.leader_round(1)
            swarm.sync()
            swarm.check()
        self._after()

    @rule()
    def heal(self):
        self.swarm.heal()
        self._after()

    @precondition(lambda self: sum(p.pid.startswith("s") for p in self.swarm.peers.values()) < MAX_SPARES)
    @rule(side=st.sampled_from([0, 0, 1]))
    def spare_arrives(self, side):
        n = sum(p.pid.startswith("s") for p in self.swarm.peers.values())
        self.swarm.add(f"s{n}", stage=-1, state="spare", side=side)
        self._after()

    @rule(data=st.data())
    def abort(self, data):
        """A running peer whose epoch broke (a member crashed, froze, is across a split, or a newer epoch
        exists) hits its transport error or timeout and reports the step broken."""
        swarm = self.swarm
        pid = self._pick(data, lambda p: p.up and p.rec.state == "running" and swarm.broken(p))
        if pid is not None:
            swarm.update(swarm.peers[pid], state="recovering")
        self._after()

    # a record missing from the view together with a late probe answer of that peer is the known bug of
    # test_a_member_missing_from_the_view_is_declared_lost_on_one_late_probe, and a second gap in one view
    # that of test_a_member_missing_again_long_after_an_old_gap_is_still_hidden: kept apart here (one gap)
    @precondition(lambda self: not self.stale_used and not any(p.late for p in self.swarm.peers.values()))
    @rule(data=st.data())
    def stale_dht_view(self, data):
        pids = sorted(self.swarm.peers)
        self.swarm.drop = data.draw(st.sets(st.sampled_from(pids), min_size=1, max_size=2))
        self.stale_used = True
        self._after()

    @precondition(lambda self: self.replays and len(self.swarm.published) >= 2)
    @rule(data=st.data())
    def replay_old_epoch_record(self, data):
        newest = max(rec.epoch for rec, _, _ in self.swarm.published)
        olds = [rec for rec, _, _ in self.swarm.published if rec.epoch < newest and not rec.stop]
        if olds:
            self.swarm.replay = data.draw(st.sampled_from(olds))
        self._after()

    @precondition(lambda self: not self.swarm.drop)
    @rule(data=st.data())
    def late_probe(self, data):
        pid = self._pick(data, lambda p: p.up)
        if pid is not None:
            self.swarm.peers[pid].late += 1
        self._after()

    @rule(side=st.sampled_from([0, 0, 1]))
    def leader_round(self, side):
        self.swarm.leader_round(side)
        self._after()

    @rule()
    def calm_network_recovers(self):
        """Liveness: heal, thaw, and with a spare for every stage whose holder is gone, the swarm trains
        again within LIVENESS_ROUNDS rounds (unless it stopped, saying why)."""
        swarm = self.swarm
        before = swarm.commits
        swarm.calm(LIVENESS_ROUNDS)
        self._after()
        if swarm.stopped:
            STOPS[swarm.stopped[:60]] = STOPS.get(swarm.stopped[:60], 0) + 1
            return
        rec = swarm.newest(0)
        roster = rec.roster if rec else [f"p{s}" for s in range(self.num_stages)]
        gone = sum(swarm.peers[pid].crashed for pid in roster)
        spares = [p for p in swarm.peers.values() if not p.crashed and p.rec.state == "spare"]
        if len(spares) >= gone:
            assert swarm.commits > before, (
                f"no step trained in {LIVENESS_ROUNDS} calm rounds with {len(spares)} spares for {gone} lost "
                f"stages: newest epoch {rec and rec.epoch} roster {rec and rec.roster}; "
                f"leaders say {[p.leader.reason for p in swarm.peers.values() if p.leader.reason]}; "
                f"states {[(p.pid, p.rec.state, p.rec.epoch, p.rec.step, p.crashed) for p in swarm.peers.values()]}"
            )

    @invariant()
    def no_violation(self):
        assert not self.swarm.violations, "\n".join(self.swarm.violations)


def _run(strategy: str, num_stages: int, examples: int, steps: int, replays: bool = False, shrink: bool = True):
    machine = type(
        f"ProtocolModel_{strategy}",
        (ProtocolModel,),
        {"strategy": strategy, "num_stages": num_stages, "replays": replays},
    )
    phases = list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate]
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            derandomize=True,
            database=None,
            phases=phases,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def _report(capsys, label: str, t0: float) -> None:
    with capsys.disabled():
        print(
            f"\n[protocol model {label}] {STATS['examples']} examples, {STATS['steps']} rule steps, "
            f"{STATS['epochs']} epochs published ({STATS['recoveries']} with lost stages), "
            f"{STATS['commits']} steps committed, {time.monotonic() - t0:.1f} s; stops: {STOPS}"
        )


@pytest.mark.parametrize(
    "strategy, num_stages, examples",
    [("checkfree_plus", 4, 200), ("checkfree", 3, 80), ("hybrid", 4, 80)],
)
def test_protocol_model(strategy, num_stages, examples, capsys):
    STATS.update(examples=0, steps=0, commits=0, epochs=0, recoveries=0)
    STOPS.clear()
    t0 = time.monotonic()
    _run(strategy, num_stages, examples, 40)
    _report(capsys, f"{strategy} {num_stages} stages", t0)


@pytest.mark.long
@pytest.mark.parametrize("strategy", ["checkfree_plus", "checkfree", "hybrid"])
def test_protocol_model_long(strategy, capsys):
    STATS.update(examples=0, steps=0, commits=0, epochs=0, recoveries=0)
    STOPS.clear()
    t0 = time.monotonic()
    _run(strategy, 4, 1000, 80)
    _report(capsys, f"{strategy} long", t0)


# ---- known bugs, as the shortest rule sequences the model found -------------------------------------------


def _training_swarm(strategy: str = "checkfree_plus") -> Swarm:
    """Epoch 0 formed and one step committed, a spare standing by."""
    swarm = Swarm(4, strategy)
    swarm.tick(1.0)  # the views settle
    swarm.leader_round(0)
    swarm.sync()
    swarm.train()
    swarm.add("s0", stage=-1, state="spare")
    return swarm


def _break(swarm: Swarm) -> None:
    for peer in swarm.peers.values():
        if peer.up and peer.rec.state == "running":
            swarm.update(peer, state="recovering")


@pytest.mark.xfail(
    strict=True,
    reason="View.hidden takes one timed-out probe of a roster member missing from the DHT view as proof it is "
    "gone (no hang_s confirmation): a live holder is replaced",
)
def test_a_member_missing_from_the_view_is_declared_lost_on_one_late_probe():
    """late_probe(p0), stale_dht_view({p0}), the epoch breaks, leader_round: p1 leads, p0's record is not in
    its view, ``View.hidden`` probes p0 once and the answer comes 0.5 s late ("frozen"), so p0 is neither
    hidden nor confirmed frozen over hang_s, and ``decide_epoch`` gives stage 0 to the spare."""
    with quiet_leader():
        swarm = _training_swarm()
        swarm.peers["p0"].late = 1
        _break(swarm)
        swarm.drop = {"p0"}
        swarm.leader_round(0)
        assert not swarm.violations, "\n".join(swarm.violations)


@pytest.mark.xfail(
    strict=True,
    reason="a peer leads on the newest epoch its DHT read returns even when it has itself joined a newer one "
    "(no check against its own epoch): it republishes that epoch number with another roster",
)
def test_a_peer_that_joined_a_newer_epoch_never_leads_on_an_older_record():
    """The epoch breaks and re-forms (epoch 1, every peer joins it, e.g. pushed by the knock), p3 crashes and
    its record expires, a lagging DHT read gives p0 epoch 0 as the newest: p0 leads on it and publishes a
    second epoch 1, with the spare in stage 3, while the peers of the first epoch 1 are its members."""
    with quiet_leader():
        swarm = _training_swarm()
        _break(swarm)
        swarm.leader_round(0)  # epoch 1: a re-form, nobody lost
        swarm.sync()
        assert swarm.newest(0).epoch == 1 and swarm.trainers() is not None
        swarm.peers["p3"].crashed = True
        _break(swarm)
        swarm.tick(2.5)  # p3's record expires
        swarm.replay = swarm.epochs[0][0]
        swarm.leader_round(0)
        assert not swarm.violations, "\n".join(swarm.violations)


@pytest.mark.xfail(strict=True, reason="the same bug: a spare's lagging DHT read stops a swarm that still has a holder")
def test_a_spare_with_a_lagging_epoch_record_never_stops_a_swarm_that_has_a_holder():
    """p0 crashes, the spare s0 takes stage 0 (epoch 1), p1..p3 crash, a new spare s1 reads epoch 0 as the
    newest: every peer of epoch 0 refuses its probe, so s1 decides that every stage is lost at once and
    publishes a stop record numbered epoch 1, while s0 holds stage 0 in epoch 1 (and heartbeats so)."""
    with quiet_leader():
        swarm = Swarm(4, "checkfree_plus")
        swarm.add("s0", stage=-1, state="spare")
        swarm.calm(12)
        swarm.peers["p0"].crashed = True
        swarm.calm(12)
        assert swarm.newest(0).roster == ["s0", "p1", "p2", "p3"] and swarm.commits == 2
        for pid in ("p1", "p2", "p3"):
            swarm.peers[pid].crashed = True
        swarm.calm(12)  # waiting for spares for stages 1, 2 and 3
        swarm.replay = swarm.epochs[0][0]
        swarm.add("s1", stage=-1, state="spare")
        swarm.calm(12)
        assert not swarm.violations, "\n".join(swarm.violations)


@pytest.mark.xfail(
    strict=True,
    reason="before the first epoch Leader.step has no majority gate (it needs a current epoch's voters), so "
    "both sides of a split publish an epoch 0",
)
def test_a_split_before_the_first_epoch_forms_two_epochs_0():
    """A spare waits beside the stage peers; p0 is split off before the first epoch. p0, alone, still sees
    every record stored before the split and publishes epoch 0 with the stage peers; once its record expires
    on the other side, p1 leads there and gives stage 0 to the spare: a second epoch 0."""
    with quiet_leader():
        swarm = Swarm(4, "checkfree_plus")
        swarm.add("s0", stage=-1, state="spare")
        swarm.partition({"p0"})
        for _ in range(3):
            swarm.tick(1.0)
            swarm.leader_round(0)
            swarm.leader_round(1)
            swarm.sync()
        assert not swarm.violations, "\n".join(swarm.violations)


@pytest.mark.xfail(
    strict=True,
    reason="View.hidden keeps a member's first 'missing since' time after it reappears (cleared only by a "
    "hidden() call that sees it): a later, momentary gap counts as 3 TTLs missing and a live holder is lost",
)
def test_a_member_missing_again_long_after_an_old_gap_is_still_hidden():
    """Found by the long run (checkfree, 4 stages): a peer that rarely leads (here s0's view) saw p0 missing
    once; p0's record came back and others led meanwhile; 10 s later p0 is missing from s0's view for a
    moment while it answers its probe: ``hidden`` dates the gap from the old one and s0 declares p0 lost."""
    from checkfree.swarm.view import View
    from tests.model_sim import Clock

    clock = Clock()
    view = View(ttl_s=2.0, spare_wait_s=20.0, period_s=0.5, prober=SimpleNamespace(probe=_alive), clock=clock)
    current = EpochRecord(
        run_id="model",
        fingerprint="fp",
        epoch=0,
        roster=["p0", "p1"],
        store_host="",
        store_port=0,
        step=0,
        leader="p0",
        probes=[("127.0.0.1", 1), ("127.0.0.1", 2)],
    )
    p1 = MemberRecord(run_id="model", fingerprint="fp", peer_id="p1", stage=1, epoch=0, state="recovering", step=0)
    assert view.hidden({"p1": p1}, current) == [0]  # p0 missing, answering: hidden
    clock.t += 5.0
    view.observe({"p0": p1.model_copy(update={"peer_id": "p0", "stage": 0}), "p1": p1}, current)  # p0 is back
    clock.t += 5.0  # this view decided nothing meanwhile (another peer led)
    assert view.hidden({"p1": p1}, current) == [0], "p0 missing for a moment only, answering, yet not hidden"


def _alive(host, port, peer_id=None, timeout_s=0.5):
    return "alive"
