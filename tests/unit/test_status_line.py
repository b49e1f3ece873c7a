"""The live status line of ``checkfree swarm`` (launcher.status), from member and epoch records."""

import math

from checkfree.swarm.membership import EpochRecord, MemberRecord
from launcher.status import LiveStatus, short_names, status_line

IDS = [f"s{s}-0{s + 1}.{'abcdef0123456789'[s] * 16}" for s in range(4)]


def member(pid: str, stage: int, state: str = "running", step: int = 14, loss=None, note: str = "", epoch: int = 1):
    return MemberRecord(
        run_id="r",
        fingerprint="f",
        peer_id=pid,
        stage=stage,
        epoch=epoch,
        state=state,
        step=step,
        loss=loss,
        tokens_per_s=1234.0,
        note=note,
    )


def epoch(roster=IDS, number: int = 1, **fields) -> EpochRecord:
    return EpochRecord(
        run_id="r", fingerprint="f", epoch=number, roster=roster, store_host="h", store_port=1, step=0, leader=roster[0]
    ).model_copy(update=fields)


def running(**last):
    members = {pid: member(pid, s) for s, pid in enumerate(IDS)}
    members[IDS[-1]] = member(IDS[-1], 3, **({"loss": 5.21357} | last))
    return members


def test_a_running_swarm_says_so_first_with_short_names_and_a_rounded_loss():
    line = status_line(running(), epoch(), 42.0, 60, 4, failures=1, recoveries=1, width=150)
    assert line.startswith("[   42s] running | step 14/60 loss 5.21 tok/s 1234 | failures 1 recoveries 1 | spares 0")
    assert line.endswith("0:s0-01 1:s1-02 2:s2-03 3:s3-04")
    assert "aaaa" not in line and "5.213" not in line


def test_while_peers_start_it_counts_them_instead_of_a_step_and_a_nan_loss():
    members = {pid: member(pid, s, state="waiting", epoch=-1, step=0) for s, pid in enumerate(IDS[:3])}
    line = status_line(members, None, 3.0, 60, 5, 0, 0, width=150)
    assert line.startswith("[    3s] starting: 3 of 5 peers up |")
    assert "step" not in line and "nan" not in line
    assert line.endswith("0:s0-01 1:s1-02 2:s2-03")


def test_what_the_leader_waits_for_comes_first_and_is_never_cut():
    note = "waiting for a spare for stages [2] (0 available)"
    members = running()
    del members[IDS[2]]
    members[IDS[0]] = member(IDS[0], 0, note=note)
    line = status_line(members, epoch(), 61.0, 60, 4, 1, 0, width=60)
    assert line.startswith("[ 1m01s] stage lost: waiting for a spare for stages [2] (0 available)")
    assert len(line) > 60  # the state and the wait alone are wider than asked: nothing of them is cut
    wide = status_line(members, epoch(), 61.0, 60, 4, 1, 0, width=200)
    assert wide.endswith("| 0:s0-01 1:s1-02 2:s2-03! 3:s3-04")  # the lost holder is marked
    shorter = status_line(members, epoch(), 61.0, 60, 4, 1, 0, width=150)
    assert len(shorter) <= 150 and shorter.endswith("| 0:s0-01 1:s1-02 +2")


def test_a_lost_holder_is_what_the_swarm_waits_for_when_no_peer_says_more():
    members = running()
    del members[IDS[1]]
    line = status_line(members, epoch(), 5.0, 60, 4, 1, 0, width=150)
    assert line.startswith("[    5s] stage lost: waiting for stage 1 (holder s1-02 gone) |")


def test_holders_joining_a_new_epoch_show_as_recovering():
    members = running()
    members[IDS[2]] = member(IDS[2], 2, state="joining", epoch=1)
    line = status_line(members, epoch(number=2, lost=[2]), 5.0, 60, 5, 1, 0, width=150)
    assert line.startswith("[    5s] recovering (epoch 2): waiting for 4 of 4 holders to join |")


def test_the_holders_list_is_shortened_to_fit_the_width():
    roster = [f"stage-peer-{s:02d}.{s:016x}" for s in range(12)]
    members = {pid: member(pid, s) for s, pid in enumerate(roster)}
    line = status_line(members, epoch(roster), 42.0, 60, 12, 0, 0, width=100)
    assert len(line) <= 100
    assert "0:stage-peer-00" in line and line.endswith(" more") is False and "+" in line.rsplit("|", 1)[1]
    narrow = status_line(members, epoch(roster), 42.0, 60, 12, 0, 0, width=70)
    assert len(narrow) <= 70 and narrow.startswith("[   42s] running | step 14/60")


def test_the_last_finite_loss_stays_once_the_holders_have_gone():
    live = LiveStatus(num_steps=60)
    first = live(running(), epoch(), 10.0, 4, 0, 0, width=150)
    assert "loss 5.21" in first and len(first) == 150
    assert "loss 5.21" in live(running(loss=math.nan), epoch(), 11.0, 4, 0, 0, width=150)
    finished = epoch(finished=True)
    end = live({}, finished, 12.0, 4, 0, 0, width=150)
    assert end.startswith("[   12s] finished |") and "loss 5.21" in end and "nan" not in end


def test_short_names_keep_a_bit_of_the_hash_where_two_peers_share_a_name():
    names = short_names(["spare.aaaa1111", "spare.bbbb2222", "s0-01.cccc3333", "plain"])
    assert names == {"spare.aaaa1111": "spare.aaaa", "spare.bbbb2222": "spare.bbbb", "s0-01.cccc3333": "s0-01"} | {
        "plain": "plain"
    }
