"""The swarm protocol as a Hypothesis state machine: a few simulated peers and spares (``tests/model_sim``)
crash, freeze, thaw, split and heal, see stale DHT views and old epoch records, answer probes late, and
train full or partial commits, while the real ``Leader.step``, ``View`` and ``decide_epoch`` decide the
epochs. After every rule: one roster per epoch number, one holder per stage and epoch, no committed step
skipped or redone (a rebuild or rollback resets a stage explicitly), every trainer's lineage valid for the
epoch's step, no peer that answers its probes declared lost, no stop while a holder answers; and a calm
network recovers in bounded rounds.

Every combination that once broke a property is explored in the default run: old epoch records fed as the
newest (``replay_old_epoch_record``), any number of stale DHT views in one example, a stale view together
with late probes of the missing peer, and splits before the first epoch. The four bugs they found are fixed
and kept as regression tests at the end, each the shortest sequence found. ``-s`` prints how much was
explored and how often each of those combinations came up (``mixes``).

Still kept out, as simplifications of the model rather than known bugs: a replaced holder leaves at once
(the real one stands by until its replacement commits a step, and may take its stage back: those paths
are not explored), a knock always reaches the roster members on the leader's side,
a stale view misses at most two records, no data-plane blame or exclusion (``swarm.max_reforms`` is huge),
no checkpoint store, and no stop for want of spares (``swarm.spare_wait_s`` is huge)."""

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
# how often the combinations that once broke the protocol came up (see the module docstring)
MIXES = {"replays": 0, "stale views": 0, "examples with 2+ stale views": 0, "stale+late": 0, "early splits": 0}


class ProtocolModel(RuleBasedStateMachine):
    strategy = "checkfree_plus"
    num_stages = 4

    def __init__(self):
        super().__init__()
        self._quiet = quiet_leader()
        self._quiet.__enter__()
        self.swarm = Swarm(self.num_stages, self.strategy)
        self.stale_views = 0
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

    @rule(data=st.data())
    def partition(self, data):
        pids = sorted(self.swarm.peers)
        far = data.draw(st.sets(st.sampled_from(pids), min_size=1, max_size=len(pids) - 1))
        MIXES["early splits"] += not self.swarm.published
        self.swarm.heal()
        self.swarm.partition(far)
        self._after()

    @rule(data=st.data(), rounds=st.integers(1, 6))
    def rounds_while_split(self, data, rounds):
        """A split that lasts: both sides tick, abort their broken steps and run leader rounds."""
        swarm = self.swarm
        pids = sorted(swarm.peers)
        far = data.draw(st.sets(st.sampled_from(pids), min_size=1, max_size=len(pids) - 1))
        MIXES["early splits"] += not swarm.published
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

    @rule(data=st.data())
    def stale_dht_view(self, data):
        """The next leader round's DHT read misses a few records (any number of times in an example, with
        late probes of the same peers or not)."""
        pids = sorted(self.swarm.peers)
        self.swarm.drop = data.draw(st.sets(st.sampled_from(pids), min_size=1, max_size=2))
        self.stale_views += 1
        MIXES["stale views"] += 1
        MIXES["examples with 2+ stale views"] += self.stale_views == 2
        MIXES["stale+late"] += any(self.swarm.peers[pid].late for pid in self.swarm.drop)
        self._after()

    @precondition(lambda self: len(self.swarm.published) >= 2)
    @rule(data=st.data())
    def replay_old_epoch_record(self, data):
        newest = max(rec.epoch for rec, _, _ in self.swarm.published)
        olds = [rec for rec, _, _ in self.swarm.published if rec.epoch < newest and not rec.stop]
        if olds:
            self.swarm.replay = data.draw(st.sampled_from(olds))
            MIXES["replays"] += 1
        self._after()

    @rule(data=st.data())
    def late_probe(self, data):
        pid = self._pick(data, lambda p: p.up)
        if pid is not None:
            self.swarm.peers[pid].late += 1
            MIXES["stale+late"] += pid in self.swarm.drop
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


def _run(strategy: str, num_stages: int, examples: int, steps: int, shrink: bool = True):
    machine = type(f"ProtocolModel_{strategy}", (ProtocolModel,), {"strategy": strategy, "num_stages": num_stages})
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
            f"{STATS['commits']} steps committed, {time.monotonic() - t0:.1f} s; mixes: {MIXES}; stops: {STOPS}"
        )


@pytest.mark.parametrize(
    "strategy, num_stages, examples",
    [("checkfree_plus", 4, 200), ("checkfree", 3, 80), ("hybrid", 4, 80)],
)
def test_protocol_model(strategy, num_stages, examples, capsys):
    STATS.update(examples=0, steps=0, commits=0, epochs=0, recoveries=0)
    MIXES.update(dict.fromkeys(MIXES, 0))
    STOPS.clear()
    t0 = time.monotonic()
    _run(strategy, num_stages, examples, 40)
    _report(capsys, f"{strategy} {num_stages} stages", t0)


@pytest.mark.long
@pytest.mark.parametrize("strategy", ["checkfree_plus", "checkfree", "hybrid"])
def test_protocol_model_long(strategy, capsys):
    STATS.update(examples=0, steps=0, commits=0, epochs=0, recoveries=0)
    MIXES.update(dict.fromkeys(MIXES, 0))
    STOPS.clear()
    t0 = time.monotonic()
    _run(strategy, 4, 1000, 80)
    _report(capsys, f"{strategy} long", t0)


# ---- regressions: the shortest rule sequences of the bugs the model found (all fixed) ------------------------


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


def test_a_member_missing_from_the_view_is_not_lost_on_one_late_probe():
    """late_probe(p0), stale_dht_view({p0}), the epoch breaks, leader_round: p1 leads, p0's record is not in
    its view and ``View.hidden`` probes p0 once; the answer comes 0.5 s late ("frozen"). The bug (fixed): one
    timed-out probe counted as proof, and ``decide_epoch`` gave p0's stage to the spare; now a missing member
    is lost only after ``membership.hang_s`` of unanswered probes."""
    with quiet_leader():
        swarm = _training_swarm()
        swarm.peers["p0"].late = 1
        _break(swarm)
        swarm.drop = {"p0"}
        swarm.leader_round(0)
        assert not swarm.violations, "\n".join(swarm.violations)


def test_a_peer_that_joined_a_newer_epoch_never_leads_on_an_older_record():
    """The epoch breaks and re-forms (epoch 1, every peer joins it, e.g. pushed by the knock), p3 crashes and
    its record expires, a lagging DHT read gives p0 epoch 0 as the newest. The bug (fixed): p0 led on it and
    published a second epoch 1 (the spare in stage 3) beside the first; now ``coordinator.gate`` decides
    nothing on a record older than an epoch a member reports, and a pushed newer record wins over the read."""
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


def test_a_spare_with_a_lagging_epoch_record_never_stops_a_swarm_that_has_a_holder():
    """p0 crashes, the spare s0 takes stage 0 (epoch 1), p1..p3 crash, a new spare s1 reads epoch 0 as the
    newest: every peer of epoch 0 refuses its probe. The bug (fixed, as the test before): s1 decided that
    every stage was lost at once and published a stop numbered epoch 1 while s0 held stage 0 in epoch 1 (and
    heartbeated so); now s0's record, of epoch 1, holds the gate until the read catches up."""
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


def test_a_split_before_the_first_epoch_forms_one_epoch_0():
    """A spare waits beside the stage peers; p0 is split off before the first epoch. The bug (fixed): p0,
    alone, still saw every record stored before the split and published epoch 0 with the stage peers, and
    once its record expired on the other side p1 gave stage 0 to the spare there: a second epoch 0. Now no
    roster names a peer that did not answer a fresh probe, so p0's side waits."""
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
        assert [(r.epoch, by) for r, by, _ in swarm.published] == [(0, "p1")]  # p0's side waits


def test_a_member_missing_again_long_after_an_old_gap_is_still_hidden():
    """Found by the long run (checkfree, 4 stages): a peer that rarely leads (here s0's view) saw p0 missing
    once; p0's record came back and others led meanwhile; 10 s later p0 is missing from s0's view for a
    moment while it answers its probe. The bug (fixed): ``hidden`` dated the gap from the old one and s0
    declared p0 lost; now a member seen again (``View.note``) clears its 'missing since'."""
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
