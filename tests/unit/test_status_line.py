"""The live status line of ``checkfree swarm`` (launcher.status), and what ``checkfree status`` reads from a
run directory and prints (checkfree.cli.status), from member and epoch records."""

import json
import math

import pytest

from checkfree.cli.status import StatusInputError, render, resolve_target, snapshot
from checkfree.swarm.admission import SWARM_ENV, TOKEN_ENV, new_token, write_swarm_id, write_token
from checkfree.swarm.records import EpochRecord, Lineage, MemberRecord
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


# ---- checkfree status RUN_DIR ----------------------------------------------------------------------
MADDRS = ["/ip4/127.0.0.1/tcp/4001/p2p/QmA", "/ip4/127.0.0.1/tcp/4002/p2p/QmB"]
SWARM_ID = "a" * 32


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(SWARM_ENV, raising=False)
    run = tmp_path / "run"
    (run / "peers").mkdir(parents=True)
    (run / "config.yaml").write_text("run_name: exp\nswarm:\n  run_id: null\n  num_spares: 1\n")
    (run / "maddrs.txt").write_text(" ".join(MADDRS) + "\n")
    token = new_token()
    write_token(run, token)
    write_swarm_id(run, SWARM_ID)
    return run, token


def test_a_run_directory_says_which_swarm_to_look_at(run_dir):
    run, token = run_dir
    assert resolve_target(run) == resolve_target(str(run), [], None, None)
    target = resolve_target(run)
    assert (target.run_id, target.token, target.initial_peers, target.swarm_id) == ("exp", token, MADDRS, SWARM_ID)
    (run / "config.yaml").write_text("run_name: exp\nswarm:\n  run_id: shared-id\n")
    assert resolve_target(run).run_id == "shared-id"


def test_flags_and_the_environment_override_the_run_directory(run_dir, monkeypatch):
    run, _ = run_dir
    other, env = new_token(), new_token()
    monkeypatch.setenv(TOKEN_ENV, env)
    assert resolve_target(run).token == env
    target = resolve_target(run, ["/ip4/10.0.0.5/tcp/1/p2p/QmC"], "given", other)
    assert (target.run_id, target.token, target.initial_peers) == ("given", other, ["/ip4/10.0.0.5/tcp/1/p2p/QmC"])
    monkeypatch.setenv(SWARM_ENV, "b" * 32)
    assert resolve_target(run).swarm_id == "b" * 32
    assert resolve_target(run, swarm_id="c" * 32).swarm_id == "c" * 32
    (run / "config.yaml").unlink()  # not needed when --run-id is given
    assert resolve_target(run, run_id="given").run_id == "given"


def test_without_a_run_directory_the_old_flags_say_it_all(monkeypatch):
    token = new_token()
    monkeypatch.delenv(SWARM_ENV, raising=False)
    target = resolve_target(None, MADDRS[:1], None, token, SWARM_ID)
    assert (target.run_id, target.initial_peers, target.swarm_id) == ("tiny", MADDRS[:1], SWARM_ID)
    with pytest.raises(StatusInputError, match="sealed with its id: pass --swarm-id or \\$CHECKFREE_SWARM_ID"):
        resolve_target(None, MADDRS[:1], None, token)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(StatusInputError, match="sealed with its join token: pass --join-token or \\$CHECKFREE"):
        resolve_target(None, MADDRS[:1])
    with pytest.raises(StatusInputError, match="pass its RUN_DIR, or --initial-peers"):
        resolve_target(None, None, "tiny", token)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda run: (run / "maddrs.txt").unlink(), r"run/maddrs.txt not found: it holds the addresses to join"),
        (lambda run: (run / "maddrs.txt").write_text("\n"), r"maddrs.txt is empty: expected the swarm's multiaddr"),
        (lambda run: (run / "config.yaml").unlink(), r"config.yaml not found: it holds the swarm's run id \(or pass"),
        (lambda run: (run / "config.yaml").write_text("run_name: [a\n"), r"config.yaml is not valid YAML"),
        (lambda run: (run / "config.yaml").write_text("just text\n"), r"holds no config \(a YAML mapping"),
        (lambda run: (run / "join_token").unlink(), r"pass --join-token or \$CHECKFREE_JOIN_TOKEN, or keep it in"),
        (lambda run: (run / "join_token").write_text("nope\n"), r"the join token is not valid \(4 characters\)"),
        (lambda run: (run / "swarm_id").unlink(), r"pass --swarm-id or \$CHECKFREE_SWARM_ID, or keep it in .*swarm_id"),
        (
            lambda run: (run / "swarm_id").write_text("xyz\n"),
            r"swarm id 'xyz' is not valid: expected 32 .* \(from .*swarm_id\)",
        ),
        (
            lambda run: ((run / "config.yaml").unlink(), (run / "config.yaml").mkdir()),
            r"cannot read .*config.yaml \(the swarm's run id",
        ),
    ],
)
def test_a_missing_or_unreadable_run_directory_file_is_a_clear_error(run_dir, breakage, message):
    run, _ = run_dir
    breakage(run)
    with pytest.raises(ValueError, match=message):
        resolve_target(run)


def test_a_run_directory_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(StatusInputError, match=r"run directory '.*nowhere' does not exist"):
        resolve_target(tmp_path / "nowhere")


def test_the_snapshot_holds_each_stage_the_spares_the_notes_and_the_addresses():
    members = running()
    members[IDS[0]] = member(IDS[0], 0, note="waiting for stages [1] to abort step").model_copy(
        update={"time": 90.0, "maddrs": [MADDRS[0]], "lineage": Lineage(kind="initial")}
    )
    del members[IDS[1]]
    members[IDS[3]] = members[IDS[3]].model_copy(update={"loss": math.nan, "time": 99.5})
    spare = member("spare-05.eeee", -1, state="spare", step=0, epoch=-1).model_copy(update={"time": 99.0})
    members[spare.peer_id] = spare
    snap = snapshot("exp", members, epoch(step=12), now=100.0)
    assert json.loads(json.dumps(snap)) == snap  # JSON as it is: no NaN
    assert (snap["epoch"], snap["leader"], snap["step"], snap["resumed_at"]) == (1, IDS[0], 14, 12)
    assert [(r["stage"], r["state"]) for r in snap["roster"]] == [
        (0, "running"),
        (1, "lost"),
        (2, "running"),
        (3, "running"),
    ]
    assert snap["roster"][0]["heartbeat_age_s"] == 10.0 and snap["roster"][0]["weights"].startswith("initial weights")
    assert snap["roster"][1]["step"] is None and snap["roster"][3]["loss"] == "nan"
    assert snap["spares"] == [
        {
            "peer": "spare-05.eeee",
            "state": "spare",
            "stage": -1,
            "step": 0,
            "epoch": -1,
            "heartbeat_age_s": 1.0,
            "attacks": {},
        }
    ]
    assert snap["notes"] == [{"peer": IDS[0], "note": "waiting for stages [1] to abort step"}]
    assert snap["addresses"] == [MADDRS[0]]
    text = render(snap)
    assert text.startswith("run exp: epoch 1, leader " + IDS[0] + ", resumed at step 12, step 14\n")
    assert f"    1  {IDS[1]}  LOST" in text and f"{IDS[0]} waits: waiting for stages [1]" in text
    assert "spare  spare-05.eeee" in text and text.endswith("join with --initial-peers " + MADDRS[0])
    assert snap["attacks"] == {} and "attacks (all peers): none\n" in text and "attacks:" not in text


def test_before_the_first_epoch_the_snapshot_says_so():
    members = {IDS[0]: member(IDS[0], 0, state="waiting", epoch=-1, step=0)}
    snap = snapshot("exp", members, None, now=5.0)
    assert snap["epoch"] is None and snap["roster"] == [] and snap["others"][0]["state"] == "waiting"
    assert render(snap).startswith("run exp: no epoch yet\n")


# ---- what tells an attack from a fault -------------------------------------------------------------
def attacked(counters_by_stage: dict[int, dict]) -> dict:
    members = running()
    for stage, counters in counters_by_stage.items():
        members[IDS[stage]] = members[IDS[stage]].model_copy(update={"counters": counters})
    return members


def test_the_line_totals_the_non_zero_attack_counters_and_drops_them_last():
    members = attacked({0: {"shed": 2, "asks": 40, "gate_refused": 0}, 2: {"shed": 1, "records_foreign": 3}})
    line = status_line(members, epoch(), 42.0, 60, 4, 0, 0, width=150)
    assert "| failures 0 recoveries 0 | attacks shed=3 records_foreign=3 | spares 0 |" in line
    assert "asks" not in line and "gate_refused" not in line  # not attacks; zero
    narrow = status_line(members, epoch(), 42.0, 60, 4, 0, 0, width=115)
    assert "| failures 0 recoveries 0 | attacks shed=3 records_foreign=3 | 0:s0-01" in narrow and len(narrow) <= 115
    assert "tok/s" not in narrow and "spares" not in narrow  # gone before the attacks
    narrower = status_line(members, epoch(), 42.0, 60, 4, 0, 0, width=95)
    assert "attacks" not in narrower and len(narrower) <= 95
    quiet = attacked({0: {"asks": 40, "conns": 41, "revived": 1}})
    assert "attacks" not in status_line(quiet, epoch(), 42.0, 60, 4, 0, 0, width=150)


def test_the_live_line_keeps_the_counts_of_a_peer_gone_from_the_dht():
    live = LiveStatus(num_steps=60)
    members = attacked({1: {"timeouts": 4}, 3: {"knocks_limited": 2}})
    assert "attacks timeouts=4 knocks_limited=2 |" in live(members, epoch(), 10.0, 4, 0, 0, width=150)
    del members[IDS[1]]
    members[IDS[3]] = members[IDS[3]].model_copy(update={"counters": {"knocks_limited": 5, "gate_shed": 1}})
    assert "attacks timeouts=4 knocks_limited=5 gate_shed=1 |" in live(members, epoch(), 11.0, 4, 1, 0, width=200)


def test_status_shows_each_peers_attack_counters_and_a_swarm_total():
    members = attacked({1: {"pushes_refused": 1, "gate_shed": 2, "conns": 9}})
    spare = member("spare-05.eeee", -1, state="spare", step=0, epoch=-1)
    members[spare.peer_id] = spare.model_copy(update={"counters": {"gate_shed": 5, "gate_admitted": 1}})
    snap = snapshot("exp", members, epoch(), now=100.0)
    assert snap["roster"][1]["attacks"] == {"pushes_refused": 1, "gate_shed": 2}
    assert snap["roster"][0]["attacks"] == {} and snap["spares"][0]["attacks"] == {"gate_shed": 5}
    assert snap["attacks"] == {"pushes_refused": 1, "gate_shed": 7}
    lines = render(snap).splitlines()
    assert lines[3].startswith(f"    1  {IDS[1]}") and lines[3].endswith("  attacks: pushes_refused=1 gate_shed=2")
    assert "attacks" not in lines[2]
    assert next(x for x in lines if x.startswith("spare")).endswith("  attacks: gate_shed=5")
    assert "attacks (all peers): pushes_refused=1 gate_shed=7" in lines
