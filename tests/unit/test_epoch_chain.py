"""Which epoch record is the swarm's current one: a chain from the newest epoch this peer accepted (or the
oldest held), each record published by a leader the epoch before allows. Records a token holder plants
outside the chain are ignored, and the real epochs go on past them."""

from checkfree.swarm.records import MAX_EPOCH_JUMP, EpochRecord, chain_head, follows


def rec(n, leader="a", roster=("a", "b", "c"), spares=(), stop=None):
    return EpochRecord(
        run_id="r",
        fingerprint="f",
        epoch=n,
        roster=list(roster) if stop is None else [],
        store_host="h",
        store_port=1,
        step=n,
        leader=leader,
        spares=list(spares),
        stop=stop,
    )


def test_the_newest_epoch_of_an_unbroken_chain_is_current():
    chain = {n: rec(n, leader="abc"[n % 3]) for n in range(4)}
    assert chain_head(chain) == chain[3]
    assert chain_head({}) is None


def test_a_record_planted_far_ahead_is_ignored():
    chain = {0: rec(0), 1: rec(1), 99999999: rec(99999999, stop="hijack")}
    assert chain_head(chain).epoch == 1
    assert chain_head({0: rec(0), 1 + MAX_EPOCH_JUMP: rec(1 + MAX_EPOCH_JUMP)}).epoch == 0
    assert chain_head({0: rec(0), MAX_EPOCH_JUMP: rec(MAX_EPOCH_JUMP)}).epoch == MAX_EPOCH_JUMP  # lost records


def test_a_stop_counts_only_from_the_roster_or_the_leader_and_nothing_follows_it():
    base = rec(5, spares=("s",))
    assert not follows(base, rec(6, leader="s", stop="a spare stops the swarm"))
    assert follows(base, rec(6, leader="b", stop="a member stops it"))
    assert not follows(base, rec(6, leader="s"))  # a listed spare may not name a roster while holders live
    assert not follows(base, rec(6, leader="x"))  # a peer the epoch does not know may not
    assert not follows(rec(6, leader="b", stop="stopped"), rec(7))


def test_a_spare_leads_or_stops_when_its_record_says_every_stage_is_lost():
    """Every holder lost at once: the lowest spare leads (a restart from checkpoints, or a stop). Its record
    must say so: every stage lost, none of the old holders in its roster."""
    base = rec(5)
    restart = rec(6, leader="x", roster=("x", "y", "z")).model_copy(update={"lost": [0, 1, 2]})
    assert follows(base, restart)
    assert not follows(base, restart.model_copy(update={"roster": ["x", "b", "z"]}))  # b still holds stage 1
    stop = rec(6, leader="x", stop="every stage lost")
    assert not follows(base, stop) and follows(base, stop.model_copy(update={"lost": [0, 1, 2]}))


def test_a_spare_leads_when_every_holder_left_or_was_lost_and_names_none_of_them():
    """Holders that left on a preemption notice hand their stage over: a spare leads the epoch that takes the
    hand-overs, and that counts like a lost stage; a listed spare's roster that keeps an old holder does not."""
    from checkfree.swarm.records import PlanRecord

    base = rec(5, spares=("s", "t", "u"))
    handed = [PlanRecord(stage=i, method="handoff", sources=[i], path="preempted", edge=None) for i in (1, 2)]
    takeover = rec(6, leader="s", roster=("s", "t", "u")).model_copy(update={"lost": [0], "plans": handed})
    assert follows(base, takeover)
    assert not follows(base, takeover.model_copy(update={"plans": handed[:1]}))  # stage 2 neither lost nor handed
    assert not follows(base, takeover.model_copy(update={"roster": ["s", "t", "c"]}))


def test_a_planted_record_is_skipped_and_the_real_epochs_go_on_past_it():
    """A token-holding spare occupies epoch 6's subkey with a stop of its own; the real epoch 6 never made it
    into the DHT (the members learnt it from the leader's knock); the real epoch 7 follows epoch 5's roster."""
    chain = {5: rec(5, spares=("s",)), 6: rec(6, leader="s", stop="hijack"), 7: rec(7, leader="b")}
    assert chain_head(chain).epoch == 7


def test_an_epoch_older_than_the_one_accepted_never_becomes_current():
    known = rec(8)
    planted = {0: rec(0, leader="x", roster=("x",)), 3: rec(3)}
    assert chain_head(planted, known) == known
    assert chain_head({**planted, 9: rec(9, leader="c")}, known).epoch == 9


def test_a_record_known_otherwise_is_current_only_when_newer_than_the_read():
    """What a waiting peer (and the protocol model) does with the epoch it read and those pushed to it or
    published by itself: the highest epoch wins, the read on a tie."""
    from checkfree.swarm.records import newest_of

    read, pushed = rec(3), rec(4, leader="b")
    assert newest_of(read, pushed, None) is pushed
    assert newest_of(read, rec(2), rec(1)) is read  # a stale push never takes a peer back
    assert newest_of(read, rec(3, leader="b")) is read
    assert newest_of(None, pushed) is pushed and newest_of(None, None) is None and newest_of() is None
