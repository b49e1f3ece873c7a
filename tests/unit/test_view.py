"""The view's verdicts, on an injected clock and a scripted prober (no sleeping, no sockets): a crash is
confirmed at once, a freeze only after ``hang_s`` of unanswered probes, a pause shorter than that never,
and a peer found frozen that answers again is a candidate again."""

from checkfree.swarm.leader import Leader
from checkfree.swarm.records import MemberRecord
from checkfree.swarm.view import View
from tests.fakes import Clock, Membership, epoch_record, lost_stage_3, member
from tests.helpers import tiny_config


class Prober:
    """Answers by port from ``answers``; a probe that gets no answer costs its whole timeout on the clock,
    unless the peer resumes (``resume_at``) before it runs out: then it is answered at that moment."""

    def __init__(self, clock, answers):
        self.clock, self.answers, self.resume_at, self.asked = clock, answers, {}, []

    def probe(self, host, port, peer_id=None, timeout_s=0.5):
        self.asked.append((peer_id, timeout_s))
        answer = self.answers[port]
        if answer in ("frozen", "silent"):
            back = self.resume_at.get(port)
            if back is not None and back <= self.clock.t + timeout_s:
                self.clock.t = max(self.clock.t, back)
                return "alive"
            self.clock.t += timeout_s
        return answer


ALIVE, FROZEN, REFUSED, SILENT = 1, 2, 3, 4


def _epoch(ports):
    return epoch_record(probes=[("127.0.0.1", p) for p in ports])


def _view(clock, prober, **kw):
    return View(ttl_s=2.0, spare_wait_s=10.0, period_s=0.5, prober=prober, hang_s=1.5, clock=clock, **kw)


def _answers():
    return {ALIVE: "alive", FROZEN: "frozen", REFUSED: "refused", SILENT: "silent", 0: "silent"}


def test_a_crash_is_confirmed_at_once_a_hang_only_after_hang_s_and_a_slow_heartbeat_never():
    clock = Clock()
    prober = Prober(clock, _answers())
    view = _view(clock, prober)
    current = _epoch([ALIVE, ALIVE, FROZEN, REFUSED])
    members = {
        "a": member("a", 0, "recovering", port=ALIVE),
        "b": member("b", 1, port=ALIVE),  # slow heartbeat, answers its probe
        "c": member("c", 2, port=FROZEN),
        "d": member("d", 3, port=REFUSED),
    }
    view.observe(members, current)
    assert sorted(view.confirmed(members, current)) == ["a", "b", "c"]  # the crash at once
    clock.t += 0.8  # > 1.5 watch periods without a new heartbeat from b, c
    members["a"] = members["a"].model_copy(update={"time": 2.0})
    view.observe(members, current)
    assert sorted(view.confirmed(members, current)) == ["a", "b"]
    assert view.dead == {"c", "d"} and view.why_dead == {"c": "frozen", "d": "refused"}
    # c's first probe went unanswered at t=100.0 (the first pass): the verdict comes hang_s after it at least
    assert clock.t - 100.0 >= view.hang_s


def test_the_confirming_probe_stays_in_flight_until_the_window_closes():
    clock = Clock()
    prober = Prober(clock, _answers())
    view = _view(clock, prober)
    view.note({"c": member("c", 2, port=FROZEN)})
    clock.t += 1.0  # stalled: no new heartbeat of c since
    assert view.frozen("c", "127.0.0.1", FROZEN)
    assert prober.asked == [("c", 0.5), ("c", 1.0)]  # 0.5 unanswered, then one probe open until hang_s
    assert clock.t == 101.0 + view.hang_s


def test_a_pause_shorter_than_hang_s_is_never_a_loss():
    """A SIGSTOP pulse, a GC pause, a starved CPU: the peer answers the confirming probe when it resumes."""
    clock = Clock()
    prober = Prober(clock, _answers())
    view = _view(clock, prober)
    current = _epoch([ALIVE, ALIVE, FROZEN, ALIVE])
    members = {
        p: member(p, s, "recovering" if p == "a" else "running", port=current.probes[s][1])
        for s, p in enumerate("abcd")
    }
    view.observe(members, current)
    clock.t += 0.8
    prober.resume_at[FROZEN] = clock.t + 1.4  # stopped for less than hang_s from the first unanswered probe
    assert "c" in view.confirmed(members, current)
    assert "c" not in view.dead


def test_a_frozen_peer_that_heartbeats_again_is_a_candidate_again():
    clock = Clock()
    prober = Prober(clock, _answers())
    view = _view(clock, prober)
    assert not view.frozen("c", "127.0.0.1", FROZEN)  # never seen: counts from now, not stalled yet
    clock.t += 1.0
    assert view.frozen("c", "127.0.0.1", FROZEN) and "c" in view.dead
    view.note({"c": member("c", 2, port=FROZEN, beat=5.0)})  # first beat seen: nothing to compare with
    view.note({"c": member("c", 2, port=FROZEN, beat=6.0)})  # a newer heartbeat, sealed by c itself
    assert "c" not in view.dead and view.revived == 1
    # a crash stays a crash, an exclusion an exclusion
    view.heard("d", "refused")
    view.exclude("e")
    view.heard("d", "alive")
    view.heard("e", "alive")
    assert {"d", "e"} <= view.dead


def test_a_peer_found_frozen_that_answers_a_probe_leaves_the_dead_list():
    clock = Clock()
    view = _view(clock, Prober(clock, _answers()))
    view.note({"c": member("c", 2, port=FROZEN)})
    clock.t += 1.0
    assert view.frozen("c", "127.0.0.1", FROZEN)
    view.heard("c", "alive")
    assert "c" not in view.dead


def _leader(tmp_path, membership):
    return Leader(tiny_config(tmp_path), "a", "l", "fp", membership, None, True, lambda *a, **k: None)


def test_a_side_without_a_majority_of_the_roster_waits_and_says_so(tmp_path):
    """Two of four roster members cannot be reached at all (silent: maybe across a partition): this side may
    be the minority, so it rebuilds nothing and says why. The same two seen crashed (refused) are surely
    lost on this side: the leader goes on (here, to waiting for spares). An even split is broken by the
    spares the epoch recorded as voters."""
    members, current = lost_stage_3()
    del members["c"]
    for far, expect in ((SILENT, "possible network partition"), (REFUSED, "waiting for a spare for stages [2, 3]")):
        clock = Clock()
        rec = current.model_copy(update={"probes": [("127.0.0.1", p) for p in (ALIVE, ALIVE, far, far)]})
        membership = Membership()
        leader = _leader(tmp_path, membership)
        view = View(ttl_s=0.05, spare_wait_s=0.0, period_s=0.01, prober=Prober(clock, _answers()), clock=clock)
        clock.t += 0.06  # watched long enough to decide
        leader.step(members, rec, 3, view)  # silent ones are not known lost before hang_s without an answer
        leader.step(members, rec, 3, view)
        assert expect in leader.reason and not membership.published, leader.reason
    spare = MemberRecord(
        run_id="l", fingerprint="fp", peer_id="s", stage=-1, epoch=-1, state="spare", step=0, probe_port=ALIVE
    )
    rec = current.model_copy(
        update={
            "probes": [("127.0.0.1", p) for p in (ALIVE, ALIVE, SILENT, SILENT)],
            "spares": ["s"],
            "spare_probes": [("127.0.0.1", ALIVE)],
        }
    )
    clock = Clock()
    leader = _leader(tmp_path, Membership())
    view = View(ttl_s=0.05, spare_wait_s=0.0, period_s=0.01, prober=Prober(clock, _answers()), clock=clock)
    clock.t += 0.06
    leader.step({**members, "s": spare}, rec, 3, view)
    leader.step({**members, "s": spare}, rec, 3, view)
    assert "waiting for a spare for stages [2, 3] (1 available)" in leader.reason, leader.reason


def test_nothing_is_confirmed_while_no_member_reports_the_epoch_broken():
    clock = Clock()
    prober = Prober(clock, _answers())
    view = _view(clock, prober)
    current = _epoch([FROZEN] * 4)
    members = {p: member(p, s, port=FROZEN) for s, p in enumerate("abcd")}
    view.observe(members, current)
    clock.t += 5.0
    assert sorted(view.confirmed(members, current)) == ["a", "b", "c", "d"]  # nobody probed: training goes on
    assert not prober.asked


def test_two_late_probes_far_apart_are_no_stretch_of_silence():
    """Found by the protocol model: two isolated late answers of a live peer, long apart, once counted as
    hang_s of unanswered probes, and a live holder missing from a stale view was declared lost."""
    clock = Clock()
    prober = Prober(clock, _answers())
    view = _view(clock, prober)
    view.note({"c": member("c", 2, port=ALIVE)})
    view.heard("c", "frozen", clock.t)  # one late answer
    clock.t += 60.0
    view.heard("c", "frozen", clock.t)  # another, a minute later
    assert not view.frozen("c", "127.0.0.1", ALIVE)  # it answers the confirming probe
    assert "c" not in view.dead
